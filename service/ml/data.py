"""Tabular data: the builtin scikit-learn datasets, standardisation and train/validation splits."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from service.ml.nets import Task

BUILTIN_DATASETS: tuple[str, ...] = ("digits", "iris", "wine", "breast_cancer", "diabetes")


@dataclass
class Standardizer:
    """Per-column affine scaling ``(x - mean) / std``.

    Fitted on ``[N, D]`` features it holds ``[D]`` arrays; fitted on an ``[N]`` target it
    holds arrays of shape ``(1,)``. Constant columns get ``std = 1``.
    """

    mean: np.ndarray
    std: np.ndarray

    @classmethod
    def fit(cls, x: np.ndarray) -> Standardizer:
        x = np.asarray(x, dtype=np.float64)
        columns = x.reshape(len(x), -1)
        std = columns.std(axis=0)
        return cls(mean=columns.mean(axis=0), std=np.where(std > 0, std, 1.0))

    def transform(self, x: np.ndarray) -> np.ndarray:
        """Standardise; keeps a floating input dtype (float32 stays float32)."""
        x = np.asarray(x)
        return ((x - self.mean) / self.std).astype(np.result_type(x, np.float32), copy=False)

    def inverse_transform(self, z: np.ndarray) -> np.ndarray:
        """Map standardised values back to original units."""
        z = np.asarray(z)
        return (z * self.std + self.mean).astype(np.result_type(z, np.float32), copy=False)

    def to_dict(self) -> dict[str, list[float]]:
        return {"mean": self.mean.tolist(), "std": self.std.tolist()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Standardizer:
        mean, std = (np.asarray(data[key], dtype=np.float64) for key in ("mean", "std"))
        return cls(mean=mean, std=std)


@dataclass
class Dataset:
    """Features ``[N, D]`` float32 and target ``[N]`` (int64 class index or float32 value)."""

    features: np.ndarray
    target: np.ndarray
    task: Task
    feature_names: list[str]
    class_names: list[str] | None
    target_name: str

    @property
    def n_rows(self) -> int:
        return int(self.features.shape[0])

    @property
    def n_features(self) -> int:
        return int(self.features.shape[1])

    @property
    def n_classes(self) -> int | None:
        return None if self.class_names is None else len(self.class_names)


def load_builtin(name: str) -> Dataset:
    """Load one of :data:`BUILTIN_DATASETS` (bundled with scikit-learn, no download)."""
    from sklearn import datasets

    if name not in BUILTIN_DATASETS:
        raise ValueError(f"unknown builtin dataset {name!r}; choose one of {BUILTIN_DATASETS}")
    bunch = getattr(datasets, f"load_{name}")()
    features = np.asarray(bunch.data, dtype=np.float32)
    names = getattr(bunch, "feature_names", None)
    if names is None or len(names) != features.shape[1]:
        names = [f"x{i}" for i in range(features.shape[1])]
    feature_names = [str(f) for f in names]
    if name == "diabetes":
        return Dataset(features, np.asarray(bunch.target, dtype=np.float32), "regression",
                       feature_names, None, "disease_progression")
    return Dataset(features, np.asarray(bunch.target, dtype=np.int64), "classification",
                   feature_names, [str(c) for c in bunch.target_names], "class")


def split_indices(n_rows: int, validation_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic random split into sorted ``(train_idx, val_idx)``.

    The validation set has ``round(validation_fraction * n_rows)`` rows (at least one when the
    fraction is positive); a fraction of 0 gives an empty validation set.
    """
    if not 0.0 <= validation_fraction < 1.0:
        raise ValueError(f"validation_fraction must be in [0, 1), got {validation_fraction!r}")
    n_val = round(validation_fraction * n_rows)
    if validation_fraction > 0:
        n_val = max(n_val, 1)
    if n_rows - n_val < 1:
        raise ValueError(f"cannot keep a training row with {n_rows} rows and fraction {validation_fraction}")
    permutation = np.random.default_rng(seed).permutation(n_rows)
    return np.sort(permutation[n_val:]), np.sort(permutation[:n_val])
