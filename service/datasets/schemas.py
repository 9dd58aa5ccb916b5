"""Pydantic schemas for datasets, named by role."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

Task = Literal["classification", "regression"]
BuiltinName = Literal["digits", "iris", "wine", "breast_cancer", "diabetes"]
DatasetName = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=200)]


class DatasetCreate(BaseModel):
    """Create a dataset from one of the built-in scikit-learn sets (JSON body)."""

    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"examples": [{"name": "digits", "builtin": "digits"}]}
    )

    name: DatasetName
    builtin: BuiltinName


class DatasetRead(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID
    name: str
    task: Task
    source: str
    n_rows: int
    n_features: int
    n_classes: int | None = Field(description="number of classes; null for regression")
    feature_names: list[str]
    class_names: list[str] | None
    target_name: str
    size_bytes: int
    created_at: datetime


class DatasetList(BaseModel):
    items: list[DatasetRead]
    next_cursor: str | None = Field(default=None, description="pass as ?cursor= for the next page; null on the last page")
