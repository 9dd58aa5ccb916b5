"""Celery *client* and the shared Celery configuration.

The API enqueues by task name (``send_task``) and never imports worker code; workers build
their app with the same :func:`create_celery_app` so both sides agree on broker settings.
"""

from __future__ import annotations

import logging
import uuid
from functools import lru_cache

from celery import Celery

from service.config import Settings
from service.observability.context import current_request_id

log = logging.getLogger(__name__)

TRAIN_RUN_TASK = "mcdrop.runs.train"
BATCH_PREDICT_TASK = "mcdrop.batch_predictions.run"  # jobs of kind "predict"
CPU_QUEUE = "cpu"
CUDA_QUEUE = "cuda"
# Message header carrying the request id of the API request that sent it (to the worker's logs).
REQUEST_ID_HEADER = "mcdrop_request_id"


def broker_transport_options(settings: Settings) -> dict[str, object]:
    if settings.embedded_broker:
        # kombu's filesystem transport: absolute folders (API and worker may run in different
        # working directories), processed messages kept in our folder (the default moves them
        # to the system temp dir, which is a copy across file systems and racy between
        # consumers), and a short polling interval so jobs start promptly.
        folder = settings.broker_folder
        for name in ("messages", "control", "processed"):
            (folder / name).mkdir(parents=True, exist_ok=True)
        return {
            "data_folder_in": str(folder / "messages"),
            "data_folder_out": str(folder / "messages"),
            "control_folder": str(folder / "control"),
            "processed_folder": str(folder / "processed"),
            "store_processed": True,
            "polling_interval": settings.broker_polling_interval,
        }
    # Redis: a message not acknowledged within the visibility timeout is delivered again.
    # Training acknowledges late (after the run is finished), so it must exceed a long run.
    return {
        "visibility_timeout": 6 * 3600,
        "priority_steps": list(range(10)),
        "queue_order_strategy": "priority",
        "sep": ":",
    }


def create_celery_app(settings: Settings, name: str = "mcdrop") -> Celery:
    app = Celery(name, broker=settings.celery_broker_url)
    app.conf.update(
        broker_transport_options=broker_transport_options(settings),
        broker_connection_retry_on_startup=True,
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,  # job state lives in our own tables
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_default_queue=CPU_QUEUE,
        task_queue_max_priority=9,
        task_default_priority=4,
        # Hard limits apply to the prefork pool; the single-process (solo) default relies on
        # leases and cooperative cancellation instead.
        task_time_limit=7 * 24 * 3600,
        task_soft_time_limit=7 * 24 * 3600 - 60,
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
        task_send_sent_event=False,
    )
    return app


@lru_cache(maxsize=4)
def _client(settings: Settings) -> Celery:
    return create_celery_app(settings, name="mcdrop-client")


def queue_for_device(device: str) -> str:
    """``cuda`` runs wait for a GPU worker; ``auto`` and ``cpu`` runs go to the queue every
    worker consumes (a worker with a GPU trains ``auto`` runs on it)."""
    return CUDA_QUEUE if device == "cuda" else CPU_QUEUE


def task_for_kind(kind: str) -> str:
    """The task that runs a job of this kind (training runs and sweeps share one)."""
    return BATCH_PREDICT_TASK if kind == "predict" else TRAIN_RUN_TASK


def enqueue_training(
    settings: Settings, run_id: uuid.UUID, *, queue_name: str, priority: int = 0, task_name: str = TRAIN_RUN_TASK,
) -> None:
    """Send the task (``task_name``: training by default) for a committed job row. Raises on broker errors.

    ``priority`` 0..9, higher is more urgent. Redis serves lower numbers first, so it is
    inverted there; the embedded broker has no priorities (first in, first out).
    """
    broker_priority = 9 - priority if not settings.embedded_broker else None
    request_id = current_request_id()  # None when the reconciler re-sends it
    _client(settings).send_task(
        task_name, args=[str(run_id)], queue=queue_name, priority=broker_priority,
        headers={REQUEST_ID_HEADER: request_id} if request_id else None,
        retry=True, retry_policy={"max_retries": 2, "interval_start": 0.2, "interval_step": 0.5, "interval_max": 1},
    )


def check_broker(settings: Settings) -> None:
    """Raise if the broker cannot be reached (used by /readyz)."""
    with _client(settings).connection_for_write() as connection:
        connection.ensure_connection(max_retries=1, timeout=2)


def prune_processed_messages(settings: Settings, older_than_s: float = 3600.0) -> int:
    """Embedded broker: delete consumed message files (kept so a consumer's move is atomic)."""
    if not settings.embedded_broker:
        return 0
    import time

    cutoff = time.time() - older_than_s
    removed = 0
    for path in (settings.broker_folder / "processed").glob("*.msg"):
        try:
            if path.stat().st_mtime < cutoff:
                path.unlink()
                removed += 1
        except FileNotFoundError:
            continue
    return removed
