"""The Celery application of the workers, configured from Settings (shared with the client)."""

from __future__ import annotations

from typing import Any

from celery.signals import task_postrun, worker_ready

from service.config import get_settings
from service.queue import create_celery_app, prune_processed_messages
from workers.daemon import WorkerDaemon, get_daemon

app = create_celery_app(get_settings(), name="mcdrop-worker")
app.conf.include = ["workers.tasks"]


def _queues() -> list[str]:
    consumer = getattr(app, "amqp", None)
    try:
        return sorted(consumer.queues.consume_from.keys()) if consumer and consumer.queues.consume_from else ["cpu"]
    except Exception:
        return ["cpu"]


def daemon() -> WorkerDaemon:
    import torch

    settings = get_settings()
    device = "cuda" if settings.device != "cpu" and torch.cuda.is_available() else "cpu"
    return get_daemon(settings, _queues(), device)


@worker_ready.connect
def _start_daemon(**_: Any) -> None:
    daemon()
    prune_processed_messages(get_settings())


@task_postrun.connect
def _prune_embedded_broker(**_: Any) -> None:
    prune_processed_messages(get_settings())
