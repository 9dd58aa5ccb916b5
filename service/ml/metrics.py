"""Small pure metric functions on numpy arrays (entropies in nats)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np


def entropy(probabilities: np.ndarray, axis: int = -1) -> np.ndarray:
    """Shannon entropy ``-sum p log p`` along ``axis``, with ``0 log 0 = 0``."""
    p = np.asarray(probabilities, dtype=np.float64)
    log_p = np.log(p, out=np.zeros_like(p), where=p > 0)
    return -np.sum(p * log_p, axis=axis)


def gaussian_mixture_log_likelihood(y: np.ndarray, output_samples: np.ndarray, tau: float) -> np.ndarray:
    """Per-point test log-likelihood of MC dropout (Gal & Ghahramani 2016, eq. 8).

    ``log (1/T) sum_t N(y; yhat_t, 1/tau)``, i.e.
    ``logsumexp_t(-tau/2 (y - yhat_t)^2) - log T - log(2 pi)/2 + log(tau)/2``
    for targets ``y [N]`` and samples ``[T, N]`` (or ``[T, N, 1]``) in the same units.
    """
    if not tau > 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    samples = np.asarray(output_samples, dtype=np.float64)
    if samples.ndim == 3 and samples.shape[-1] == 1:
        samples = samples[..., 0]
    exponent = -0.5 * tau * (np.asarray(y, dtype=np.float64) - samples) ** 2
    peak = exponent.max(axis=0)
    log_sum = peak + np.log(np.exp(exponent - peak).sum(axis=0))
    return log_sum - math.log(samples.shape[0]) - 0.5 * math.log(2 * math.pi) + 0.5 * math.log(tau)


def accuracy(probabilities: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of rows whose most probable class (``[N, C]`` scores) equals ``labels [N]``."""
    return float(np.mean(np.argmax(probabilities, axis=-1) == np.asarray(labels)))


def rmse(pred: np.ndarray, target: np.ndarray) -> float:
    """Root mean squared error."""
    difference = np.asarray(pred, dtype=np.float64) - np.asarray(target, dtype=np.float64)
    return float(np.sqrt(np.mean(difference**2)))


# -- classification -------------------------------------------------------------------------


def _probabilities_and_labels(probabilities: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    p = np.asarray(probabilities, dtype=np.float64)
    y = np.asarray(labels).astype(np.int64).reshape(-1)
    if p.ndim != 2 or p.shape[0] != y.shape[0]:
        raise ValueError(f"need probabilities [N, C] and labels [N], got {p.shape} and {y.shape}")
    if y.size and (y.min() < 0 or y.max() >= p.shape[1]):
        raise ValueError(f"labels must be class indices in [0, {p.shape[1]})")
    return p, y


def negative_log_likelihood(probabilities: np.ndarray, labels: np.ndarray) -> float:
    """Mean negative log-likelihood ``-(1/N) sum_i log max(p_i[y_i], 1e-12)`` (nats).

    ``probabilities [N, C]`` (rows summing to 1), ``labels [N]`` class indices.
    """
    p, y = _probabilities_and_labels(probabilities, labels)
    return float(-np.mean(np.log(np.maximum(p[np.arange(len(y)), y], 1e-12))))


def brier_score(probabilities: np.ndarray, labels: np.ndarray) -> float:
    """Multi-class Brier score ``(1/N) sum_i sum_c (p_ic - [y_i = c])^2`` (0 best, 2 worst)."""
    p, y = _probabilities_and_labels(probabilities, labels)
    one_hot = np.zeros_like(p)
    one_hot[np.arange(len(y)), y] = 1.0
    return float(np.mean(np.sum((p - one_hot) ** 2, axis=-1)))


def _confidence_bins(confidence: np.ndarray, n_bins: int) -> tuple[np.ndarray, np.ndarray]:
    """Bin edges ``b / n_bins`` and each value's bin: ``(lo, hi]``, the first bin also holding 0."""
    if not isinstance(n_bins, int) or n_bins < 1:
        raise ValueError(f"n_bins must be an integer >= 1, got {n_bins!r}")
    edges = np.arange(n_bins + 1, dtype=np.float64) / n_bins  # exact k/n, so 0.2 is an edge
    index = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, n_bins - 1)
    return edges, index


