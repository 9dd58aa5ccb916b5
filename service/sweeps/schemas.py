"""Pydantic schemas for sweeps: a grid of configurations × data splits, trained by workers."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from service.runs.schemas import ModelSpec, RowIndex, TrainingSpec

PositiveFloat = Annotated[float, Field(gt=0, allow_inf_nan=False)]
Rate = Annotated[float, Field(ge=0, lt=1)]


class SweepGrid(BaseModel):
    """Values to combine (Cartesian product); a key left out keeps the base spec's value."""

    model_config = ConfigDict(extra="forbid")

    dropout: list[Rate] | None = Field(default=None, min_length=1, max_length=50)
    input_dropout: list[Rate] | None = Field(default=None, min_length=1, max_length=50)
    tau: list[PositiveFloat] | None = Field(default=None, min_length=1, max_length=50)
    prior_lengthscale: list[PositiveFloat] | None = Field(default=None, min_length=1, max_length=50)
    weight_decay: list[Annotated[float, Field(ge=0, allow_inf_nan=False)]] | None = Field(default=None, min_length=1, max_length=50)
    hidden_layers: list[list[Annotated[int, Field(ge=1, le=4096)]]] | None = Field(default=None, min_length=1, max_length=20)
    learning_rate: list[Annotated[float, Field(gt=0, le=10)]] | None = Field(default=None, min_length=1, max_length=50)


class GivenSplit(BaseModel):
    model_config = ConfigDict(extra="forbid")

    train_indices: list[RowIndex] = Field(min_length=2)
    test_indices: list[RowIndex] = Field(min_length=1)


class SplitsSpec(BaseModel):
    """Either explicit splits (e.g. the published UCI ones) or k folds."""

    model_config = ConfigDict(extra="forbid")

    given: list[GivenSplit] | None = Field(default=None, min_length=1, max_length=100)
    folds: int | None = Field(default=None, ge=2, le=50)
    seed: int = 0

    @model_validator(mode="after")
    def _one_kind(self) -> SplitsSpec:
        if (self.given is None) == (self.folds is None):
            raise ValueError("give either `given` splits or a number of `folds`")
        return self


SweepMetric = Literal["log_likelihood", "rmse", "nll", "accuracy", "brier"]


class SweepCreate(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{
            "dataset_id": "00000000-0000-0000-0000-000000000000",
            "model": {"hidden_layers": [50], "dropout": 0.05, "input_dropout": 0.05, "prior_lengthscale": 0.01, "tau": 0.1},
            "training": {"epochs": 400, "batch_size": 128, "learning_rate": 0.001, "validation_fraction": 0.2, "seed": 0},
            "grid": {"dropout": [0.005, 0.01, 0.05, 0.1], "tau": [0.1, 0.15, 0.2]},
            "tie_input_dropout": True,
            "splits": {"folds": 5},
            "metric": "log_likelihood",
            "retrain_best": True,
            "search_samples": 100,
            "test_samples": 10000,
        }]},
    )

    dataset_id: uuid.UUID
    model: ModelSpec = Field(default_factory=lambda: ModelSpec(hidden_layers=[50], dropout=0.05))
    training: TrainingSpec = Field(default_factory=lambda: TrainingSpec(epochs=40, batch_size=128))
    grid: SweepGrid = Field(default_factory=SweepGrid)
    tie_input_dropout: bool = Field(
        default=False, description="input dropout = the configuration's dropout rate (the UCI protocol)"
    )
    splits: SplitsSpec = Field(default_factory=lambda: SplitsSpec(folds=5))
    metric: SweepMetric | None = Field(
        default=None,
        description="validation metric that ranks configurations: log_likelihood (default) or rmse for "
        "regression; nll (default), accuracy or brier (MC dropout predictions) for classification",
    )
    retrain_best: bool = Field(
        default=True,
        description="retrain each split's best configuration on the split's training rows and evaluate it on its test rows",
    )
    test_every_configuration: bool = Field(
        default=False,
        description="also score every configuration's search nets (trained on the split's training rows "
        "less the validation rows) on the split's test rows: reported per configuration, never used for ranking",
    )
    search_samples: int = Field(default=100, ge=1, le=10_000, description="T for the validation metric")
    test_samples: int = Field(default=10_000, ge=1, le=10_000, description="T for the test metrics")
    priority: int = Field(default=0, ge=0, le=9)
    device: Literal["auto", "cpu", "cuda"] = "auto"


class MeanSE(BaseModel):
    mean: float | None
    se: float | None


class SweepRead(BaseModel):
    id: uuid.UUID
    dataset_id: uuid.UUID
    status: str
    spec: dict[str, Any]
    n_configurations: int
    n_splits: int
    epochs_done: int
    epochs_total: int
    error: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    results: dict[str, Any] | None = Field(
        default=None,
        description="ranking of configurations (mean ± SE over splits of the validation metrics; for "
        "classification also the training rows' metrics and the validation − training gap) and, with "
        "retrain_best, the per-split test metrics of each split's best configuration with mean ± SE "
        "(regression: RMSE and log-likelihood; classification: accuracy, NLL, Brier score, ECE and AUROCs "
        "of MC dropout beside the deterministic net's accuracy, NLL, Brier score and ECE)",
    )


class SweepList(BaseModel):
    items: list[SweepRead]
    next_cursor: str | None = Field(default=None, description="pass as ?cursor= for the next page; null on the last page")
