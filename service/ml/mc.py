"""Monte Carlo dropout prediction (Gal & Ghahramani, 2016).

Keeping dropout on at test time and averaging ``T`` stochastic forward passes approximates
the predictive distribution of a Bayesian network. :func:`sample_outputs` does the ``T``
passes as one batched computation: the net stays in ``eval()`` (so every non-dropout module
behaves as at test time), the part before the first dropout layer is computed once, and the
masks come from a private ``torch.Generator`` — never the global RNG — so concurrent calls
are safe and a seed reproduces the samples exactly. The masks are drawn as 16-bit integer
lanes (so each dropout rate is rounded to a multiple of 2**-16, as in :mod:`service.ml.sweep`),
each 1/keep scale is folded into the weight of the next Linear, and activations and masks are
applied in place on tensors the engine creates; :func:`sample_outputs_loop` is the reference.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.dropout import _DropoutNd

from service.ml.nets import seeded_rng

NORMAL_95_QUANTILE = 1.959963984540054


def _device_of(net: nn.Module) -> torch.device:
    parameter = next(net.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def _as_input(net: nn.Module, x: Tensor | np.ndarray) -> Tensor:
    x = torch.as_tensor(x).to(device=_device_of(net), dtype=torch.float32)
    if x.ndim != 2:
        raise ValueError(f"inputs must have shape [batch, features], got {tuple(x.shape)}")
    return x


@contextlib.contextmanager
def _modes_restored(net: nn.Module) -> Iterator[None]:
    """Restore every module's train/eval flag on exit."""
    modes = [(module, module.training) for module in net.modules()]
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def _any_training(net: nn.Module) -> bool:
    """``any(m.training for m in net.modules())`` without ``modules()``'s generators (~10x faster)."""
    pending = [net]
    while pending:
        module = pending.pop()
        if module is None:  # a child slot set to None
            continue
        if module.training:
            return True
        pending.extend(module._modules.values())  # the children
    return False


@contextlib.contextmanager
def _eval_mode(net: nn.Module) -> Iterator[None]:
    """``net.eval()`` for the block; a no-op (no writes, so no races) if it already is."""
    if not _any_training(net):
        yield
        return
    with _modes_restored(net):
        net.eval()
        yield


@contextlib.contextmanager
def enable_mc_dropout(net: nn.Module) -> Iterator[nn.Module]:
    """Put ``net`` in eval mode with only its dropout modules in train mode; restore on exit."""
    with _modes_restored(net):
        net.eval()
        for module in net.modules():
            if isinstance(module, _DropoutNd):
                module.train()
        yield net


def _new_generator(seed: int | None, device: torch.device) -> torch.Generator:
    if seed is None:
        seed = int.from_bytes(os.urandom(8), "little") >> 1
    return torch.Generator(device=device).manual_seed(seed)


def _first_sampled_dropout(modules: list[nn.Module]) -> int:
    """Index of the first ``nn.Dropout`` with p > 0 (``len(modules)`` if none).

    Rejects other dropout kinds and dropout nested inside a child module.
    """
    first = len(modules)
    for i, module in enumerate(modules):
        if isinstance(module, _DropoutNd):
            if type(module) is not nn.Dropout and module.p > 0:
                raise ValueError(f"unsupported dropout module {type(module).__name__}")
            if module.p > 0:
                first = min(first, i)
        elif module._modules and any(isinstance(m, _DropoutNd) and m.p > 0 for m in module.modules()):
            raise ValueError(f"dropout nested inside {type(module).__name__} is not supported")
    return first


# Dropout masks from 16-bit integer lanes (the rule of service.ml.sweep): a unit is kept when its
# lane, uniform over int16, is <= k - 32769 with k = round((1 - p) * 2**16) clamped to [1, 2**16],
# and kept units are scaled by exactly 2**16 / k.
_MASK_LEVELS = 1 << 16
# A final Linear with fewer outputs than this, over at least _TRANSPOSED_MIN_ROWS rows, is computed
# as W @ hᵀ (addmm) and transposed back: for [6400, 64] @ [64, 10] MKL runs that ~1.8x faster than
# h @ Wᵀ, the transposing copy included (1 thread); for a few rows it makes no difference.
_NARROW_OUTPUTS = 16
_TRANSPOSED_MIN_ROWS = 1024
# Activations applied in place on the engine's own tensors.
_IN_PLACE_ACTIVATIONS: dict[type[nn.Module], str] = {nn.ReLU: "relu_", nn.Tanh: "tanh_", nn.Sigmoid: "sigmoid_"}
# The eight bits of a byte, for p = 0.5 masks on the CPU (other devices build it in place).
_BYTE_BITS = torch.tensor([[1], [2], [4], [8], [16], [32], [64], [128]], dtype=torch.uint8)


