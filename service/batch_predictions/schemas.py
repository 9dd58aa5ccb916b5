"""Pydantic schemas for batch prediction jobs, named by role."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    HttpUrl,
    StringConstraints,
    UrlConstraints,
    field_validator,
    model_validator,
)

from service.runs.schemas import RunStatusName

# Rows are sampled in blocks of this many, block b with a seed derived from (seed, b): the
# results depend on the seed only, never on how the job is chunked (see execution.block_seed).
SEED_BLOCK_ROWS = 64
DEFAULT_CHUNK_ROWS = 1024
MAX_CHUNK_ROWS = 65_536

ModelName = Annotated[str, StringConstraints(min_length=1, max_length=128)]
AliasName = Annotated[str, StringConstraints(min_length=1, max_length=64)]


class ModelReference(BaseModel):
    """A registered model by name and alias (default ``production``) or version."""

    model_config = ConfigDict(extra="forbid")

    name: ModelName
    alias: AliasName | None = None
    version: int | None = Field(default=None, ge=1, le=2**31 - 1)

    @model_validator(mode="after")
    def _alias_or_version(self) -> ModelReference:
        if self.alias is not None and self.version is not None:
            raise ValueError("give either alias or version, not both")
        return self


class BatchPredictionOptions(BaseModel):
    """Everything but the input: which model, how to sample, how the job is queued."""

    model_config = ConfigDict(extra="forbid")

    run_id: uuid.UUID | None = Field(default=None, description="a succeeded training run of the caller")
    model: ModelReference | None = Field(default=None, description="or a registered model (resolved when submitted)")
    samples: int = Field(default=100, ge=1, le=10_000, description="T, the number of stochastic passes per row")
    seed: int | None = Field(
        default=None, ge=0, lt=2**63,
        description="the same seed gives the same results; omitted: the service picks one and records it",
    )
    interval_level: float | None = Field(
        default=None, gt=0, lt=1, allow_inf_nan=False,
        description="regression only: central probability of the [lower, upper] interval (default 0.95)",
    )
    chunk_rows: int = Field(
        default=DEFAULT_CHUNK_ROWS, ge=SEED_BLOCK_ROWS, le=MAX_CHUNK_ROWS,
        description=f"rows per progress step and stored chunk, a multiple of {SEED_BLOCK_ROWS}; does not change the results",
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        default="cpu",
        description="cpu (default) reproduces POST /v1/runs/{id}/predict bit for bit; auto/cuda use a worker's GPU",
    )
    priority: int = Field(default=0, ge=0, le=9, description="0..9, higher is more urgent (honoured on Redis)")
    callback_url: Annotated[HttpUrl, UrlConstraints(max_length=2000, allowed_schemes=["http", "https"])] | None = Field(
        default=None, description="http(s) URL that receives a signed POST on every terminal state"
    )

    @model_validator(mode="after")
    def _one_model(self) -> BatchPredictionOptions:
        if (self.run_id is None) == (self.model is None):
            raise ValueError("give either run_id or model")
        return self

    @field_validator("chunk_rows")
    @classmethod
    def _whole_blocks(cls, value: int) -> int:
        if value % SEED_BLOCK_ROWS:
            raise ValueError(f"chunk_rows must be a multiple of {SEED_BLOCK_ROWS}")
        return value


class BatchPredictionCreate(BatchPredictionOptions):
    """JSON body: predict every row of a dataset of the caller (its feature columns must be
    the model's features; its target is carried along)."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [
            {"run_id": "00000000-0000-0000-0000-000000000000", "dataset_id": "00000000-0000-0000-0000-000000000001",
             "samples": 100, "seed": 7},
            {"model": {"name": "digits", "alias": "production"}, "dataset_id": "00000000-0000-0000-0000-000000000001"},
        ]},
    )

    dataset_id: uuid.UUID


class ModelUsed(BaseModel):
    run_id: uuid.UUID
    name: str | None = None
    alias: str | None = None
    version: int | None = None


class InputRead(BaseModel):
    source: Literal["dataset", "upload"]
    dataset_id: uuid.UUID | None = None
    filename: str | None = None
    rows: int


class BatchPredictionRead(BaseModel):
    id: uuid.UUID
    status: RunStatusName
    task: str
    model: ModelUsed
    input: InputRead
    samples: int
    seed: int
    interval_level: float | None = Field(description="regression: the [lower, upper] interval's level; null otherwise")
    chunk_rows: int
    device: str = Field(description="requested device (auto, cpu, cuda)")
    priority: int
    callback_url: str | None
    rows_done: int
    rows_total: int
    progress: float = Field(description="rows_done / rows_total")
    columns: list[str] = Field(description="the columns of the results, in order")
    cancel_requested: bool
    attempts: int
    worker_device: str | None = Field(description="where it ran (cpu, cuda)")
    error: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None


class BatchPredictionList(BaseModel):
    items: list[BatchPredictionRead]
    next_cursor: str | None = Field(default=None, description="pass as ?cursor= for the next page; null on the last page")


ResultFormat = Literal["csv", "parquet"]
