import math

import numpy as np
import pytest

from service.ml.metrics import (
    accuracy,
    auroc,
    brier_score,
    entropy,
    expected_calibration_error,
    gaussian_log_likelihood,
    gaussian_mixture_log_likelihood,
    heteroscedastic_mixture_log_likelihood,
    interval_coverage,
    negative_log_likelihood,
    reliability_diagram,
    rmse,
)


def test_entropy_hand_values():
    assert entropy(np.full(4, 0.25)) == pytest.approx(math.log(4))
    assert entropy(np.array([0.0, 1.0, 0.0])) == 0.0
    assert entropy(np.array([0.5, 0.5, 0.0])) == pytest.approx(math.log(2))
    rows = entropy(np.array([[0.2, 0.8], [1.0, 0.0]]))
    np.testing.assert_allclose(rows, [-(0.2 * math.log(0.2) + 0.8 * math.log(0.8)), 0.0])
    np.testing.assert_allclose(entropy(np.array([[0.5, 1.0], [0.5, 0.0]]), axis=0), [math.log(2), 0.0])


def test_mixture_log_likelihood_with_one_sample_is_gaussian_log_density():
    y, mean, tau = np.array([1.0, -2.0]), np.array([[0.5, 0.0]]), 4.0
    expected = -0.5 * math.log(2 * math.pi / tau) - 0.5 * tau * (y - mean[0]) ** 2
    np.testing.assert_allclose(gaussian_mixture_log_likelihood(y, mean, tau), expected)
    np.testing.assert_allclose(gaussian_mixture_log_likelihood(y, mean[..., None], tau), expected)


def test_mixture_log_likelihood_two_samples_by_hand():
    # y = 0, samples 0 and 1, tau = 2: density = 0.5 * (N(0; 0, 1/2) + N(0; 1, 1/2))
    #   = 0.5 * (1 + e^-1) / sqrt(pi)
    value = gaussian_mixture_log_likelihood(np.array([0.0]), np.array([[0.0], [1.0]]), 2.0)
    assert value[0] == pytest.approx(math.log(0.5 * (1 + math.exp(-1)) / math.sqrt(math.pi)))


def test_mixture_log_likelihood_is_stable_far_from_the_samples():
    value = gaussian_mixture_log_likelihood(np.array([1e4]), np.array([[0.0], [1.0]]), 1.0)
    assert np.isfinite(value).all()


def test_accuracy_and_rmse():
    probabilities = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]])
    assert accuracy(probabilities, np.array([0, 1, 1, 1])) == 0.75
    assert rmse(np.array([1.0, 2.0, 3.0]), np.array([1.0, 2.0, 5.0])) == pytest.approx(math.sqrt(4 / 3))
    assert rmse(np.zeros(3), np.zeros(3)) == 0.0


# -- classification metrics, by hand ---------------------------------------------------------


def test_negative_log_likelihood_by_hand_with_clipping():
    probabilities = np.array([[0.8, 0.2], [0.4, 0.6], [1.0, 0.0]])
    labels = np.array([0, 0, 1])
    expected = -(math.log(0.8) + math.log(0.4) + math.log(1e-12)) / 3
    assert negative_log_likelihood(probabilities, labels) == pytest.approx(expected)
    assert negative_log_likelihood(np.eye(3), np.arange(3)) == 0.0
    with pytest.raises(ValueError):
        negative_log_likelihood(probabilities, np.array([0, 2, 1]))


def test_brier_score_by_hand():
    probabilities = np.array([[0.8, 0.2], [0.4, 0.6], [1.0, 0.0]])
    # rows: 0.2^2 + 0.2^2 = 0.08, 0.6^2 + 0.6^2 = 0.72, 1 + 1 = 2
    assert brier_score(probabilities, np.array([0, 0, 1])) == pytest.approx((0.08 + 0.72 + 2.0) / 3)
    assert brier_score(np.eye(3), np.arange(3)) == 0.0


CALIBRATION_PROBABILITIES = np.array([[0.9, 0.1], [0.7, 0.3], [0.6, 0.4], [0.8, 0.2], [0.55, 0.45]])
CALIBRATION_LABELS = np.array([0, 1, 0, 0, 1])  # right, wrong, right, right, wrong


