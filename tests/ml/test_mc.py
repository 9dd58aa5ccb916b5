"""MC-dropout sampling: exactness of the randomness handling and statistical correctness.

Statistical comparisons use a tolerance of ``SIGMAS`` standard errors computed from the samples
themselves; with fixed seeds the tests are deterministic, and with fresh seeds a false alarm
would have probability ~1e-6 per compared quantity.
"""

import math

import numpy as np
import pytest
import torch
from torch import nn

from service.ml import mc
from service.ml.data import Standardizer, load_builtin
from service.ml.mc import (
    NORMAL_95_QUANTILE,
    deterministic_outputs,
    enable_mc_dropout,
    sample_outputs,
    sample_outputs_loop,
    summarize_classification,
    summarize_regression,
)
from service.ml.nets import NetworkSpec, build_network
from service.ml.training import Trainer, TrainingConfig, fit

SIGMAS = 5.0
SPEC = NetworkSpec(n_inputs=5, n_outputs=3, hidden_layers=(32, 32), dropout=(0.5, 0.3))


def inputs(rows: int = 8, features: int = 5, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, features, generator=torch.Generator().manual_seed(seed))


def standard_error_of_std(samples: torch.Tensor) -> torch.Tensor:
    """Delta-method standard error of the sample std over dim 0: sqrt((m4 - s^4) / T) / (2 s)."""
    centred = samples - samples.mean(0)
    variance = centred.square().mean(0)
    fourth = centred.pow(4).mean(0)
    return ((fourth - variance.square()).clamp(min=0) / len(samples)).sqrt() / (2 * variance.sqrt())


def assert_same_distribution(first: torch.Tensor, second: torch.Tensor) -> None:
    """Per-output means and stds of two independent [T, B, n] sample sets agree within SIGMAS SE."""
    first, second = first.double(), second.double()
    mean_error = (first.var(0) / len(first) + second.var(0) / len(second)).sqrt()
    assert ((first.mean(0) - second.mean(0)).abs() <= SIGMAS * mean_error).all()
    std_error = (standard_error_of_std(first).square() + standard_error_of_std(second).square()).sqrt()
    assert ((first.std(0) - second.std(0)).abs() <= SIGMAS * std_error).all()


def test_shape_and_dropout_is_active():
    net = build_network(SPEC, seed=0)
    samples = sample_outputs(net, inputs(), samples=10, seed=0)
    assert samples.shape == (10, 8, 3) and samples.dtype == torch.float32
    assert not torch.equal(samples[0], samples[1])
    assert (samples.std(0) > 0).all()


def test_seeds_reproduce_and_fresh_randomness_without_seed():
    net, x = build_network(SPEC, seed=0), inputs()
    assert torch.equal(sample_outputs(net, x, 20, seed=1), sample_outputs(net, x, 20, seed=1))
    assert not torch.equal(sample_outputs(net, x, 20, seed=1), sample_outputs(net, x, 20, seed=2))
    assert not torch.equal(sample_outputs(net, x, 20), sample_outputs(net, x, 20))
    numpy_input = sample_outputs(net, x.numpy(), 20, seed=1)
    assert torch.equal(numpy_input, sample_outputs(net, x, 20, seed=1))


def test_a_seeds_keys_are_its_generators_words_whether_kept_or_not():
    # The keys of a seed seen before come from a cache: the same words as drawing them afresh.
    fresh = mc._random_words(6, mc._new_generator(12345, torch.device("cpu")), torch.device("cpu")).numpy()
    mc._seeded_keys.cache_clear()
    first, again = mc._fused_keys(6, 12345), mc._fused_keys(6, 12345)
    assert mc._seeded_keys.cache_info().hits == 1
    assert (first == fresh.view(np.uint64)).all() and (again == first).all()
    assert not first.flags.writeable  # shared between calls: nobody may change them
    assert not (mc._fused_keys(6, 12346) == first).all()


def test_global_rng_and_module_modes_untouched():
    net, x = build_network(SPEC, seed=0), inputs()
    state = torch.get_rng_state()
    sample_outputs(net, x, 5, seed=3)
    sample_outputs(net, x, 5)
    sample_outputs_loop(net, x, 5, seed=3)
    deterministic_outputs(net, x)
    assert torch.equal(torch.get_rng_state(), state)
    net.train()
    sample_outputs(net, x, 5)
    deterministic_outputs(net, x)
    assert all(module.training for module in net.modules())
    net.eval()
    with enable_mc_dropout(net):
        assert [m.training for m in net] == [isinstance(m, nn.Dropout) for m in net]
    assert not any(module.training for module in net.modules())


