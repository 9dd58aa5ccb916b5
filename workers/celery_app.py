"""The Celery application of the workers, configured from Settings (shared with the client)."""

from __future__ import annotations

from service.config import get_settings
from service.queue import create_celery_app

app = create_celery_app(get_settings(), name="mcdrop-worker")
app.conf.include = ["workers.tasks"]