def test_reliability_diagram_by_hand_with_right_closed_bins():
    bins = reliability_diagram(CALIBRATION_PROBABILITIES, CALIBRATION_LABELS, n_bins=5)
    assert [(b["lower"], b["upper"]) for b in bins] == [(0.0, 0.2), (0.2, 0.4), (0.4, 0.6), (0.6, 0.8), (0.8, 1.0)]
    assert [b["count"] for b in bins] == [0, 0, 2, 2, 1]  # 0.6 lies in (0.4, 0.6], 0.8 in (0.6, 0.8]
    assert bins[0]["confidence"] is None and bins[0]["accuracy"] is None
    assert bins[2]["confidence"] == pytest.approx(0.575) and bins[2]["accuracy"] == 0.5
    assert bins[3]["confidence"] == pytest.approx(0.75) and bins[3]["accuracy"] == 0.5
    assert bins[4]["confidence"] == pytest.approx(0.9) and bins[4]["accuracy"] == 1.0
    zero = reliability_diagram(np.array([[0.0, 0.0]]), np.array([0]), n_bins=4)
    assert zero[0]["count"] == 1 and zero[0]["confidence"] == 0.0  # the first bin includes 0
    assert len(reliability_diagram(CALIBRATION_PROBABILITIES, CALIBRATION_LABELS)) == 15


def test_expected_calibration_error_by_hand():
    # 2/5 |0.5 - 0.575| + 2/5 |0.5 - 0.75| + 1/5 |1 - 0.9| = 0.03 + 0.1 + 0.02
    ece = expected_calibration_error(CALIBRATION_PROBABILITIES, CALIBRATION_LABELS, n_bins=5)
    assert ece == pytest.approx(0.15)
    assert expected_calibration_error(np.eye(3), np.arange(3)) == 0.0
    # One bin: |accuracy - mean confidence| = |3/5 - 0.71|
    assert expected_calibration_error(CALIBRATION_PROBABILITIES, CALIBRATION_LABELS, n_bins=1) == pytest.approx(0.11)


def test_auroc_by_hand_with_ties():
    assert auroc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1])) == pytest.approx(0.75)
    assert auroc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 1, 0, 1])) == 1.0
    assert auroc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([1, 0, 1, 0])) == 0.0
    # positives 0.5 and 0.9, negatives 0.5 and 0.2: (0.5 + 1 + 1 + 1) / 4
    assert auroc(np.array([0.5, 0.5, 0.2, 0.9]), np.array([True, False, False, True])) == pytest.approx(0.875)
    assert auroc(np.ones(4), np.array([1, 0, 1, 0])) == 0.5
    assert auroc(np.array([0.1, 0.2]), np.array([True, True])) is None
    assert auroc(np.array([0.1, 0.2]), np.array([False, False])) is None


# -- regression metrics, by hand -------------------------------------------------------------


def test_interval_coverage_is_inclusive():
    y = np.array([1.0, 2.0, 3.0, 4.0])
    lower, upper = np.array([0.0, 2.0, 3.5, 0.0]), np.array([1.0, 3.0, 4.0, 3.0])
    assert interval_coverage(y, lower, upper) == 0.5


def test_gaussian_log_likelihood_by_hand():
    value = gaussian_log_likelihood(np.array([1.0, 0.0]), np.array([0.0, 0.0]), np.array([4.0, 1.0]))
    np.testing.assert_allclose(value, [-0.5 * math.log(8 * math.pi) - 1 / 8, -0.5 * math.log(2 * math.pi)])
    assert gaussian_log_likelihood(np.array([2.0]), np.array([0.0]), 0.5)[0] == pytest.approx(
        -0.5 * math.log(math.pi) - 4.0
    )
    with pytest.raises(ValueError):
        gaussian_log_likelihood(np.array([0.0]), np.array([0.0]), 0.0)


def test_heteroscedastic_mixture_with_one_sample_is_the_gaussian():
    y = np.array([1.0, -2.0])
    means, variances = np.array([[0.0, 0.5]]), np.array([[4.0, 0.25]])
    expected = [-0.5 * math.log(8 * math.pi) - 1 / 8, -0.5 * math.log(0.5 * math.pi) - 12.5]
    np.testing.assert_allclose(heteroscedastic_mixture_log_likelihood(y, means, variances), expected)


def test_heteroscedastic_mixture_two_samples_by_hand():
    # y = 0, N(0; 0, 1) and N(0; 1, 4): density 0.5 * (1 / sqrt(2 pi) + exp(-1/8) / sqrt(8 pi))
    value = heteroscedastic_mixture_log_likelihood(np.array([0.0]), np.array([[0.0], [1.0]]), np.array([[1.0], [4.0]]))
    expected = math.log(0.5 * (1 / math.sqrt(2 * math.pi) + math.exp(-1 / 8) / math.sqrt(8 * math.pi)))
    assert value[0] == pytest.approx(expected)
    # A constant variance 1/tau gives the paper's formula.
    y, samples = np.array([0.3, -1.0]), np.array([[0.0, 1.0], [1.0, -2.0], [0.5, 0.0]])
    np.testing.assert_allclose(
        heteroscedastic_mixture_log_likelihood(y, samples, np.full_like(samples, 0.5)),
        gaussian_mixture_log_likelihood(y, samples, 2.0),
    )
    far = heteroscedastic_mixture_log_likelihood(np.array([1e4]), np.array([[0.0], [1.0]]), np.array([[1.0], [1e-3]]))
    assert np.isfinite(far).all()