def _keep_count(p: float) -> int:
    """Keep probability of rate ``p`` in units of 2**-16, in [1, 2**16] (as ``sweep._keep_counts``)."""
    return min(max(round((1.0 - p) * _MASK_LEVELS), 1), _MASK_LEVELS)


def _random_words(count: int, generator: torch.Generator, device: torch.device) -> Tensor:
    """``count`` int64 words with all 64 bits uniform.

    ``random_()`` without bounds draws int64s in [0, 2**63), whose top bit is always 0 (one
    16-bit lane in four would never be negative); ``random_(-2**63, None)`` is the full range.
    """
    words = torch.empty(count, dtype=torch.int64, device=device)
    return words.random_(-(2**63), None, generator=generator)


# The steps of a forward pass after the cached prefix (NamedTuples: cheap to build per call).
class _Dropout(NamedTuple):
    keep_count: int  # k: keep probability k / 2**16; 0 drops every unit (p = 1)


class _Linear(NamedTuple):
    weight: Tensor  # with the scales of the dropouts before it folded in
    bias: Tensor | None
    narrow: bool  # the last layer, with few outputs: W @ hᵀ over many rows


class _Scale(NamedTuple):
    factor: float


_Step = _Dropout | _Linear | _Scale | nn.Module


def _plan(suffix: list[nn.Module]) -> list[_Step]:
    """The steps after the cached prefix. Masks are 0/1; each dropout's 1/keep scale is folded into
    the weight of the ``nn.Linear`` that follows it (a scaled copy: the net is not modified), or
    applied as a step of its own where another module comes first."""
    steps: list[_Step] = []
    scale = 1.0
    for index, module in enumerate(suffix):
        if isinstance(module, nn.Dropout):
            if module.p >= 1.0:  # as nn.Dropout(1.0): every unit dropped
                steps.append(_Dropout(0))
            elif module.p > 0:
                count = _keep_count(module.p)
                steps.append(_Dropout(count))
                scale *= _MASK_LEVELS / count
        elif type(module) is nn.Linear:
            weight = module.weight if scale == 1.0 else module.weight * scale
            narrow = index == len(suffix) - 1 and module.out_features < _NARROW_OUTPUTS
            steps.append(_Linear(weight, module.bias, narrow))
            scale = 1.0
        else:
            if scale != 1.0:
                steps.append(_Scale(scale))
                scale = 1.0
            steps.append(module)
    if scale != 1.0:
        steps.append(_Scale(scale))
    return steps


