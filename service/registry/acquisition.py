"""Acquisition for active learning: rank a pool of unlabelled rows by a registered model's
uncertainty and return the top k (scores from service.ml.acquisition).

The pool is sampled in chunks of ``acquire_chunk_rows`` rows so memory stays bounded; chunk i
uses its own seed derived from the request's seed and i, so a seed reproduces the ranking
exactly (for the same pool, T and chunk size).
"""

from __future__ import annotations

import secrets

import numpy as np
from sqlalchemy.orm import Session

from service.config import Settings
from service.datasets import service as datasets
from service.errors import InvalidInput, NotFound
from service.ml.acquisition import classification_scores, gaussian_entropy, top_k
from service.ml.mc import sample_outputs
from service.registry.schemas import AcquiredRow, AcquireRequest, AcquireResponse
from service.registry.serving import ServingAliases, serving_model
from service.runs.inference import ModelCache
from service.runs.inputs import feature_matrix
from service.runs.modelling import TrainedModel


def chunk_seed(seed: int, chunk: int) -> int:
    """An independent 63-bit seed for chunk ``chunk`` of a request seeded with ``seed``."""
    state = np.random.SeedSequence([seed, chunk]).generate_state(2, np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1])) % 2**63


def _invalid(msg: str, loc: list[object], detail: str, kind: str = "value_error") -> InvalidInput:
    return InvalidInput(detail, errors=[{"loc": loc, "msg": msg, "type": kind}])


def _pool(session: Session, settings: Settings, request: AcquireRequest, n_features: int, tenant_id: str) -> np.ndarray:
    """The pool's features ``[N, D]`` float32, checked against the model and the limits."""
    if request.dataset_id is not None:
        try:
            row = datasets.get_row(session, request.dataset_id, tenant_id)
        except NotFound:
            raise _invalid("no such dataset", ["body", "dataset_id"], f"dataset {request.dataset_id} does not exist",
                           "not_found") from None
        if row.n_features != n_features:
            raise _invalid(f"{row.n_features} features, the model takes {n_features}", ["body", "dataset_id"],
                           f"the dataset has {row.n_features} features; the model takes {n_features}")
        if row.n_rows > settings.acquire_max_pool_rows:
            raise _invalid(f"{row.n_rows} rows", ["body", "dataset_id"],
                           f"at most {settings.acquire_max_pool_rows} pool rows", "too_long")
        return datasets.load_arrays(session, row.id).features.astype(np.float32, copy=False)
    assert request.inputs is not None
    if len(request.inputs) > settings.acquire_max_pool_rows:
        raise _invalid(f"{len(request.inputs)} rows", ["body", "inputs"],
                       f"at most {settings.acquire_max_pool_rows} pool rows", "too_long")
    return feature_matrix(request.inputs, n_features, noun="pool row")


def _check_request(settings: Settings, request: AcquireRequest, model: TrainedModel) -> None:
    if request.samples > settings.max_samples:
        raise _invalid(f"{request.samples} samples", ["body", "samples"], f"at most {settings.max_samples} samples",
                       "too_large")
    if model.task == "regression" and request.strategy != "predictive_entropy":
        raise _invalid(
            "regression models take strategy predictive_entropy", ["body", "strategy"],
            f"strategy {request.strategy} needs a classifier (class probabilities per pass); for a regression "
            "model use predictive_entropy (the Gaussian entropy of the predictive std)",
        )


def acquire(
    session: Session, settings: Settings, cache: ModelCache, aliases: ServingAliases, tenant_id: str, name: str,
    request: AcquireRequest, *, alias: str | None = None, version: int | None = None,
) -> AcquireResponse:
    """The top ``k`` rows of the pool by ``request.strategy`` (blocking: call from a thread)."""
    target = aliases.resolve(session, tenant_id, name, alias, version)
    model = serving_model(settings, cache, target.run_id, tenant_id)
    _check_request(settings, request, model)
    pool = _pool(session, settings, request, model.network.n_inputs, tenant_id)
    n_rows = len(pool)
    if n_rows * request.samples > settings.acquire_max_row_samples:
        raise _invalid(
            f"{n_rows} rows × {request.samples} samples", ["body", "samples"],
            f"pool rows × samples may be at most {settings.acquire_max_row_samples}; "
            "use fewer samples or a smaller pool",
            "too_large",
        )
    seed = request.seed if request.seed is not None else secrets.randbelow(2**63)
    chunk_rows = max(1, settings.acquire_chunk_rows)
    columns: dict[str, list[np.ndarray]] = {}
    for chunk, start in enumerate(range(0, n_rows, chunk_rows)):
        inputs = model.input_scaler.transform(pool[start : start + chunk_rows])
        outputs = sample_outputs(model.net, inputs, request.samples, chunk_seed(seed, chunk))
        if model.task == "classification":
            scores = classification_scores(outputs)
            parts = {
                "predictive_entropy": scores.predictive_entropy, "expected_entropy": scores.expected_entropy,
                "mutual_information": scores.mutual_information, "variation_ratio": scores.variation_ratio,
                "predicted_class": scores.predicted_class,
            }
        else:
            # the same summary (units, tau or the heteroscedastic head) as the model's predict
            summary = model._regression_summary(outputs)
            std = np.asarray(summary.std, dtype=np.float64)
            parts = {"predictive_entropy": gaussian_entropy(std), "std": std, "mean": np.asarray(summary.mean)}
        for key, values in parts.items():
            columns.setdefault(key, []).append(np.asarray(values))
    values = {key: np.concatenate(parts) for key, parts in columns.items()}
    score_key = {"bald": "mutual_information"}.get(request.strategy, request.strategy)
    chosen = top_k(values[score_key], request.k)
    names = model.class_names
    items = []
    for index in chosen.tolist():
        item = AcquiredRow(index=index, score=float(values[score_key][index]),
                           predictive_entropy=float(values["predictive_entropy"][index]))
        if model.task == "classification":
            predicted = int(values["predicted_class"][index])
            item.expected_entropy = float(values["expected_entropy"][index])
            item.mutual_information = float(values["mutual_information"][index])
            item.variation_ratio = float(values["variation_ratio"][index])
            item.predicted_class = predicted
            item.label = names[predicted] if names and predicted < len(names) else str(predicted)
        else:
            item.mean = float(values["mean"][index])
            item.std = float(values["std"][index])
        items.append(item)
    return AcquireResponse(
        name=name, version=target.version, run_id=target.run_id, task=model.task, strategy=request.strategy,
        samples=request.samples, seed=seed, pool_size=n_rows, items=items,
    )