def test_without_dropout_every_sample_is_the_deterministic_output():
    net = build_network(NetworkSpec(5, 2, (8,), (0.0,)), seed=0)
    samples = sample_outputs(net, inputs(), 4, seed=0)
    assert torch.equal(samples, deterministic_outputs(net, inputs()).expand(4, -1, -1))


def test_mean_and_variance_match_the_exact_moments_of_a_single_dropout_layer():
    # out = W (m * h / keep) + b with m ~ Bernoulli(keep): E[out] = W h + b (the deterministic
    # output) and Var[out_k] = sum_j W_kj^2 h_j^2 (1 - keep) / keep.
    net = build_network(NetworkSpec(5, 3, (16,), (0.4,)), seed=1)
    x, keep, samples = inputs(), 0.6, 20000
    draws = sample_outputs(net, x, samples, seed=0).double()
    hidden = torch.relu(net[0](x)).double().detach()
    weight = net[3].weight.double().detach()
    variance = (hidden.square() @ weight.square().T) * (1 - keep) / keep
    mean = deterministic_outputs(net, x).double()
    assert ((draws.mean(0) - mean).abs() <= SIGMAS * (variance / samples).sqrt()).all()
    assert ((draws.std(0) - variance.sqrt()).abs() <= SIGMAS * standard_error_of_std(draws)).all()


@pytest.mark.parametrize("input_dropout", [0.0, 0.2])
def test_batched_sampling_agrees_with_the_loop_of_forward_passes(input_dropout):
    spec = NetworkSpec(5, 3, (32, 32), (0.5, 0.3), input_dropout=input_dropout, activation="tanh")
    net, x = build_network(spec, seed=2), inputs()
    batched = sample_outputs(net, x, 4000, seed=10)
    looped = sample_outputs_loop(net, x, 4000, seed=11)
    assert batched.shape == looped.shape == (4000, 8, 3)
    assert_same_distribution(batched, looped)
    assert torch.equal(looped, sample_outputs_loop(net, x, 4000, seed=11)[:4000])


def test_chunking_over_samples():
    # The generator is consumed chunk by chunk, so a different chunk size changes which draws
    # land where: same seed + same chunking is exact, different chunking agrees in distribution.
    net, x = build_network(SPEC, seed=0), inputs()
    whole = sample_outputs(net, x, 3000, seed=4)
    small = 8 * 32 * 7  # 7 samples per chunk, with a ragged last chunk
    chunked = sample_outputs(net, x, 3000, seed=4, max_elements=small)
    assert chunked.shape == whole.shape
    assert torch.equal(chunked, sample_outputs(net, x, 3000, seed=4, max_elements=small))
    assert_same_distribution(chunked, whole)
    assert sample_outputs(net, x, 3, seed=4, max_elements=1).shape == (3, 8, 3)


def test_unsupported_layouts_are_rejected():
    nested = nn.Sequential(nn.Sequential(nn.Linear(5, 4), nn.Dropout(0.5)), nn.Linear(4, 1))
    with pytest.raises(ValueError, match="nested"):
        sample_outputs(nested, inputs(), 2)
    with pytest.raises(ValueError, match="AlphaDropout"):
        sample_outputs(nn.Sequential(nn.Linear(5, 4), nn.AlphaDropout(0.5)), inputs(), 2)


def test_classification_summary_invariants():
    generator = torch.Generator().manual_seed(0)
    scales = torch.tensor([0.1, 1.0, 10.0, 100.0]).repeat(5)[:, None]  # up to saturated softmaxes
    logits = torch.randn(50, 20, 5, generator=generator) * scales
    summary = summarize_classification(logits)
    np.testing.assert_allclose(summary.probabilities.sum(-1), 1.0, atol=1e-6)
    assert summary.probabilities.shape == summary.probabilities_std.shape == (20, 5)
    assert np.isfinite(summary.predictive_entropy).all()
    assert (summary.predictive_entropy <= math.log(5) + 1e-12).all()
    assert (summary.predictive_entropy >= summary.mutual_information - 1e-12).all()
    assert (summary.mutual_information >= 0).all() and (summary.expected_entropy >= 0).all()
    np.testing.assert_allclose(
        summary.predictive_entropy, summary.expected_entropy + summary.mutual_information, atol=1e-12
    )
    np.testing.assert_array_equal(summary.label, summary.probabilities.argmax(-1))


