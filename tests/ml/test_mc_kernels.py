"""The fused CPU path of the MC engine (service.ml.mc_kernels): exact keep rule, statistical
quality of the counter-based masks, block invariance, and agreement with the general path.

Statistical checks use SIGMAS standard errors, with fixed seeds (deterministic tests)."""

import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

from service.ml import mc, mc_kernels
from service.ml.mc import deterministic_outputs, sample_outputs, sample_outputs_loop
from service.ml.nets import NetworkSpec, build_network
from tests.ml.test_mc import SIGMAS, assert_same_distribution, inputs

KEY, KEY2 = np.uint64(0x1234_5678_9ABC_DEF0), np.uint64(0x0FED_CBA9_8765_4321)


def keep_count(rate: float) -> int:
    return min(max(round((1.0 - rate) * 2**16), 1), 2**16)


def kept_mask(rows: int, width: int, rate: float, row0: int = 0, key=KEY, key2=KEY2) -> np.ndarray:
    """The kernel's 0/1 mask for global rows ``row0 ..``: the identity activation on ones."""
    h = np.zeros((rows, width), dtype=np.float32)
    bias = mc_kernels.tiled_bias(np.ones(width, dtype=np.float32))
    words = np.empty(mc_kernels.words_for(rows, width), dtype=np.uint64)
    top, low, threshold = mc_kernels.mask_parameters(keep_count(rate))
    mc_kernels.bias_activation_dropout(h, bias, mc_kernels.IDENTITY, words, row0, key, key2, top, low, threshold)
    assert set(np.unique(h)) <= {0.0, 1.0}
    return h


@pytest.mark.parametrize("count", [256, 257, 3277, 32768, 32769, 40000, 62259, 65280, 65535])
def test_the_two_stage_rule_keeps_exactly_k_of_65536_lanes(count):
    # Every 16-bit lane L = 256 c + r, pushed through the kernel's rule with the parameters it gets:
    # kept when c >= threshold, except c == top with a low part, which is kept when r >= low.
    top, low, threshold = mc_kernels.mask_parameters(count)
    c, r = np.meshgrid(np.arange(256), np.arange(256), indexing="ij")
    kept = np.where((c == top) & (low > 0), r >= low, c >= threshold)
    assert kept.sum() == count
    assert (kept == (256 * c + r >= 2**16 - count)).all()  # the engine's rule: L >= 2**16 - k


def test_keep_counts_outside_the_two_stage_rule_are_refused():
    for count in (0, 255, 2**16):
        assert not mc_kernels.supports_keep_count(count)
        with pytest.raises(ValueError):
            mc_kernels.mask_parameters(count)


@pytest.mark.parametrize("rate", [0.05, 0.1, 0.3, 0.5, 0.9, 0.99])
def test_kernel_masks_keep_each_unit_with_the_rounded_probability(rate):
    rows, width = 20_000, 37  # an odd width: rows start at every byte of a word
    kept = kept_mask(rows, width, rate)
    keep = keep_count(rate) / 2**16
    spread = math.sqrt(keep * (1 - keep))
    assert abs(kept.mean() - keep) <= SIGMAS * spread / math.sqrt(kept.size)
    # every byte position within a word is a unit of its own: a biased lane would show here
    assert (np.abs(kept.mean(axis=0) - keep) <= SIGMAS * spread / math.sqrt(rows)).all()


@pytest.mark.parametrize("rate", [0.05, 0.5])
def test_kernel_masks_are_uncorrelated_across_units_rows_and_keys(rate):
    kept = kept_mask(40_000, 16, rate)
    other_key = kept_mask(40_000, 16, rate, key=KEY + np.uint64(1))

    def correlation(a: np.ndarray, b: np.ndarray) -> float:
        return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])

    bound = SIGMAS / math.sqrt(kept[:, :-1].size)
    assert abs(correlation(kept[:, :-1], kept[:, 1:])) <= bound  # neighbouring units
    assert abs(correlation(kept[:-1], kept[1:])) <= SIGMAS / math.sqrt(kept[:-1].size)  # neighbouring rows
    assert abs(correlation(kept, other_key)) <= SIGMAS / math.sqrt(kept.size)  # two layers' keys


