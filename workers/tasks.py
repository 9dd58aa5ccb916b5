"""Thin Celery tasks: take ids, hand over to the runners. Job state lives in our tables."""

from __future__ import annotations

import logging
import uuid

from celery import Task
from celery.worker import state as worker_state

from service.config import get_settings
from service.jobs.transient import TransientFailure
from service.observability.context import log_context, valid_request_id
from service.queue import BATCH_PREDICT_TASK, REQUEST_ID_HEADER, TRAIN_RUN_TASK
from workers import runners
from workers.celery_app import app, daemon

log = logging.getLogger(__name__)


def shutdown_requested() -> bool:
    """True once the worker was asked to stop (SIGTERM/SIGINT): training yields at a batch."""
    return worker_state.should_stop is not None or worker_state.should_terminate is not None


@app.task(
    bind=True, name=TRAIN_RUN_TASK, acks_late=True, reject_on_worker_lost=True, ignore_result=True,
    # Only transient infrastructure errors are retried, with backoff and jitter, bounded.
    autoretry_for=(TransientFailure,), retry_backoff=5, retry_backoff_max=300, retry_jitter=True,
    max_retries=get_settings().task_max_retries,
)
def train_run(self: Task, run_id: str) -> None:
    try:
        parsed = uuid.UUID(run_id)
    except ValueError:
        log.error("ignoring training message with a malformed run id %r", run_id)
        return
    # Log lines of this run carry the request id of the API request that queued it.
    request_id = valid_request_id(self.request.get(REQUEST_ID_HEADER))
    with log_context(request_id=request_id, run_id=str(parsed)):
        runners.train_run(parsed, get_settings(), daemon(), should_stop=shutdown_requested)


@app.task(
    bind=True, name=BATCH_PREDICT_TASK, acks_late=True, reject_on_worker_lost=True, ignore_result=True,
    autoretry_for=(TransientFailure,), retry_backoff=5, retry_backoff_max=300, retry_jitter=True,
    max_retries=get_settings().task_max_retries,
)
def run_batch_prediction(self: Task, job_id: str) -> None:
    """A batch prediction job (a ``runs`` row of kind "predict"): the runner claims it like a run
    and dispatches by the row's kind."""
    try:
        parsed = uuid.UUID(job_id)
    except ValueError:
        log.error("ignoring batch prediction message with a malformed job id %r", job_id)
        return
    request_id = valid_request_id(self.request.get(REQUEST_ID_HEADER))
    with log_context(request_id=request_id, run_id=str(parsed)):
        runners.train_run(parsed, get_settings(), daemon(), should_stop=shutdown_requested)
