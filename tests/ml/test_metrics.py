import math

import numpy as np
import pytest

from service.ml.metrics import accuracy, entropy, gaussian_mixture_log_likelihood, rmse


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
