"""Pure planning of a sweep: configurations × splits -> the nets to train, and the summary
statistics that rank configurations (no database, no torch)."""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass

import numpy as np

from service.sweeps.schemas import SweepCreate


@dataclass(frozen=True)
class Configuration:
    index: int
    hidden_layers: tuple[int, ...]
    dropout: float
    input_dropout: float
    tau: float | None
    prior_lengthscale: float | None
    weight_decay: float
    learning_rate: float

    def label(self) -> dict[str, object]:
        data = asdict(self)
        data["hidden_layers"] = list(self.hidden_layers)
        return data

    def penalty(self, n_train: int) -> float:
        """Our weight_decay (penalty (wd/2)·Σ‖W‖²): from the prior length-scale when given,
        reg = l²(1 − p) / (2 N τ) so wd = 2·reg (Gal & Ghahramani 2016), else as given."""
        if self.prior_lengthscale is not None and self.tau is not None:
            return self.prior_lengthscale**2 * (1.0 - self.dropout) / (n_train * self.tau)
        return self.weight_decay


def configurations(spec: SweepCreate) -> list[Configuration]:
    model, training, grid = spec.model, spec.training, spec.grid
    base_dropout = model.dropout_rates[0]
    axes = {
        "hidden_layers": [tuple(h) for h in grid.hidden_layers] if grid.hidden_layers else [tuple(model.hidden_layers)],
        "dropout": grid.dropout or [base_dropout],
        "input_dropout": grid.input_dropout or [model.input_dropout],
        "tau": grid.tau or [model.tau],
        "prior_lengthscale": grid.prior_lengthscale or [model.prior_lengthscale],
        "weight_decay": grid.weight_decay or [training.weight_decay],
        "learning_rate": grid.learning_rate or [training.learning_rate],
    }
    if spec.tie_input_dropout:
        axes["input_dropout"] = [None]
    result = []
    for values in itertools.product(*axes.values()):
        chosen = dict(zip(axes, values))
        if spec.tie_input_dropout:
            chosen["input_dropout"] = chosen["dropout"]
        result.append(Configuration(index=len(result), **chosen))
    return result


def splits(spec: SweepCreate, n_rows: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(train rows, test rows) per split: the given ones, or k folds of a seeded permutation.

    A fold's training rows keep the permutation's order (they are not sorted), so the validation
    rows that :func:`search_rows` takes from their end are a random sample too — also for data
    sets stored sorted by class or by target.
    """
    if spec.splits.given is not None:
        return [(np.asarray(s.train_indices, dtype=np.int64), np.asarray(s.test_indices, dtype=np.int64))
                for s in spec.splits.given]
    k = spec.splits.folds
    assert k is not None
    order = np.random.default_rng(spec.splits.seed).permutation(n_rows)
    folds = np.array_split(order, k)
    return [(np.concatenate(folds[:i] + folds[i + 1:]), np.sort(folds[i])) for i in range(k)]


def search_rows(train: np.ndarray, validation_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """The UCI protocol: the last ``validation_fraction`` of the training rows validate."""
    n_validation = max(1, round(validation_fraction * len(train)))
    return train[: len(train) - n_validation], train[len(train) - n_validation:]


def mean_and_standard_error(values: list[float]) -> dict[str, float | None]:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return {"mean": None, "se": None}
    mean = float(np.mean(finite))
    se = float(np.std(finite, ddof=0) / math.sqrt(len(finite))) if len(finite) > 1 else None
    return {"mean": mean, "se": se}


HIGHER_IS_BETTER = {"log_likelihood": True, "rmse": False, "nll": False, "accuracy": True, "brier": False}
# Validation metrics a sweep can rank by, per task; the first is the default.
RANKING_METRICS = {"regression": ("log_likelihood", "rmse"), "classification": ("nll", "accuracy", "brier")}


def default_metric(task: str) -> str:
    """The ranking metric of a sweep that names none: the (negative) log-likelihood of the task."""
    return RANKING_METRICS[task][0]


def best_index(values: list[float | None], metric: str) -> int:
    """Index of the best finite value (ties: the first)."""
    sign = 1.0 if HIGHER_IS_BETTER[metric] else -1.0
    scored = [(sign * v, -i) for i, v in enumerate(values) if v is not None and math.isfinite(v)]
    if not scored:
        return 0
    return -max(scored)[1]
