"""Heteroscedastic regression head (Kendall & Gal 2017): spec, loss, MC summary, and a toy fit."""

import json
import math

import numpy as np
import pytest
import torch

from service.ml.evaluation import evaluate_regression
from service.ml.mc import (
    NORMAL_95_QUANTILE,
    deterministic_outputs,
    heteroscedastic_to_original_units,
    sample_outputs,
    summarize_regression_heteroscedastic,
)
from service.ml.metrics import rmse
from service.ml.nets import NetworkSpec, build_network
from service.ml.training import Trainer, TrainingConfig, fit

HETEROSCEDASTIC = NetworkSpec(1, 2, (32, 32), (0.05, 0.05), heteroscedastic=True)
HOMOSCEDASTIC = NetworkSpec(1, 1, (32, 32), (0.05, 0.05))


def test_spec_round_trip_and_old_dicts():
    data = json.loads(json.dumps(HETEROSCEDASTIC.to_dict()))
    assert data["heteroscedastic"] is True
    assert NetworkSpec.from_dict(data) == HETEROSCEDASTIC
    old = HOMOSCEDASTIC.to_dict()
    del old["heteroscedastic"]  # stored before the field existed
    assert NetworkSpec.from_dict(old) == HOMOSCEDASTIC and not HOMOSCEDASTIC.heteroscedastic
    with pytest.raises(ValueError, match="n_outputs=2"):
        NetworkSpec(1, 1, (8,), (0.1,), heteroscedastic=True)
    with pytest.raises(ValueError, match="heteroscedastic"):
        NetworkSpec(1, 2, (8,), (0.1,), heteroscedastic="yes")
    assert build_network(HETEROSCEDASTIC)(torch.zeros(3, 1)).shape == (3, 2)


def test_gaussian_nll_loss_by_hand_and_task_check():
    x, y = np.zeros((2, 1), dtype=np.float32), np.array([1.0, 0.0], dtype=np.float32)
    trainer = Trainer(build_network(HETEROSCEDASTIC), "regression", x, y, None, None,
                      TrainingConfig(epochs=1), heteroscedastic=True)
    outputs = torch.tensor([[0.0, 0.0], [1.0, math.log(4.0)]])
    # 0.5 * (0 + 1 / 1) and 0.5 * (log 4 + 1 / 4), averaged
    expected = 0.5 * (0.5 + 0.5 * (math.log(4.0) + 0.25))
    assert trainer.data_loss(outputs, torch.tensor(y)).item() == pytest.approx(expected)
    with pytest.raises(ValueError, match="batch, 2"):
        trainer.data_loss(torch.zeros(2, 1), torch.tensor(y))
    with pytest.raises(ValueError, match="regression"):
        Trainer(build_network(NetworkSpec(1, 2, (4,), (0.0,))), "classification", x, np.zeros(2), None, None,
                TrainingConfig(epochs=1), heteroscedastic=True)


def test_original_units_and_summary_by_hand():
    outputs = torch.tensor([[[1.0, 0.0]], [[3.0, math.log(4.0)]]])  # [T=2, B=1, 2], standardised
    mean, log_variance = heteroscedastic_to_original_units(outputs, shift=10.0, scale=2.0)
    torch.testing.assert_close(mean, torch.tensor([[12.0], [16.0]], dtype=torch.float64))
    torch.testing.assert_close(log_variance.exp(), torch.tensor([[4.0], [16.0]], dtype=torch.float64))
    summary = summarize_regression_heteroscedastic(mean, log_variance)
    np.testing.assert_allclose(summary.mean, [14.0])
    np.testing.assert_allclose(summary.epistemic_std, [2.0])  # var of 12, 16 (1/T) = 4
    np.testing.assert_allclose(summary.aleatoric_std, [math.sqrt(10.0)])  # mean of 4, 16
    np.testing.assert_allclose(summary.std, [math.sqrt(14.0)])
    np.testing.assert_allclose(summary.upper - summary.mean, NORMAL_95_QUANTILE * summary.std)
    with pytest.raises(ValueError):
        summarize_regression_heteroscedastic(mean, log_variance[:1])


