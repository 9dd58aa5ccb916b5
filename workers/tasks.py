"""Thin Celery tasks: take ids, hand over to the runners. Job state lives in our tables."""

from __future__ import annotations

import logging
import uuid

from celery.worker import state as worker_state

from service.config import get_settings
from service.jobs.transient import TransientFailure
from service.queue import TRAIN_RUN_TASK
from workers import runners
from workers.celery_app import app, daemon

log = logging.getLogger(__name__)


def shutdown_requested() -> bool:
    """True once the worker was asked to stop (SIGTERM/SIGINT): training yields at a batch."""
    return worker_state.should_stop is not None or worker_state.should_terminate is not None


@app.task(
    name=TRAIN_RUN_TASK, acks_late=True, reject_on_worker_lost=True, ignore_result=True,
    # Only transient infrastructure errors are retried, with backoff and jitter, bounded.
    autoretry_for=(TransientFailure,), retry_backoff=5, retry_backoff_max=300, retry_jitter=True,
    max_retries=get_settings().task_max_retries,
)
def train_run(run_id: str) -> None:
    try:
        parsed = uuid.UUID(run_id)
    except ValueError:
        log.error("ignoring training message with a malformed run id %r", run_id)
        return
    runners.train_run(parsed, get_settings(), daemon(), should_stop=shutdown_requested)
