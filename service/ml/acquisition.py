"""Acquisition functions for active learning with MC dropout (Gal, Islam & Ghahramani 2017).

From ``T`` stochastic passes over a pool of unlabelled rows, score each row by how much
labelling it is expected to help, and rank:

- **BALD** — the mutual information between the prediction and the weights,
  ``H[mean_t p_t] - mean_t H[p_t]`` (Houlsby et al. 2011): high where the passes disagree
  confidently (epistemic uncertainty), low where every pass is equally unsure (noise).
- **Predictive entropy** — ``H[mean_t p_t]``: total uncertainty.
- **Variation ratio** — ``1 - f_m / T``, ``f_m`` the number of passes whose arg-max is the modal
  class (Freeman 1965).

For regression there is one score, the differential entropy of the Gaussian with the
predictive std: ``0.5 log(2 pi e std^2)`` (monotone in std, so it ranks like the std).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from service.ml.mc import summarize_classification


@dataclass
class ClassificationScores:
    """Per-row scores for B rows (entropies in nats)."""

    predictive_entropy: np.ndarray  # [B]
    expected_entropy: np.ndarray  # [B]
    mutual_information: np.ndarray  # [B] the BALD score
    variation_ratio: np.ndarray  # [B] in [0, 1 - 1/C]
    predicted_class: np.ndarray  # [B] arg-max of the mean probabilities


def variation_ratio(logit_samples: Tensor) -> np.ndarray:
    """``1 - (passes voting for the modal class) / T`` for logits ``[T, B, C]``."""
    if logit_samples.ndim != 3:
        raise ValueError(f"logit samples must have shape [T, B, C], got {tuple(logit_samples.shape)}")
    samples, _, classes = logit_samples.shape
    votes = logit_samples.argmax(dim=-1)  # [T, B]
    counts = torch.nn.functional.one_hot(votes, classes).sum(dim=0)  # [B, C]
    return (1.0 - counts.max(dim=-1).values.to(torch.float64) / samples).cpu().numpy()


def classification_scores(logit_samples: Tensor) -> ClassificationScores:
    summary = summarize_classification(logit_samples)
    return ClassificationScores(
        predictive_entropy=summary.predictive_entropy,
        expected_entropy=summary.expected_entropy,
        mutual_information=summary.mutual_information,
        variation_ratio=variation_ratio(logit_samples),
        predicted_class=summary.label,
    )


def gaussian_entropy(std: np.ndarray) -> np.ndarray:
    """Differential entropy (nats) of a Gaussian with standard deviation ``std``."""
    std = np.asarray(std, dtype=np.float64)
    with np.errstate(divide="ignore"):
        return 0.5 * np.log(2.0 * math.pi * math.e) + np.log(std)


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` highest scores, highest first; equal scores by lower index first
    (so the ranking is a pure function of the scores). NaN ranks last."""
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 1:
        raise ValueError(f"scores must be one-dimensional, got shape {scores.shape}")
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    keys = np.where(np.isnan(scores), -np.inf, scores)
    order = np.lexsort((np.arange(len(keys)), -keys))  # last key is primary
    return order[:k]