def toy_data(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """y = sin(2x) + noise whose std grows with |x|: 0.05 at 0, 0.55 at |x| = 1."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1, 1, size=(n, 1)).astype(np.float32)
    y = np.sin(2 * x[:, 0]) + (0.05 + 0.5 * np.abs(x[:, 0])) * rng.normal(size=n)
    return x, y.astype(np.float32)


@pytest.fixture(scope="module")
def trained():
    x, y = toy_data(512, seed=0)
    x_val, y_val = toy_data(128, seed=1)
    shift, scale = float(y.mean()), float(y.std())
    config = TrainingConfig(epochs=40, batch_size=64, learning_rate=1e-2, seed=0)
    nets = {}
    histories = {}
    for name, spec in (("heteroscedastic", HETEROSCEDASTIC), ("homoscedastic", HOMOSCEDASTIC)):
        net = build_network(spec, seed=0)
        trainer = Trainer(net, "regression", x, (y - shift) / scale, x_val, (y_val - shift) / scale, config,
                          target_scale=scale, heteroscedastic=spec.heteroscedastic)
        histories[name] = fit(trainer)
        nets[name] = net
    return nets, histories, shift, scale, (x_val, y_val)


def test_training_reports_nll_and_rmse_of_the_mean(trained):
    nets, histories, shift, scale, (x_val, y_val) = trained
    history = histories["heteroscedastic"]
    assert history[-1].train_loss < history[0].train_loss
    assert history[-1].train_loss < 0  # a Gaussian NLL (no constant) can go negative; MSE cannot
    mean, _ = heteroscedastic_to_original_units(deterministic_outputs(nets["heteroscedastic"], x_val), shift, scale)
    assert history[-1].val_rmse == pytest.approx(rmse(mean.numpy(), y_val), rel=1e-4)
    assert history[-1].train_rmse is not None and history[-1].val_accuracy is None


def test_predicts_more_aleatoric_noise_where_the_data_is_noisier(trained):
    nets, _, shift, scale, _ = trained
    grid = np.linspace(-1, 1, 201, dtype=np.float32)[:, None]
    mean, log_variance = heteroscedastic_to_original_units(sample_outputs(nets["heteroscedastic"], grid, 50, seed=0),
                                                          shift, scale)
    summary = summarize_regression_heteroscedastic(mean, log_variance)
    assert summary.aleatoric_std.shape == (201,)
    quiet = summary.aleatoric_std[np.abs(grid[:, 0]) < 0.2].mean()  # true std 0.05 .. 0.15
    noisy = summary.aleatoric_std[np.abs(grid[:, 0]) > 0.7].mean()  # true std 0.40 .. 0.55
    assert noisy > 2 * quiet
    assert 0.25 < noisy < 0.8 and quiet < 0.3


def test_beats_the_homoscedastic_net_with_the_best_constant_tau(trained):
    nets, _, shift, scale, _ = trained
    x_test, y_test = toy_data(1000, seed=2)
    mean, log_variance = heteroscedastic_to_original_units(
        sample_outputs(nets["heteroscedastic"], x_test, 50, seed=0), shift, scale)
    det_mean, det_log_variance = heteroscedastic_to_original_units(
        deterministic_outputs(nets["heteroscedastic"], x_test), shift, scale)
    heteroscedastic = evaluate_regression((mean, log_variance), (det_mean, det_log_variance), y_test)
    samples = sample_outputs(nets["homoscedastic"], x_test, 50, seed=0)[..., 0].double() * scale + shift
    deterministic = deterministic_outputs(nets["homoscedastic"], x_test)[:, 0].double() * scale + shift
    # tau chosen with hindsight on the test data itself: the homoscedastic net's best case.
    best = max(evaluate_regression(samples, deterministic, y_test, tau)["mc"]["log_likelihood"]
               for tau in np.geomspace(0.5, 500, 61))
    assert heteroscedastic["mc"]["log_likelihood"] > best + 0.1
    assert heteroscedastic["deterministic"]["log_likelihood"] > best
    assert 0.9 < heteroscedastic["mc"]["coverage_95"] <= 1.0
