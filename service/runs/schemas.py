"""Pydantic schemas for runs and predictions, named by role."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, HttpUrl, UrlConstraints, field_validator, model_validator

DropoutRate = Annotated[float, Field(ge=0.0, lt=1.0)]
FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]
RunStatusName = Literal["queued", "running", "succeeded", "failed", "cancelled"]


class ModelSpec(BaseModel):
    """The network: an MLP with a dropout rate per hidden layer."""

    model_config = ConfigDict(extra="forbid")

    hidden_layers: list[Annotated[int, Field(ge=1, le=8192)]] = Field(
        default=[64, 64], min_length=1, max_length=32
    )
    dropout: float | list[float] = Field(
        default=0.5,
        description="rate in [0, 1): one for every hidden layer, or a list with one per hidden layer",
    )
    input_dropout: DropoutRate = 0.0
    activation: Literal["relu", "tanh", "gelu"] = "relu"
    tau: Annotated[float, Field(gt=0, allow_inf_nan=False)] | None = Field(
        default=None,
        description=(
            "regression only: model precision (inverse aleatoric variance, in the target's "
            "units). Omitted: estimated from the held-out residuals after training."
        ),
    )
    prior_lengthscale: Annotated[float, Field(gt=0, allow_inf_nan=False)] | None = Field(
        default=None,
        description=(
            "regression, with tau: derive the L2 weight decay from a Gaussian prior of this "
            "length-scale, reg = l²(1 − p) / (2 N τ) (Gal & Ghahramani 2016), p the hidden "
            "dropout rate and N the training rows; excludes training.weight_decay"
        ),
    )
    heteroscedastic: bool = Field(
        default=False,
        description="regression only: also learn the noise variance per input (Gaussian NLL loss)",
    )

    @field_validator("dropout")
    @classmethod
    def _dropout_rates_in_range(cls, value: float | list[float]) -> float | list[float]:
        for rate in value if isinstance(value, list) else [value]:
            if not 0.0 <= rate < 1.0:
                raise ValueError(f"dropout rate {rate} is outside [0, 1)")
        return value

    @model_validator(mode="after")
    def _dropout_per_layer(self) -> ModelSpec:
        if isinstance(self.dropout, list) and len(self.dropout) != len(self.hidden_layers):
            raise ValueError(
                f"dropout has {len(self.dropout)} rates for {len(self.hidden_layers)} hidden layers"
            )
        return self

    @property
    def dropout_rates(self) -> list[float]:
        if isinstance(self.dropout, list):
            return list(self.dropout)
        return [self.dropout] * len(self.hidden_layers)


RowIndex = Annotated[int, Field(ge=0)]


class SplitSpec(BaseModel):
    """Explicit rows (0-based) of the dataset, e.g. the published splits of a benchmark."""

    model_config = ConfigDict(extra="forbid")

    train_indices: list[RowIndex] = Field(min_length=1)
    validation_indices: list[RowIndex] | None = Field(
        default=None,
        description="omitted: the last validation_fraction of train_indices (the UCI protocol)",
    )
    test_indices: list[RowIndex] | None = Field(default=None, description="evaluated after training")


class EvaluationSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    samples: int = Field(default=100, ge=1, le=10_000, description="T for the MC evaluation")


class TrainingSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    epochs: int = Field(default=10, ge=1, le=100_000)
    batch_size: int = Field(default=32, ge=1, le=65_536)
    optimizer: Literal["adam", "sgd"] = "adam"
    learning_rate: float = Field(default=1e-3, gt=0, le=10, allow_inf_nan=False)
    momentum: float = Field(default=0.9, ge=0, lt=1, description="SGD only")
    weight_decay: float = Field(
        default=0.0, ge=0, allow_inf_nan=False,
        description="L2 penalty (weight_decay/2)·Σ‖W‖² on weight matrices (not biases)",
    )
    l1: float = Field(default=0.0, ge=0, allow_inf_nan=False, description="L1 penalty l1·Σ|W| on weights")
    validation_fraction: float = Field(default=0.2, ge=0, le=0.9)
    seed: int | None = Field(
        default=None, ge=0, lt=2**63,
        description="makes the run reproducible; omitted: the service picks one and records it",
    )


class RunCreate(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [{
                "dataset_id": "00000000-0000-0000-0000-000000000000",
                "model": {"hidden_layers": [64, 64], "dropout": 0.5},
                "training": {"epochs": 10, "batch_size": 32, "optimizer": "adam",
                             "learning_rate": 0.001, "weight_decay": 0, "l1": 0,
                             "validation_fraction": 0.2, "seed": 0},
            }]
        },
    )

    dataset_id: uuid.UUID
    model: ModelSpec = Field(default_factory=ModelSpec)
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    split: SplitSpec | None = Field(default=None, description="explicit train/validation/test rows")
    evaluation: EvaluationSpec = Field(default_factory=EvaluationSpec)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    priority: int = Field(default=0, ge=0, le=9, description="0..9, higher is more urgent (honoured on Redis)")
    callback_url: Annotated[HttpUrl, UrlConstraints(max_length=2000, allowed_schemes=["http", "https"])] | None = Field(
        default=None, description="http(s) URL that receives a signed POST on every terminal state"
    )


class EpochMetricsRead(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    epoch: int
    train_loss: float
    val_loss: float | None = None
    train_accuracy: float | None = None
    val_accuracy: float | None = None
    train_rmse: float | None = None
    val_rmse: float | None = None
    duration_s: float


class RunRead(BaseModel):
    id: uuid.UUID
    dataset_id: uuid.UUID
    task: str
    status: RunStatusName
    spec: dict[str, Any]
    priority: int
    callback_url: str | None
    cancel_requested: bool
    attempts: int
    epochs_done: int
    epochs_total: int
    latest_metrics: EpochMetricsRead | None
    device: str | None
    error: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None


class RunList(BaseModel):
    items: list[RunRead]
    next_cursor: str | None = Field(default=None, description="pass as ?cursor= for the next page; null on the last page")


class MetricsList(BaseModel):
    run_id: uuid.UUID
    items: list[EpochMetricsRead]


class PredictRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"inputs": [[0.0, 1.0]], "samples": 100, "seed": 7}]},
    )

    inputs: list[list[FiniteFloat]] = Field(min_length=1)
    samples: int = Field(default=100, ge=1, le=10_000, description="T, the number of stochastic passes")
    seed: int | None = Field(default=None, ge=0, lt=2**63, description="same seed, same inputs: same result")


class DeterministicClassification(BaseModel):
    """The weight-scaled (dropout off) prediction, for comparison."""

    label: str
    class_index: int
    probabilities: list[float]


class DeterministicRegression(BaseModel):
    """The weight-scaled (dropout off) prediction, for comparison."""

    mean: float


class Interval(BaseModel):
    lower: float
    upper: float


class ClassificationOutput(BaseModel):
    label: str
    class_index: int
    probabilities: list[float]
    probabilities_std: list[float]
    predictive_entropy: float
    expected_entropy: float
    mutual_information: float
    deterministic: DeterministicClassification


class RegressionOutput(BaseModel):
    mean: float
    std: float
    epistemic_std: float
    aleatoric_std: float
    interval_95: Interval
    deterministic: DeterministicRegression


class PredictResponse(BaseModel):
    run_id: uuid.UUID
    task: str
    samples: int
    seed: int | None
    class_names: list[str] | None = None
    predictions: list[ClassificationOutput] | list[RegressionOutput]
