"""Predicting a batch job's rows, chunk by chunk, with the MC engine the API serves with.

Pure orchestration of service.ml (no database): the worker's runner loads a ``PreparedJob``
and saves each chunk's outputs with the job's progress.

Reproducibility: rows are sampled in blocks of ``SEED_BLOCK_ROWS`` (64) — block ``b`` (rows
64b .. 64b+63 of the input; the last block padded with zero rows) with the seed
``block_seed(seed, b)`` — exactly as POST /v1/runs/{id}/predict samples those 64 rows with that
seed. So a row's result depends only on the model, its features, its index, T and the seed:
neither the chunk size, a resumption, nor the rows around it change its dropout masks, and any
block can be checked against the online endpoint (equal up to float32 rounding, which depends
on the number of threads of the matrix products; bit for bit with the same).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Collection
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np
import pyarrow as pa
import torch

from service.batch_predictions.inputs import BatchInput, table_to_ipc
from service.batch_predictions.schemas import SEED_BLOCK_ROWS
from service.ml.mc import (
    NORMAL_95_QUANTILE,
    heteroscedastic_to_original_units,
    sample_outputs,
    summarize_classification,
    summarize_regression,
    summarize_regression_heteroscedastic,
)
from service.ml.training import TrainingCancelled
from service.runs.modelling import TrainedModel

CLASSIFICATION_COLUMNS = ("predictive_entropy", "expected_entropy", "mutual_information", "variation_ratio")
REGRESSION_COLUMNS = ("mean", "std", "epistemic_std", "aleatoric_std", "lower", "upper")


def block_seed(seed: int, block: int) -> int:
    """The seed of rows ``64 * block .. 64 * block + 63``: the first 63 bits of
    SHA-256("mcdrop-batch-prediction:<seed>:<block>"), big-endian."""
    digest = hashlib.sha256(f"mcdrop-batch-prediction:{seed}:{block}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def interval_quantile(level: float) -> float:
    """z with P(|N(0, 1)| <= z) = level (the online endpoint's constant for 0.95)."""
    return NORMAL_95_QUANTILE if level == 0.95 else NormalDist().inv_cdf(0.5 + level / 2)


def output_columns(task: str, class_names: list[str]) -> list[str]:
    if task == "classification":
        return ["predicted_class", *(f"prob_{name}" for name in class_names), *CLASSIFICATION_COLUMNS]
    return list(REGRESSION_COLUMNS)


def result_columns(task: str, class_names: list[str], *, has_ids: bool, has_target: bool) -> list[str]:
    """``row`` (0-based index in the input), the carried ``id`` and ``target``, then the outputs."""
    return ["row", *(["id"] if has_ids else []), *(["target"] if has_target else []), *output_columns(task, class_names)]


def chunk_count(n_rows: int, chunk_rows: int) -> int:
    return -(-n_rows // chunk_rows)


def variation_ratio(logit_samples: torch.Tensor) -> np.ndarray:
    """1 - (passes voting for the modal class) / T, per row of logits ``[T, B, C]``."""
    samples, rows, classes = logit_samples.shape
    votes = logit_samples.argmax(dim=-1).t()  # [B, T]
    counts = torch.zeros(rows, classes, dtype=torch.int64, device=votes.device)
    counts.scatter_add_(1, votes, torch.ones_like(votes))
    return (1.0 - counts.max(dim=1).values.to(torch.float64) / samples).cpu().numpy()


def class_names_of(model: TrainedModel) -> list[str]:
    return list(model.class_names) if model.class_names else [str(i) for i in range(model.network.n_outputs)]


def predict_rows(
    model: TrainedModel, features: np.ndarray, *, samples: int, seed: int, first_block: int,
    interval_level: float | None,
) -> dict[str, pa.Array]:
    """The output columns for ``features`` (rows of blocks ``first_block``, ``first_block + 1``, ...)."""
    parts: dict[str, list[np.ndarray]] = {}

    shift = scale = 0.0
    if model.task == "regression":
        assert model.target_scaler is not None
        shift, scale = float(model.target_scaler.mean.reshape(-1)[0]), float(model.target_scaler.std.reshape(-1)[0])
    for block, start in enumerate(range(0, len(features), SEED_BLOCK_ROWS), start=first_block):
        x = torch.as_tensor(model.input_scaler.transform(features[start:start + SEED_BLOCK_ROWS]), dtype=torch.float32)
        rows = x.shape[0]
        if rows < SEED_BLOCK_ROWS:  # the input's last block: padded, so each row keeps its masks
            x = torch.cat([x, x.new_zeros(SEED_BLOCK_ROWS - rows, x.shape[1])])
        # Summarised whole, then only the real rows kept: the same shapes, the same float rounding.
        outputs = sample_outputs(model.net, x, samples, block_seed(seed, block))

        def add(name: str, values: np.ndarray, rows: int = rows) -> None:
            parts.setdefault(name, []).append(np.asarray(values)[:rows])

        if model.task == "classification":
            summary = summarize_classification(outputs)
            add("label", summary.label)
            add("probabilities", summary.probabilities)
            add("predictive_entropy", summary.predictive_entropy)
            add("expected_entropy", summary.expected_entropy)
            add("mutual_information", summary.mutual_information)
            add("variation_ratio", variation_ratio(outputs))
            continue
        if model.heteroscedastic:
            regression = summarize_regression_heteroscedastic(
                *heteroscedastic_to_original_units(outputs, shift=shift, scale=scale))
        else:
            assert model.tau is not None
            regression = summarize_regression(outputs[..., 0].to(torch.float64) * scale + shift, model.tau)
        add("mean", regression.mean)
        add("std", regression.std)
        add("epistemic_std", regression.epistemic_std)
        add("aleatoric_std", np.broadcast_to(np.asarray(regression.aleatoric_std, dtype=np.float64), regression.mean.shape))
    joined = {name: np.concatenate(values) for name, values in parts.items()}
    if model.task == "classification":
        names = class_names_of(model)
        columns = {"predicted_class": pa.array(np.asarray(names, dtype=object)[joined["label"]], pa.string())}
        for c, name in enumerate(names):
            columns[f"prob_{name}"] = pa.array(joined["probabilities"][:, c], pa.float64())
        for name in CLASSIFICATION_COLUMNS:
            columns[name] = pa.array(joined[name], pa.float64())
        return columns
    z = interval_quantile(interval_level if interval_level is not None else 0.95)
    mean, std = joined["mean"], joined["std"]
    joined["lower"], joined["upper"] = mean - z * std, mean + z * std
    return {name: pa.array(joined[name], pa.float64()) for name in REGRESSION_COLUMNS}


@dataclass
class PreparedJob:
    """A batch job ready to run: the model, its input rows (model feature order) and options."""

    model: TrainedModel
    rows: BatchInput
    samples: int
    seed: int
    interval_level: float | None
    chunk_rows: int
    columns: list[str]

    @property
    def n_chunks(self) -> int:
        return chunk_count(self.rows.n_rows, self.chunk_rows)

    def bounds(self, chunk: int) -> tuple[int, int]:
        start = chunk * self.chunk_rows
        return start, min(start + self.chunk_rows, self.rows.n_rows)

    def predict_chunk(self, chunk: int) -> pa.Table:
        """The chunk's rows of the results (``self.columns``)."""
        start, stop = self.bounds(chunk)
        columns: dict[str, pa.Array] = {"row": pa.array(np.arange(start, stop, dtype=np.int64))}
        if self.rows.ids is not None:
            columns["id"] = self.rows.ids.slice(start, stop - start)
        if self.rows.target is not None:
            columns["target"] = self.rows.target.slice(start, stop - start)
        columns.update(predict_rows(
            self.model, self.rows.features[start:stop], samples=self.samples, seed=self.seed,
            first_block=start // SEED_BLOCK_ROWS, interval_level=self.interval_level,
        ))
        table = pa.table(columns)
        if table.column_names != self.columns:
            raise ValueError(f"the chunk's columns {table.column_names} are not the job's {self.columns}")
        return table


def run(
    job: PreparedJob, *, done: Collection[int], save: Callable[[int, int, bytes], None],
    should_stop: Callable[[], bool] = lambda: False,
) -> None:
    """Predict every chunk not in ``done``, in order, handing each to ``save(chunk, rows, ipc)``.

    Between chunks ``should_stop()`` is asked: True raises TrainingCancelled (the runner puts
    the job back in the queue or ends it cancelled; the saved chunks are kept and not redone).
    """
    rows_done = sum(job.bounds(chunk)[1] - job.bounds(chunk)[0] for chunk in done)
    for chunk in range(job.n_chunks):
        if chunk in done:
            continue
        if should_stop():
            raise TrainingCancelled(rows_done, mid_epoch=False)
        table = job.predict_chunk(chunk)
        save(chunk, table.num_rows, table_to_ipc(table))
        rows_done += table.num_rows
