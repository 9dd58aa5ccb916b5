"""Imports every ORM module so that ``Base.metadata`` knows all tables (Alembic, tests)."""

from service.auth.models import ApiKeyRow
from service.batch_predictions.models import BatchPredictionChunkRow, BatchPredictionRow
from service.datasets.models import DatasetRow
from service.jobs.models import IdempotencyKeyRow, WebhookDeliveryRow, WorkerRow
from service.registry.models import ModelAliasRow, ModelVersionRow, RegisteredModelRow
from service.runs.models import (
    RunCheckpointRow,
    RunEventRow,
    RunMetricRow,
    RunResultRow,
    RunRow,
    RunWeightsRow,
)

__all__ = [
    "ApiKeyRow", "DatasetRow", "IdempotencyKeyRow", "RunCheckpointRow", "RunEventRow", "RunMetricRow", "RunResultRow", "RunRow",
    "RunWeightsRow", "WebhookDeliveryRow", "WorkerRow",
    "ModelAliasRow", "ModelVersionRow", "RegisteredModelRow",
    "BatchPredictionChunkRow", "BatchPredictionRow",
]
