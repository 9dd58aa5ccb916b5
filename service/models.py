"""Imports every ORM module so that ``Base.metadata`` knows all tables (Alembic, tests)."""

from service.datasets.models import DatasetRow
from service.jobs.models import IdempotencyKeyRow, WebhookDeliveryRow, WorkerRow
from service.runs.models import (
    RunCheckpointRow,
    RunEventRow,
    RunMetricRow,
    RunResultRow,
    RunRow,
    RunWeightsRow,
)

__all__ = [
    "DatasetRow", "IdempotencyKeyRow", "RunCheckpointRow", "RunEventRow", "RunMetricRow", "RunResultRow", "RunRow",
    "RunWeightsRow", "WebhookDeliveryRow", "WorkerRow",
]