def _dropout_mask(n: int, step: _Dropout, generator: torch.Generator, device: torch.device,
                  dtype: torch.dtype) -> Tensor:
    """A new 0/1 mask of ``n`` elements, 1 with probability k / 2**16.

    Four 16-bit lanes per int64 draw, a unit kept when its lane is <= k - 32769; for k = 2**15
    (p = 0.5) one random bit per unit instead (same distribution, an eighth of the draws).
    """
    if step.keep_count == 0:
        return torch.zeros(n, dtype=dtype, device=device)
    if step.keep_count == _MASK_LEVELS // 2:
        count = (n + 7) // 8
        octets = _random_words((count + 7) // 8, generator, device).view(torch.uint8)[:count]
        byte_bits = (_BYTE_BITS if device.type == "cpu" else
                     torch.ones(8, 1, dtype=torch.uint8, device=device).bitwise_left_shift_(
                         torch.arange(8, dtype=torch.uint8, device=device).unsqueeze(1)))
        bits = torch.bitwise_and(octets.unsqueeze(0), byte_bits)  # [8, count]: 0 or the bit's value
        mask = torch.ne(bits, 0, out=torch.empty(bits.shape, dtype=dtype, device=device))
        return mask.view(-1)[:n]
    lanes = _random_words((n + 3) // 4, generator, device).view(torch.int16)[:n]
    return torch.le(lanes, step.keep_count - (_MASK_LEVELS // 2 + 1),
                    out=torch.empty(n, dtype=dtype, device=device))


def _run_chunk(prefix: Tensor, steps: list[_Step], samples: int, generator: torch.Generator) -> Tensor:
    """``samples`` passes of ``steps`` over ``prefix [rows, width]``: a new ``[samples * rows, n_out]``.

    Modifies in place only tensors created here (masks, Linear outputs), never ``prefix``.
    """
    rows, width = prefix.shape
    # The first step is a dropout (the prefix ends there): broadcast the prefix over the samples.
    mask = _dropout_mask(samples * rows * width, steps[0], generator, prefix.device, prefix.dtype)
    hidden = mask.view(samples, rows, width).mul_(prefix).view(samples * rows, width)
    owned = True  # whether ``hidden`` was created here (so may be modified in place)
    for step in steps[1:]:
        if isinstance(step, _Dropout):
            mask = _dropout_mask(hidden.numel(), step, generator, hidden.device, hidden.dtype)
            hidden, owned = mask.view(hidden.shape).mul_(hidden), True
        elif isinstance(step, _Linear):
            if step.narrow and hidden.shape[0] >= _TRANSPOSED_MIN_ROWS:
                product = (torch.mm(step.weight, hidden.t()) if step.bias is None
                           else torch.addmm(step.bias.unsqueeze(1), step.weight, hidden.t()))
                hidden = product.t().contiguous()
            else:
                hidden = F.linear(hidden, step.weight, step.bias)
            owned = True
        elif isinstance(step, _Scale):
            hidden, owned = (hidden.mul_(step.factor) if owned else hidden * step.factor), True
        elif owned and type(step) in _IN_PLACE_ACTIVATIONS:
            getattr(hidden, _IN_PLACE_ACTIVATIONS[type(step)])()
        else:
            hidden, owned = step(hidden), False  # any other module: its output may alias something
    return hidden if owned else hidden.clone()


def sample_outputs(
    net: nn.Sequential,
    x: Tensor | np.ndarray,
    samples: int,
    seed: int | None = None,
    *,
    max_elements: int = 2**24,
) -> Tensor:
    """Draw ``samples`` (T) MC-dropout outputs for inputs ``x [B, D]``: a ``[T, B, n_out]`` tensor.

    Each ``nn.Dropout(p)`` with p > 0 multiplies by an inverted-dropout mask drawn independently
    per sample, row and unit: Bernoulli(keep) / keep, with keep = k / 2**16 and
    k = round((1 - p) * 2**16) clamped to [1, 2**16] — so p is rounded to a multiple of 2**-16
    (|error| <= 7.7e-6, the rule of :mod:`service.ml.sweep`) and the mask stays exactly unbiased
    for the rounded rate; p = 1 drops every unit, as ``nn.Dropout(1.0)``. The masks come from
    16-bit integer lanes of a private generator's int64 draws (one random bit per unit for
    p = 0.5), and each 1/keep scale is folded into the weight of the ``nn.Linear`` that follows.
    Activations are applied in place on the engine's own tensors; ``x`` and the net are never
    modified.

    The samples are computed in chunks of T so that no activation exceeds ``max_elements``
    elements. With a ``seed`` the result is reproducible for the same inputs, T and
    ``max_elements``; the chunk size changes the order of the draws, so a different chunking
    gives different (identically distributed) samples. Without a seed the masks use fresh OS
    randomness.
    """
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    if not isinstance(net, nn.Sequential):
        raise TypeError("sample_outputs needs an nn.Sequential")
    modules = list(net)
    first = _first_sampled_dropout(modules)
    x = _as_input(net, x)
    generator = _new_generator(seed, x.device)
    with torch.inference_mode(), _eval_mode(net):
        prefix = x
        for module in modules[:first]:
            prefix = module(prefix)
        suffix = modules[first:]
        rows = prefix.shape[0]
        if not suffix:
            return prefix.unsqueeze(0).expand(samples, *prefix.shape).clone()
        steps = _plan(suffix)
        widest = max([prefix.shape[-1]] + [m.out_features for m in suffix if isinstance(m, nn.Linear)])
        chunk = max(1, max_elements // max(1, rows * widest))
        if chunk >= samples:
            return _run_chunk(prefix, steps, samples, generator).view(samples, rows, -1)
        output: Tensor | None = None
        for start in range(0, samples, chunk):
            t = min(chunk, samples - start)
            hidden = _run_chunk(prefix, steps, t, generator).view(t, rows, -1)
            if output is None:
                output = hidden.new_empty((samples, *hidden.shape[1:]))
            output[start : start + t] = hidden
        assert output is not None
        return output


def sample_outputs_loop(
    net: nn.Module, x: Tensor | np.ndarray, samples: int, seed: int | None = None
) -> Tensor:
    """Reference implementation: ``samples`` separate forward passes with the dropout modules on.

    Uses (and, with a seed, temporarily re-seeds and then restores) torch's global RNG.
    """
    x = _as_input(net, x)
    seeding = seeded_rng(seed, x.device) if seed is not None else contextlib.nullcontext()
    with torch.inference_mode(), enable_mc_dropout(net), seeding:
        return torch.stack([net(x) for _ in range(samples)])


def deterministic_outputs(net: nn.Module, x: Tensor | np.ndarray) -> Tensor:
    """Outputs ``[B, n_out]`` with dropout off: the weight-scaling rule for inverted dropout."""
    x = _as_input(net, x)
    with torch.inference_mode(), _eval_mode(net):
        return net(x)


@dataclass
class ClassificationPrediction:
    """MC-dropout summary for B inputs and C classes; entropies in nats.

    ``predictive_entropy`` (total) = ``expected_entropy`` (aleatoric) + ``mutual_information``
    (epistemic, the BALD score).
    """

    probabilities: np.ndarray  # [B, C] mean of the softmax over the T samples
    probabilities_std: np.ndarray  # [B, C] std of the softmax over the samples (1/T convention)
    label: np.ndarray  # [B] argmax of probabilities
    predictive_entropy: np.ndarray  # [B] entropy of the mean probabilities
    expected_entropy: np.ndarray  # [B] mean of the per-sample entropies
    mutual_information: np.ndarray  # [B] predictive_entropy - expected_entropy


def summarize_classification(logit_samples: Tensor) -> ClassificationPrediction:
    """Summarise logits ``[T, B, C]`` (computed in float64, 0 log 0 = 0)."""
    if logit_samples.ndim != 3:
        raise ValueError(f"logit samples must have shape [T, B, C], got {tuple(logit_samples.shape)}")
    # The log-softmax spelled out (one exp, shared with the probabilities): for T = 100 and a
    # few classes torch's log_softmax over the short last dim, and std over the samples, were
    # most of a served prediction's CPU time (~3x and ~7x these elementwise steps here).
    shifted = logit_samples.detach().to(torch.float64)
    shifted = shifted - shifted.amax(dim=-1, keepdim=True)  # <= 0, max 0: exp cannot overflow
    exponentials = shifted.exp()
    normaliser = exponentials.sum(dim=-1, keepdim=True)  # in [1, C]
    probabilities = exponentials.div_(normaliser)
    log_probabilities = shifted.sub_(normaliser.log_())  # finite, so p log p = 0 where p underflows
    mean = probabilities.mean(dim=0)
    predictive_entropy = -torch.xlogy(mean, mean).sum(dim=-1)
    expected_entropy = -(probabilities * log_probabilities).sum(dim=-1).mean(dim=0)
    # Jensen: the difference is >= 0, so a negative value is round-off only.
    mutual_information = (predictive_entropy - expected_entropy).clamp(min=0.0)
    # Population std over the samples: sqrt(mean((p - mean)^2)), two passes as torch.std.
    probabilities_std = (probabilities - mean).square_().mean(dim=0).sqrt_()
    return ClassificationPrediction(
        probabilities=mean.cpu().numpy(),
        probabilities_std=probabilities_std.cpu().numpy(),
        label=mean.argmax(dim=-1).cpu().numpy(),
        predictive_entropy=predictive_entropy.cpu().numpy(),
        expected_entropy=expected_entropy.cpu().numpy(),
        mutual_information=mutual_information.cpu().numpy(),
    )


@dataclass
class RegressionPrediction:
    """MC-dropout predictive mean and spread for B inputs, in original target units.

    Homoscedastic nets have one ``aleatoric_std = 1 / sqrt(tau)`` (a float); heteroscedastic
    nets predict it per input (an array ``[B]``).
    """

    mean: np.ndarray  # [B]
    std: np.ndarray  # [B] total: sqrt(epistemic_std**2 + aleatoric_std**2)
    epistemic_std: np.ndarray  # [B] std of the T samples (1/T convention)
    aleatoric_std: float | np.ndarray  # 1 / sqrt(tau) (float), or [B] sqrt(mean_t variance_t)
    lower: np.ndarray  # [B] mean - 1.96 std (central 95% interval of a Gaussian)
    upper: np.ndarray  # [B] mean + 1.96 std


def summarize_regression(output_samples: Tensor, tau: float) -> RegressionPrediction:
    """Summarise outputs ``[T, B]`` or ``[T, B, 1]`` in original units; ``tau`` is the model precision."""
    if not tau > 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    samples = output_samples.detach().to(torch.float64)
    if samples.ndim == 3 and samples.shape[-1] == 1:
        samples = samples.squeeze(-1)
    if samples.ndim != 2:
        shape = tuple(output_samples.shape)
        raise ValueError(f"output samples must have shape [T, B] or [T, B, 1], got {shape}")
    mean = samples.mean(dim=0).cpu().numpy()
    epistemic_variance = samples.var(dim=0, correction=0).cpu().numpy()
    std = np.sqrt(epistemic_variance + 1.0 / tau)
    return RegressionPrediction(
        mean=mean,
        std=std,
        epistemic_std=np.sqrt(epistemic_variance),
        aleatoric_std=float(1.0 / np.sqrt(tau)),
        lower=mean - NORMAL_95_QUANTILE * std,
        upper=mean + NORMAL_95_QUANTILE * std,
    )


def heteroscedastic_to_original_units(
    outputs: Tensor, shift: float = 0.0, scale: float = 1.0
) -> tuple[Tensor, Tensor]:
    """Split heteroscedastic outputs ``[..., 2]`` (mean, log-variance of the standardised target)
    into float64 ``(mean * scale + shift, log_variance + 2 log scale)`` in original units."""
    if outputs.shape[-1] != 2:
        raise ValueError(f"heteroscedastic outputs must end in (mean, log-variance), got {tuple(outputs.shape)}")
    if not scale > 0:
        raise ValueError(f"scale must be > 0, got {scale}")
    outputs = outputs.detach().to(torch.float64)
    return outputs[..., 0] * scale + shift, outputs[..., 1] + 2.0 * float(np.log(scale))


def summarize_regression_heteroscedastic(mean_samples: Tensor, log_variance_samples: Tensor) -> RegressionPrediction:
    """Summarise a heteroscedastic net's samples ``mu_t, log var_t`` (``[T, B]``, original units).

    Aleatoric variance ``mean_t var_t``, epistemic variance ``var_t(mu_t)`` (1/T convention),
    total std ``sqrt(aleatoric + epistemic)``; the interval is the central 95% of a Gaussian
    with the total std (an approximation of the mixture ``(1/T) sum_t N(mu_t, var_t)``).
    See :func:`heteroscedastic_to_original_units` for converting the net's outputs.
    """
    means = mean_samples.detach().to(torch.float64)
    log_variances = log_variance_samples.detach().to(torch.float64)
    if means.ndim != 2 or means.shape != log_variances.shape:
        raise ValueError(
            "mean and log-variance samples need the same shape [T, B], got "
            f"{tuple(mean_samples.shape)} and {tuple(log_variance_samples.shape)}"
        )
    mean = means.mean(dim=0).cpu().numpy()
    epistemic_variance = means.var(dim=0, correction=0).cpu().numpy()
    aleatoric_variance = log_variances.exp().mean(dim=0).cpu().numpy()
    std = np.sqrt(epistemic_variance + aleatoric_variance)
    return RegressionPrediction(
        mean=mean,
        std=std,
        epistemic_std=np.sqrt(epistemic_variance),
        aleatoric_std=np.sqrt(aleatoric_variance),
        lower=mean - NORMAL_95_QUANTILE * std,
        upper=mean + NORMAL_95_QUANTILE * std,
    )
