"""Imports every ORM module so that ``Base.metadata`` knows all tables (Alembic, tests)."""

from service.datasets.models import DatasetRow
from service.runs.models import RunMetricRow, RunRow, RunWeightsRow

__all__ = ["DatasetRow", "RunMetricRow", "RunRow", "RunWeightsRow"]
