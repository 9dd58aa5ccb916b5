"""Pydantic schemas of the model registry and of acquisition, named by role."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

from service.runs.schemas import FiniteFloat

MODEL_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
ALIAS_PATTERN = r"^[a-z][a-z0-9_-]{0,63}$"
METRIC_PATTERN = r"^[a-z][a-z0-9_]*(\.[a-z0-9_]+){0,7}$"
DEFAULT_ALIAS = "production"

ModelName = Annotated[str, StringConstraints(pattern=MODEL_NAME_PATTERN)]
AliasName = Annotated[str, StringConstraints(pattern=ALIAS_PATTERN)]
GateOperator = Literal["<", "<=", ">", ">=", "==", "!="]
AcquisitionStrategy = Literal["bald", "predictive_entropy", "variation_ratio"]


class ModelVersionCreate(BaseModel):
    """Register a succeeded run as the next version of a named model (the model is created on
    first use)."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"name": "digits-classifier", "run_id": "00000000-0000-0000-0000-000000000000"}]},
    )

    name: ModelName = Field(description="1-128 characters of A-Z a-z 0-9 . _ -, starting with a letter or digit")
    run_id: uuid.UUID = Field(description="a succeeded training run of the caller")


class GateCondition(BaseModel):
    """``evaluation[metric] op value`` must hold for a version to take the alias."""

    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"examples": [{"metric": "mc.ece", "op": "<=", "value": 0.05}]},
    )

    metric: Annotated[str, StringConstraints(pattern=METRIC_PATTERN, max_length=128)] = Field(
        description="dotted path into the run's stored evaluation (GET /v1/runs/{id}/evaluation), "
                    "e.g. mc.ece, mc.accuracy, mc.auroc_mutual_information, mc.rmse, mc.log_likelihood, "
                    "deterministic.accuracy, n",
    )
    op: GateOperator
    value: FiniteFloat


class AliasGatesUpdate(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"conditions": [
            {"metric": "mc.ece", "op": "<=", "value": 0.05},
            {"metric": "mc.accuracy", "op": ">=", "value": 0.9},
            {"metric": "mc.auroc_mutual_information", "op": ">=", "value": 0.8},
        ]}]},
    )

    conditions: list[GateCondition] = Field(max_length=32, description="all must hold; [] removes the gates")


class AliasMove(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"version": 3}]})

    version: int = Field(ge=1, le=2**31 - 1)


class AliasRead(BaseModel):
    alias: str
    version: int | None = Field(description="the version it points at; null: gates set, never moved")
    run_id: uuid.UUID | None
    gates: list[GateCondition]
    generation: int = Field(description="how many times it moved")
    updated_at: datetime


class ModelVersionRead(BaseModel):
    name: str
    version: int
    run_id: uuid.UUID
    aliases: list[str]
    created_at: datetime


class ModelVersionList(BaseModel):
    items: list[ModelVersionRead]
    next_cursor: str | None = Field(default=None, description="pass as ?cursor= for the next page; null on the last page")


class RegisteredModelRead(BaseModel):
    name: str
    latest_version: int | None
    aliases: list[AliasRead]
    created_at: datetime
    updated_at: datetime


class RegisteredModelList(BaseModel):
    items: list[RegisteredModelRead]
    next_cursor: str | None = Field(default=None, description="pass as ?cursor= for the next page; null on the last page")


class AcquireRequest(BaseModel):
    """A pool of unlabelled rows to rank for labelling: inline ``inputs`` or a ``dataset_id`` of
    the caller (its features; its target is ignored)."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"inputs": [[0.0, 1.0], [3.0, -1.0]], "k": 1, "strategy": "bald",
                                         "samples": 100, "seed": 0}]},
    )

    inputs: list[list[FiniteFloat]] | None = Field(default=None, min_length=1)
    dataset_id: uuid.UUID | None = None
    k: int = Field(default=10, ge=1, le=10_000, description="how many rows to return (at most the pool's size)")
    strategy: AcquisitionStrategy = Field(
        default="bald",
        description="bald: mutual information between prediction and weights (epistemic); predictive_entropy: "
                    "total uncertainty; variation_ratio: 1 - share of the T passes that voted for the modal class. "
                    "Regression models take predictive_entropy only (of the Gaussian with the predictive std).",
    )
    samples: int = Field(default=100, ge=1, le=10_000, description="T, the number of stochastic passes")
    seed: int | None = Field(default=None, ge=0, lt=2**63, description="same seed and pool: same ranking; omitted: one is chosen and returned")

    @model_validator(mode="after")
    def _one_pool(self) -> AcquireRequest:
        if (self.inputs is None) == (self.dataset_id is None):
            raise ValueError("give the pool as exactly one of inputs or dataset_id")
        return self


class AcquiredRow(BaseModel):
    index: int = Field(description="0-based row of the pool")
    score: float = Field(description="the strategy's score; rows are sorted by it, highest first (ties: lower index first)")
    predictive_entropy: float | None = None
    expected_entropy: float | None = None
    mutual_information: float | None = None
    variation_ratio: float | None = None
    predicted_class: int | None = None
    label: str | None = None
    mean: float | None = Field(default=None, description="regression only")
    std: float | None = Field(default=None, description="regression only")


class AcquireResponse(BaseModel):
    name: str
    version: int
    run_id: uuid.UUID
    task: str
    strategy: AcquisitionStrategy
    samples: int
    seed: int
    pool_size: int
    items: list[AcquiredRow]
