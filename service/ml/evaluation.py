"""Held-out evaluation of MC dropout against the deterministic (weight-scaled) net.

Both functions take already-computed outputs — ``T`` MC-dropout samples and one deterministic
pass — plus the true targets, and return a JSON-safe dict: plain ``int`` / ``float`` / ``list``
/ ``dict`` values, with ``None`` wherever a number is undefined (an empty reliability bin, an
AUROC without any misclassified row) or not finite, so ``json.dumps(..., allow_nan=False)``
works.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import Tensor

from service.ml.mc import (
    NORMAL_95_QUANTILE,
    summarize_classification,
    summarize_regression,
    summarize_regression_heteroscedastic,
)
from service.ml.metrics import (
    accuracy,
    auroc,
    brier_score,
    expected_calibration_error,
    gaussian_log_likelihood,
    gaussian_mixture_log_likelihood,
    heteroscedastic_mixture_log_likelihood,
    interval_coverage,
    negative_log_likelihood,
    reliability_diagram,
    rmse,
)

RELIABILITY_BINS = 15
HISTOGRAM_BINS = 20

HeteroscedasticPair = tuple[Tensor, Tensor]


def _number(value: float | None) -> float | None:
    """A plain float, or None for None / NaN / infinity."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _numpy(values: Tensor | np.ndarray) -> np.ndarray:
    if isinstance(values, Tensor):
        values = values.detach().cpu()
    return np.asarray(values)


def _calibration(probabilities: np.ndarray, labels: np.ndarray, n_bins: int) -> dict[str, Any]:
    return {
        "accuracy": _number(accuracy(probabilities, labels)),
        "nll": _number(negative_log_likelihood(probabilities, labels)),
        "brier": _number(brier_score(probabilities, labels)),
        "ece": _number(expected_calibration_error(probabilities, labels, n_bins)),
        "reliability": reliability_diagram(probabilities, labels, n_bins),
    }


def _split_histogram(values: np.ndarray, correct: np.ndarray, upper: float, n_bins: int) -> dict[str, list]:
    """Counts of ``values`` in ``n_bins`` equal bins on ``[0, upper]``, for correct and wrong rows.

    Values are clipped into the range first (round-off can put log C a hair above it).
    """
    edges = np.linspace(0.0, upper, n_bins + 1)
    clipped = np.clip(values, 0.0, upper)
    return {
        "edges": [float(e) for e in edges],
        "correct": [int(c) for c in np.histogram(clipped[correct], bins=edges)[0]],
        "wrong": [int(c) for c in np.histogram(clipped[~correct], bins=edges)[0]],
    }


def evaluate_classification(
    logit_samples: Tensor,
    deterministic_logits: Tensor,
    labels: Tensor | np.ndarray,
    *,
    n_bins: int = RELIABILITY_BINS,
    histogram_bins: int = HISTOGRAM_BINS,
) -> dict[str, Any]:
    """Evaluate MC-dropout logits ``[T, B, C]`` and deterministic logits ``[B, C]`` on ``labels [B]``.

    ``mc`` uses the mean of the T softmax outputs; ``deterministic`` the softmax of the single
    pass. Both give accuracy, nll (mean, probabilities clipped at 1e-12), brier, ece and the
    reliability bins (``n_bins`` equal bins of the max probability). ``mc`` adds how well the
    uncertainty flags errors: ``auroc_predictive_entropy`` / ``auroc_mutual_information`` are
    the AUROCs of the score for detecting the *misclassified* rows (None when every row is
    right or every row is wrong), the means of both scores, and ``entropy_histogram`` /
    ``mutual_information_histogram``: ``{"edges", "correct", "wrong"}`` with ``histogram_bins``
    equal bins on ``[0, log C]`` and the counts of correctly and wrongly classified rows.
    """
    summary = summarize_classification(logit_samples)
    y = _numpy(labels).astype(np.int64).reshape(-1)
    n_samples, n_rows, n_classes = logit_samples.shape
    if deterministic_logits.shape != (n_rows, n_classes) or y.shape != (n_rows,):
        raise ValueError(
            f"need deterministic logits [{n_rows}, {n_classes}] and labels [{n_rows}], got "
            f"{tuple(deterministic_logits.shape)} and {y.shape}"
        )
    if n_rows == 0:
        raise ValueError("evaluation needs at least one row")
    deterministic = torch.softmax(deterministic_logits.detach().to(torch.float64), dim=-1).cpu().numpy()
    wrong = summary.label != y
    top = max(math.log(n_classes), 1e-12)  # C = 1: every entropy is 0
    mc = _calibration(summary.probabilities, y, n_bins)
    mc |= {
        "auroc_predictive_entropy": _number(auroc(summary.predictive_entropy, wrong)),
        "auroc_mutual_information": _number(auroc(summary.mutual_information, wrong)),
        "mean_predictive_entropy": _number(summary.predictive_entropy.mean()),
        "mean_mutual_information": _number(summary.mutual_information.mean()),
        "entropy_histogram": _split_histogram(summary.predictive_entropy, ~wrong, top, histogram_bins),
        "mutual_information_histogram": _split_histogram(summary.mutual_information, ~wrong, top, histogram_bins),
    }
    return {
        "n": int(n_rows),
        "samples": int(n_samples),
        "mc": mc,
        "deterministic": _calibration(deterministic, y, n_bins),
    }


