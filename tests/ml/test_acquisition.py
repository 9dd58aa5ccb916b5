"""Acquisition scores against hand-computed values, and the ranking rule."""

import math

import numpy as np
import pytest
import torch

from service.ml.acquisition import classification_scores, gaussian_entropy, top_k, variation_ratio


def test_variation_ratio_counts_votes_for_the_modal_class() -> None:
    # T = 4 passes, 2 rows, 3 classes. Row 0 votes 0, 0, 1, 0 -> 1 - 3/4; row 1 votes 2 four times -> 0.
    logits = torch.tensor([
        [[5.0, 0.0, 0.0], [0.0, 0.0, 5.0]],
        [[5.0, 0.0, 0.0], [0.0, 0.0, 5.0]],
        [[0.0, 5.0, 0.0], [0.0, 0.0, 5.0]],
        [[5.0, 0.0, 0.0], [0.0, 0.0, 5.0]],
    ])
    assert variation_ratio(logits).tolist() == [0.25, 0.0]


def test_bald_is_high_where_passes_disagree_and_low_where_all_are_unsure() -> None:
    # Row 0: two confident passes that disagree (high MI). Row 1: two passes both 50/50 (MI 0).
    logits = torch.tensor([
        [[20.0, 0.0], [0.0, 0.0]],
        [[0.0, 20.0], [0.0, 0.0]],
    ])
    scores = classification_scores(logits)
    assert scores.predictive_entropy == pytest.approx([math.log(2), math.log(2)], abs=1e-6)
    assert scores.expected_entropy[0] == pytest.approx(0.0, abs=1e-6)
    assert scores.expected_entropy[1] == pytest.approx(math.log(2))
    assert scores.mutual_information == pytest.approx([math.log(2), 0.0], abs=1e-6)
    assert scores.variation_ratio.tolist() == [0.5, 0.0]  # row 1: both passes' argmax is class 0
    assert scores.predicted_class.tolist() == [0, 0]


def test_gaussian_entropy() -> None:
    assert gaussian_entropy(np.array([1.0]))[0] == pytest.approx(0.5 * math.log(2 * math.pi * math.e))
    assert gaussian_entropy(np.array([2.0]))[0] - gaussian_entropy(np.array([1.0]))[0] == pytest.approx(math.log(2))


def test_top_k_is_sorted_with_ties_by_index_and_nan_last() -> None:
    scores = np.array([0.1, 0.9, 0.5, 0.9, float("nan"), 0.5])
    assert top_k(scores, 4).tolist() == [1, 3, 2, 5]
    assert top_k(scores, 10).tolist() == [1, 3, 2, 5, 0, 4]
    assert top_k(scores, 0).tolist() == []