def reliability_diagram(probabilities: np.ndarray, labels: np.ndarray, n_bins: int = 15) -> list[dict[str, Any]]:
    """Equal-width bins of the confidence ``max_c p_ic`` on [0, 1].

    Bin ``b`` covers ``(b / n_bins, (b + 1) / n_bins]`` (the first also includes 0). Each bin is
    ``{"lower", "upper", "count", "confidence", "accuracy"}``: the mean confidence and the
    fraction of rows whose argmax equals the label, over the rows in the bin (None when empty).
    """
    p, y = _probabilities_and_labels(probabilities, labels)
    confidence = p.max(axis=-1)
    correct = p.argmax(axis=-1) == y
    edges, index = _confidence_bins(confidence, n_bins)
    bins = []
    for b in range(n_bins):
        members = index == b
        count = int(members.sum())
        bins.append({
            "lower": float(edges[b]),
            "upper": float(edges[b + 1]),
            "count": count,
            "confidence": float(confidence[members].mean()) if count else None,
            "accuracy": float(correct[members].mean()) if count else None,
        })
    return bins


def expected_calibration_error(probabilities: np.ndarray, labels: np.ndarray, n_bins: int = 15) -> float:
    """ECE ``sum_b (n_b / N) |accuracy_b - confidence_b|`` over the bins of :func:`reliability_diagram`."""
    bins = reliability_diagram(probabilities, labels, n_bins)
    total = sum(b["count"] for b in bins)
    if total == 0:
        raise ValueError("expected_calibration_error needs at least one row")
    return float(sum(b["count"] / total * abs(b["accuracy"] - b["confidence"]) for b in bins if b["count"]))


def auroc(scores: np.ndarray, positives: np.ndarray) -> float | None:
    """Area under the ROC curve of ``scores`` for detecting ``positives`` (boolean ``[N]``).

    Equals the Mann-Whitney statistic ``P(s_pos > s_neg) + 0.5 P(s_pos = s_neg)`` over all
    (positive, negative) pairs, computed from average ranks:
    ``(sum of the positives' ranks - n_pos (n_pos + 1) / 2) / (n_pos n_neg)``.
    None when either class is absent.
    """
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    positive = np.asarray(positives, dtype=bool).reshape(-1)
    if s.shape != positive.shape:
        raise ValueError(f"scores and positives need the same length, got {s.shape} and {positive.shape}")
    n_positive = int(positive.sum())
    n_negative = len(s) - n_positive
    if n_positive == 0 or n_negative == 0:
        return None
    order = np.argsort(s, kind="mergesort")
    sorted_scores = s[order]
    # Average rank (1-based) of each run of tied scores.
    starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])
    ends = np.r_[starts[1:], len(s)]
    average_rank = np.repeat((starts + 1 + ends) / 2.0, ends - starts)
    ranks = np.empty_like(average_rank)
    ranks[order] = average_rank
    u = ranks[positive].sum() - n_positive * (n_positive + 1) / 2.0
    return float(u / (n_positive * n_negative))


# -- regression -----------------------------------------------------------------------------


def interval_coverage(y: np.ndarray, lower: np.ndarray, upper: np.ndarray) -> float:
    """Fraction of targets inside their interval: ``(1/N) sum_i [lower_i <= y_i <= upper_i]``."""
    y = np.asarray(y, dtype=np.float64)
    inside = (np.asarray(lower, dtype=np.float64) <= y) & (y <= np.asarray(upper, dtype=np.float64))
    return float(np.mean(inside))


def gaussian_log_likelihood(y: np.ndarray, mean: np.ndarray, variance: np.ndarray | float) -> np.ndarray:
    """Per-point Gaussian log density ``-log(2 pi var)/2 - (y - mean)^2 / (2 var)``."""
    variance = np.asarray(variance, dtype=np.float64)
    if not np.all(variance > 0):
        raise ValueError("variance must be > 0")
    difference = np.asarray(y, dtype=np.float64) - np.asarray(mean, dtype=np.float64)
    return -0.5 * np.log(2 * math.pi * variance) - 0.5 * difference**2 / variance


def heteroscedastic_mixture_log_likelihood(
    y: np.ndarray, mean_samples: np.ndarray, variance_samples: np.ndarray
) -> np.ndarray:
    """Per-point log density of the MC mixture ``(1/T) sum_t N(y; mu_t, var_t)``.

    ``logsumexp_t(-log(2 pi var_t)/2 - (y - mu_t)^2 / (2 var_t)) - log T`` for targets ``y [N]``
    and per-sample means and variances ``[T, N]`` (same units as ``y``). With one constant
    variance ``1/tau`` this is :func:`gaussian_mixture_log_likelihood`.
    """
    means = np.asarray(mean_samples, dtype=np.float64)
    variances = np.asarray(variance_samples, dtype=np.float64)
    if means.ndim != 2 or means.shape != variances.shape:
        raise ValueError(
            f"need mean and variance samples of the same shape [T, N], got {means.shape} and {variances.shape}"
        )
    log_densities = gaussian_log_likelihood(y, means, variances)
    peak = log_densities.max(axis=0)
    return peak + np.log(np.exp(log_densities - peak).sum(axis=0)) - math.log(means.shape[0])