def test_classification_summary_hand_cases():
    # Two confident samples that disagree: mean (1/2, 1/2), no aleatoric, all epistemic.
    disagree = summarize_classification(torch.tensor([[[60.0, -60.0]], [[-60.0, 60.0]]]))
    np.testing.assert_allclose(disagree.probabilities, [[0.5, 0.5]])
    np.testing.assert_allclose(disagree.probabilities_std, [[0.5, 0.5]])
    assert disagree.predictive_entropy[0] == pytest.approx(math.log(2))
    assert disagree.expected_entropy[0] == pytest.approx(0.0, abs=1e-20)
    assert disagree.mutual_information[0] == pytest.approx(math.log(2))
    # Identical uniform samples: all aleatoric, no epistemic.
    agree = summarize_classification(torch.zeros(3, 1, 4))
    assert agree.predictive_entropy[0] == pytest.approx(math.log(4))
    assert agree.expected_entropy[0] == pytest.approx(math.log(4))
    assert agree.mutual_information[0] == pytest.approx(0.0, abs=1e-15)


SUMMARY_FIELDS = ("probabilities", "probabilities_std", "predictive_entropy", "expected_entropy", "mutual_information")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(100, 1, 10), (100, 16, 10), (1, 3, 2), (7, 5, 3), (300, 4, 13)])
def test_the_summary_kernel_matches_the_torch_ops(shape, dtype):
    # A few rows on the CPU take one numba pass (mc_kernels.classification_summary); it must give
    # what the torch ops give, in float64, saturated softmaxes and ties included.
    generator = torch.Generator().manual_seed(sum(shape))
    logits = (torch.randn(*shape, generator=generator) * torch.tensor([0.01, 1.0, 30.0, 200.0]).repeat(100)[
        : shape[1], None]).to(dtype)
    logits[:, 0, :] = logits[:, 0, :1]  # a row whose classes tie in every sample: the first argmax
    kernel = mc._summarize_classification_kernel(logits.numpy())
    assert kernel is not None
    ops = mc._summarize_classification_torch(logits)
    for name in SUMMARY_FIELDS:
        np.testing.assert_allclose(getattr(kernel, name), getattr(ops, name), rtol=1e-12, atol=1e-14, err_msg=name)
    np.testing.assert_array_equal(kernel.label, ops.label)
    assert kernel.label[0] == 0


def test_non_finite_logits_are_summarised_by_the_torch_ops():
    logits = torch.randn(20, 3, 4, generator=torch.Generator().manual_seed(1))
    logits[5, 1, 2] = float("nan")
    logits[7, 2, 0] = float("inf")
    assert mc._summarize_classification_kernel(logits.numpy()) is None
    summary, ops = summarize_classification(logits), mc._summarize_classification_torch(logits)
    for name in SUMMARY_FIELDS:
        np.testing.assert_array_equal(getattr(summary, name), getattr(ops, name))
    assert np.isnan(summary.predictive_entropy[1]) and np.isfinite(summary.predictive_entropy[0])


def test_regression_summary():
    draws = torch.tensor([[1.0, 10.0], [3.0, 10.0]])
    tau = 4.0
    summary = summarize_regression(draws[..., None], tau)
    np.testing.assert_allclose(summary.mean, [2.0, 10.0])
    np.testing.assert_allclose(summary.epistemic_std, [1.0, 0.0])  # 1/T convention
    assert summary.aleatoric_std == 0.5
    np.testing.assert_allclose(summary.std**2, summary.epistemic_std**2 + 1 / tau)
    np.testing.assert_allclose(summary.upper - summary.mean, NORMAL_95_QUANTILE * summary.std)
    assert (summary.lower < summary.mean).all() and (summary.mean < summary.upper).all()
    with pytest.raises(ValueError):
        summarize_regression(draws, 0.0)


def test_trained_classifier_is_more_uncertain_far_from_the_data():
    dataset = load_builtin("digits")
    x = Standardizer.fit(dataset.features).transform(dataset.features)
    net = build_network(NetworkSpec(64, 10, (64,), (0.5,)), seed=0)
    trainer = Trainer(net, "classification", x, dataset.target, None, None,
                      TrainingConfig(epochs=8, learning_rate=1e-2, weight_decay=1e-4))
    assert fit(trainer)[-1].train_accuracy > 0.9
    rows = x[:400]
    noise = np.random.default_rng(0).normal(size=rows.shape).astype(np.float32)
    in_data = summarize_classification(sample_outputs(net, rows, 200, seed=0)).mutual_information.mean()
    for far_away in (rows + 10.0, 3.0 * noise):
        far = summarize_classification(sample_outputs(net, far_away, 200, seed=0)).mutual_information.mean()
        assert far > 2 * in_data


