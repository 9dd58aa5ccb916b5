"""The Celery application of the workers, configured from Settings (shared with the client)."""

from __future__ import annotations

from typing import Any

from celery.signals import task_postrun, worker_ready

from service.config import get_settings
from service.queue import create_celery_app, prune_processed_messages

app = create_celery_app(get_settings(), name="mcdrop-worker")
app.conf.include = ["workers.tasks"]


@worker_ready.connect
@task_postrun.connect
def _prune_embedded_broker(**_: Any) -> None:
    prune_processed_messages(get_settings())