def reference_mask(rows: int, width: int, rate: float, row0: int, key=KEY, key2=KEY2) -> np.ndarray:
    """The documented rule, unit by unit in numpy: byte ``u % 8`` of ``splitmix64(key, u // 8)``
    against the threshold, the low byte from ``splitmix64(key2, u)`` where it equals ``top``."""

    def splitmix64(k: np.uint64, counter: np.ndarray) -> np.ndarray:
        with np.errstate(over="ignore"):
            z = k + (counter + np.uint64(1)) * np.uint64(0x9E3779B97F4A7C15)
            z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
            z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))

    units = np.arange(row0 * width, (row0 + rows) * width, dtype=np.uint64)
    byte = (splitmix64(key, units // np.uint64(8)) >> (np.uint64(8) * (units % np.uint64(8)))) & np.uint64(255)
    low_byte = splitmix64(key2, units) & np.uint64(255)
    top, low, threshold = mc_kernels.mask_parameters(keep_count(rate))
    kept = np.where((byte == top) & (low > 0), low_byte >= low, byte >= threshold)
    return kept.reshape(rows, width).astype(np.float32)


@pytest.mark.parametrize("rate", [0.05, 0.3, 0.5, 0.99])
def test_kernel_masks_follow_the_documented_rule_unit_by_unit(rate):
    for rows, width, row0 in [(3000, 50, 0), (999, 13, 77), (64, 1, 5)]:
        assert np.array_equal(kept_mask(rows, width, rate, row0=row0), reference_mask(rows, width, rate, row0))


def test_a_mask_depends_on_the_row_number_not_on_the_block():
    whole = kept_mask(1000, 50, 0.05)
    parts = np.concatenate([kept_mask(n, 50, 0.05, row0=start) for start, n in [(0, 1), (1, 333), (334, 666)]])
    assert np.array_equal(whole, parts)
    assert not np.array_equal(whole, kept_mask(1000, 50, 0.05, key2=KEY2 + np.uint64(1)))  # low bytes used


def test_broadcast_repeats_the_prefix_rows_in_order():
    prefix = np.arange(1, 3 * 5 + 1, dtype=np.float32).reshape(3, 5)
    rows, row0 = 11, 7
    out = np.empty((rows, 5), dtype=np.float32)
    words = np.empty(mc_kernels.words_for(rows, 5), dtype=np.uint64)
    top, low, threshold = mc_kernels.mask_parameters(keep_count(0.3))
    mc_kernels.broadcast_dropout(prefix, out, words, row0, KEY, KEY2, top, low, threshold)
    expected_rows = prefix[(row0 + np.arange(rows)) % 3]
    kept = out != 0
    assert np.array_equal(out[kept], expected_rows[kept])
    assert np.array_equal(kept, kept_mask(rows, 5, 0.3, row0=row0).astype(bool))  # the same masks
    # The prefix repeated to long runs (as the engine passes it) gives the same rows and masks.
    tiled = mc_kernels.tiled_rows(prefix)
    assert tiled.shape[0] % 3 == 0 and tiled.size >= mc_kernels.RUN_UNITS
    again = np.empty_like(out)
    mc_kernels.broadcast_dropout(tiled, again, words, row0, KEY, KEY2, top, low, threshold)
    assert np.array_equal(again, out)


def test_a_words_buffer_too_small_is_refused():
    rows, width = 9, 13  # row 3 starts at unit 39, mid-word: words_for counts the extra word
    top, low, threshold = mc_kernels.mask_parameters(keep_count(0.3))
    h = np.ones((rows, width), dtype=np.float32)
    bias = mc_kernels.tiled_bias(np.zeros(width, dtype=np.float32))
    enough = np.empty(mc_kernels.words_for(rows, width), dtype=np.uint64)
    mc_kernels.bias_activation_dropout(h, bias, mc_kernels.RELU, enough, 3, KEY, KEY2, top, low, threshold)
    with pytest.raises(ValueError, match="too small"):
        mc_kernels.bias_activation_dropout(h, bias, mc_kernels.RELU, enough[:-2], 3, KEY, KEY2, top, low, threshold)
    with pytest.raises(ValueError, match="too small"):
        mc_kernels.broadcast_dropout(h[:1], h, enough[:-2], 3, KEY, KEY2, top, low, threshold)


def test_masks_are_the_same_whatever_the_bias_repeat():
    rows, width, top_low_threshold = 50, 7, mc_kernels.mask_parameters(keep_count(0.05))
    results = []
    for bias in (np.arange(width, dtype=np.float32), mc_kernels.tiled_bias(np.arange(width, dtype=np.float32))):
        h = np.ones((rows, width), dtype=np.float32)
        words = np.empty(mc_kernels.words_for(rows, width), dtype=np.uint64)
        mc_kernels.bias_activation_dropout(h, bias, mc_kernels.RELU, words, 3, KEY, KEY2, *top_low_threshold)
        results.append(h)
    assert np.array_equal(results[0], results[1])
    kept = kept_mask(rows, width, 0.05, row0=3).astype(bool)
    assert np.array_equal(results[0] != 0, kept)  # every kept unit is 1 + bias >= 1
    np.testing.assert_array_equal(results[0][kept], np.broadcast_to(np.arange(width) + 1.0, (rows, width))[kept])


@pytest.mark.parametrize("rate", [0.05, 0.5, 0.9])
def test_fused_path_keep_fraction_and_scale(rate):
    # Dropout then an identity Linear: each output is 0 or the inverted-dropout scale.
    linear = nn.Linear(64, 64, bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.eye(64))
    net, samples = nn.Sequential(nn.Dropout(rate), linear), 2000
    assert mc._compiled(net).fused is not None
    draws = sample_outputs(net, torch.ones(8, 64), samples, seed=5)
    kept = draws != 0
    keep = keep_count(rate) / 2**16
    assert draws[kept].unique().tolist() == pytest.approx([1.0 / keep], rel=1e-6)
    assert abs(kept.double().mean() - keep) <= SIGMAS * math.sqrt(keep * (1 - keep) / kept.numel())
    assert abs(draws.double().mean() - 1.0) <= SIGMAS * math.sqrt((1 - keep) / keep / kept.numel())


NETS = {
    "relu, input dropout 0.05 (refined lanes)": NetworkSpec(5, 3, (32, 32), (0.05, 0.3), input_dropout=0.05),
    "tanh": NetworkSpec(5, 3, (32, 16), (0.5, 0.2), activation="tanh"),
    "gelu, one output": NetworkSpec(5, 1, (24,), (0.4,), activation="gelu"),
}


@pytest.mark.parametrize("name", list(NETS))
def test_fused_and_general_paths_agree_in_distribution(name):
    net, x = build_network(NETS[name], seed=3), inputs()
    assert mc._compiled(net).fused is not None
    fused = sample_outputs(net, x, 4000, seed=1)
    general = sample_outputs(net, x, 4000, seed=2, fused=False)
    assert_same_distribution(fused, general)
    assert_same_distribution(fused, sample_outputs_loop(net, x, 4000, seed=3))
    assert not torch.equal(fused[0], fused[1])  # samples differ
    assert torch.equal(fused, sample_outputs(net, x, 4000, seed=1))  # a seed reproduces
    # Another block size draws the same masks; the BLAS may round a differently shaped block
    # differently (by an ulp), where another mask would move an output by ~0.1.
    blocks = sample_outputs(net, x, 4000, seed=1, max_elements=1000)
    torch.testing.assert_close(blocks, fused, rtol=0.0, atol=1e-5)


def test_nets_of_other_shapes_take_the_general_path():
    layer_norm = nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Dropout(0.3), nn.LayerNorm(16), nn.Linear(16, 2))
    trailing = nn.Sequential(nn.Linear(5, 16), nn.Dropout(0.3), nn.Linear(16, 2), nn.Dropout(0.2))
    tiny_keep = nn.Sequential(nn.Linear(5, 16), nn.Dropout(0.999), nn.Linear(16, 2))
    for net in (layer_norm, trailing, tiny_keep):
        assert mc._compiled(net).fused is None
        x = inputs()
        assert_same_distribution(sample_outputs(net, x, 3000, seed=4), sample_outputs_loop(net, x, 3000, seed=5))


def test_the_kept_plan_follows_changes_to_the_net():
    net, x = build_network(NetworkSpec(5, 2, (16,), (0.5,)), seed=0), inputs()
    before = sample_outputs(net, x, 20, seed=1)
    with torch.no_grad():  # an in-place update, as an optimiser step
        net[-1].weight.zero_()
    assert torch.equal(sample_outputs(net, x, 20, seed=1), net[-1].bias.detach().expand(20, 8, 2))
    net[-1] = nn.Linear(16, 2)  # a replaced module
    assert not torch.equal(sample_outputs(net, x, 20, seed=1), before)
    net[2].p = 0.0  # the dropout switched off: every sample is the deterministic output
    assert torch.allclose(sample_outputs(net, x, 5, seed=1), deterministic_outputs(net, x).expand(5, -1, -1), atol=1e-6)
    state = {k: v.clone() for k, v in net.state_dict().items()}
    net.load_state_dict({k: torch.zeros_like(v) for k, v in state.items()})
    assert torch.equal(sample_outputs(net, x, 5, seed=1), torch.zeros(5, 8, 2))


def test_importing_the_engine_does_not_import_numba():
    code = "import sys, service.ml.mc, service.runs.modelling; sys.exit('numba' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0


@pytest.mark.parametrize("fused_net", [True, False])
def test_samples_and_deterministic_in_one_call_equal_the_two_calls(fused_net):
    net = build_network(NETS["tanh"], seed=4) if fused_net else nn.Sequential(
        nn.Linear(5, 16), nn.ReLU(), nn.Dropout(0.3), nn.LayerNorm(16), nn.Linear(16, 2))
    x = inputs()
    outputs, deterministic = mc.sample_outputs_and_deterministic(net, x, 300, seed=9)
    assert torch.equal(outputs, sample_outputs(net, x, 300, seed=9))
    assert torch.equal(deterministic, deterministic_outputs(net, x))


@pytest.mark.parametrize("activation", [mc_kernels.IDENTITY, mc_kernels.RELU])
def test_transpose_bias_activation_puts_a_narrow_output_back_in_row_order(activation):
    src = np.random.default_rng(0).normal(size=(3, 37)).astype(np.float32)
    bias = mc_kernels.tiled_bias(np.array([0.5, -1.0, 2.0], dtype=np.float32))  # the engine passes it tiled
    out = np.empty((37, 3), dtype=np.float32)
    mc_kernels.transpose_bias_activation(src, bias, activation, out)
    expected = src.T + bias[:3]
    np.testing.assert_array_equal(out, np.maximum(expected, 0) if activation == mc_kernels.RELU else expected)


@pytest.mark.parametrize("last", ["none", "relu", "tanh"])
def test_a_narrow_last_layer_gets_its_bias_and_activation(last):
    # A few outputs: the fused path computes the last layer as W @ hᵀ and transposes it back.
    ending = {"none": [], "relu": [nn.ReLU()], "tanh": [nn.Tanh()]}[last]
    with torch.random.fork_rng():  # fixed weights, whatever ran before (deterministic test)
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(5, 16), nn.Dropout(0.3), nn.Linear(16, 3), *ending)
    with torch.no_grad():
        net[-1 if last == "none" else -2].bias.copy_(torch.tensor([0.5, -0.2, 1.0]))
    x = inputs()
    assert mc._compiled(net).fused.last_weight is not None
    fused = sample_outputs(net, x, 3000, seed=4)
    assert_same_distribution(fused, sample_outputs_loop(net, x, 3000, seed=5))
    if last == "relu":
        assert fused.min() >= 0 and (fused == 0).any()
