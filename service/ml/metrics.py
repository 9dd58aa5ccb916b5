"""Small pure metric functions on numpy arrays (entropies in nats)."""

from __future__ import annotations

import math

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