def _without_unit_column(values: Tensor, ndim: int) -> Tensor:
    """float64 ``values`` with ``ndim`` dimensions, dropping a trailing size-1 output column."""
    values = values.detach().to(torch.float64)
    if values.ndim == ndim + 1 and values.shape[-1] == 1:
        values = values.squeeze(-1)
    if values.ndim != ndim:
        raise ValueError(f"expected {ndim} dimensions (plus an optional output column of 1), got {tuple(values.shape)}")
    return values


def evaluate_regression(
    output_samples_original_units: Tensor | HeteroscedasticPair,
    deterministic_original_units: Tensor | HeteroscedasticPair,
    targets: Tensor | np.ndarray,
    tau: float | None = None,
) -> dict[str, Any]:
    """Evaluate MC-dropout regression samples and the deterministic pass, all in target units.

    Homoscedastic: samples ``[T, B]`` (or ``[T, B, 1]``), deterministic ``[B]`` (or ``[B, 1]``)
    and the model precision ``tau``. Heteroscedastic: pairs ``(mean_samples, log_variance_samples)``
    ``[T, B]`` and ``(mean, log_variance)`` ``[B]`` (see ``mc.heteroscedastic_to_original_units``);
    ``tau`` is then unused.

    ``mc``: rmse of the predictive mean, ``log_likelihood`` — the mean per point of
    ``log (1/T) sum_t N(y; mu_t, var_t)`` with ``var_t = 1/tau`` (Gal & Ghahramani 2016) or the
    predicted variances — ``coverage_95`` of the Gaussian interval with the total std,
    ``mean_std``, ``mean_epistemic_std`` and ``mean_aleatoric_std``. ``deterministic``: rmse,
    the Gaussian ``log_likelihood`` with variance 1/tau (or the predicted one) and its 95%
    ``coverage_95``.
    """
    y = _numpy(targets).astype(np.float64).reshape(-1)
    heteroscedastic = isinstance(output_samples_original_units, tuple)
    if heteroscedastic != isinstance(deterministic_original_units, tuple):
        raise ValueError(
            "pass (mean, log_variance) pairs for both the samples and the deterministic outputs, or for neither"
        )
    if heteroscedastic:
        mean_samples, log_variance_samples = (_without_unit_column(v, 2) for v in output_samples_original_units)
        summary = summarize_regression_heteroscedastic(mean_samples, log_variance_samples)
        variance_samples = log_variance_samples.exp().cpu().numpy()
        mc_log_likelihood = heteroscedastic_mixture_log_likelihood(y, mean_samples.cpu().numpy(), variance_samples)
        deterministic_mean, deterministic_log_variance = (
            _without_unit_column(v, 1) for v in deterministic_original_units
        )
        deterministic_variance = deterministic_log_variance.exp().cpu().numpy()
        n_samples = mean_samples.shape[0]
    else:
        if tau is None or not tau > 0:
            raise ValueError(f"a homoscedastic evaluation needs tau > 0, got {tau}")
        samples = _without_unit_column(output_samples_original_units, 2)
        summary = summarize_regression(samples, tau)
        mc_log_likelihood = gaussian_mixture_log_likelihood(y, samples.cpu().numpy(), tau)
        deterministic_mean = _without_unit_column(deterministic_original_units, 1)
        deterministic_variance = np.full(y.shape, 1.0 / tau)
        n_samples = samples.shape[0]
    deterministic_mean = deterministic_mean.cpu().numpy().reshape(-1)
    n_rows = len(y)
    if n_rows == 0:
        raise ValueError("evaluation needs at least one row")
    shapes = (summary.mean.shape, deterministic_mean.shape, deterministic_variance.shape)
    if any(shape != (n_rows,) for shape in shapes):
        raise ValueError(
            f"need {n_rows} predictions per sample and deterministically, got "
            f"{summary.mean.shape} and {deterministic_mean.shape}"
        )
    half_width = NORMAL_95_QUANTILE * np.sqrt(deterministic_variance)
    return {
        "n": int(n_rows),
        "samples": int(n_samples),
        "heteroscedastic": heteroscedastic,
        "mc": {
            "rmse": _number(rmse(summary.mean, y)),
            "log_likelihood": _number(np.mean(mc_log_likelihood)),
            "coverage_95": _number(interval_coverage(y, summary.lower, summary.upper)),
            "mean_std": _number(np.mean(summary.std)),
            "mean_epistemic_std": _number(np.mean(summary.epistemic_std)),
            "mean_aleatoric_std": _number(np.mean(summary.aleatoric_std)),
        },
        "deterministic": {
            "rmse": _number(rmse(deterministic_mean, y)),
            "log_likelihood": _number(np.mean(gaussian_log_likelihood(y, deterministic_mean, deterministic_variance))),
            "coverage_95": _number(
                interval_coverage(y, deterministic_mean - half_width, deterministic_mean + half_width)
            ),
        },
    }