def test_regression_epistemic_std_grows_away_from_the_data():
    rng = np.random.default_rng(0)
    x = rng.uniform(-2, 2, size=(256, 1)).astype(np.float32)
    y = (np.sin(2 * x[:, 0]) + 0.1 * rng.normal(size=256)).astype(np.float32)
    net = build_network(NetworkSpec(1, 1, (64, 64), (0.1, 0.1)), seed=0)
    fit(Trainer(net, "regression", x, y, None, None, TrainingConfig(epochs=60, learning_rate=1e-2)))
    grid = torch.tensor([[-6.0], [-1.0], [0.0], [1.0], [6.0]])
    summary = summarize_regression(sample_outputs(net, grid, 500, seed=0), tau=100.0)
    inside = summary.epistemic_std[1:4].max()
    assert summary.epistemic_std[0] > 2 * inside and summary.epistemic_std[4] > 2 * inside
    assert (summary.lower < summary.mean).all() and (summary.mean < summary.upper).all()
    np.testing.assert_allclose(summary.std**2, summary.epistemic_std**2 + 1 / 100.0)


@pytest.mark.parametrize("rate", [0.05, 0.5, 0.9])
def test_realised_keep_fraction_matches_the_dropout_rate(rate):
    # A lone dropout layer on ones: each output is 0 (dropped) or the inverted-dropout scale.
    # Checked overall and per unit: with 64 units, every position of a mask within a random
    # word (16-bit lane or bit) is a unit of its own, so a biased position would show.
    net, x, samples = nn.Sequential(nn.Dropout(rate)), torch.ones(8, 64), 4000
    draws = sample_outputs(net, x, samples, seed=5)
    kept = draws != 0
    keep = 1.0 - rate
    scale = draws[kept].unique()
    assert len(scale) == 1 and scale.item() == pytest.approx(1.0 / keep, rel=1e-4)
    overall = kept.double().mean()
    assert abs(overall - keep) <= SIGMAS * math.sqrt(keep * rate / kept.numel())
    per_unit = kept.double().mean(dim=(0, 1))
    assert ((per_unit - keep).abs() <= SIGMAS * math.sqrt(keep * rate / (samples * 8))).all()
    # E[mask * scale] = 1: unbiased up to sampling error
    assert abs(draws.double().mean() - 1.0) <= SIGMAS * math.sqrt(rate / keep / kept.numel())


def test_rate_one_drops_everything_as_nn_dropout():
    net = nn.Sequential(nn.Linear(5, 4), nn.Dropout(1.0), nn.Linear(4, 2))
    samples = sample_outputs(net, inputs(), 3, seed=0)
    assert torch.equal(samples, net[2].bias.detach().expand(3, 8, 2))


def test_the_engine_never_modifies_its_inputs_or_the_net():
    x = inputs() - 0.5  # negative entries: an in-place ReLU on x would show
    original = x.clone()
    nets = [
        build_network(NetworkSpec(5, 3, (16, 16), (0.5, 0.2), input_dropout=0.1), seed=0),  # prefix is x
        nn.Sequential(nn.Identity(), nn.Dropout(0.3), nn.ReLU(), nn.Linear(5, 2)),  # prefix is x
        nn.Sequential(nn.ReLU(), nn.Dropout(0.5), nn.Tanh(), nn.Dropout(0.5)),  # ends on a dropout
        build_network(SPEC, seed=1),
    ]
    for net in nets:
        state = {name: tensor.clone() for name, tensor in net.state_dict().items()}
        first = sample_outputs(net, x, 50, seed=3)
        assert torch.equal(x, original)
        assert all(torch.equal(tensor, state[name]) for name, tensor in net.state_dict().items())
        assert torch.equal(sample_outputs(net, x, 50, seed=3), first)


def test_scales_that_cannot_be_folded_into_a_linear_agree_with_the_loop():
    # dropout -> tanh (scale applied before the activation), and a net ending on a dropout
    net = nn.Sequential(nn.Linear(5, 16), nn.Dropout(0.3), nn.Tanh(), nn.Linear(16, 3), nn.Dropout(0.2))
    x = inputs()
    assert_same_distribution(sample_outputs(net, x, 4000, seed=12), sample_outputs_loop(net, x, 4000, seed=13))
