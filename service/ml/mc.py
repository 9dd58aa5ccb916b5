"""Monte Carlo dropout prediction (Gal & Ghahramani, 2016).

Keeping dropout on at test time and averaging ``T`` stochastic forward passes approximates
the predictive distribution of a Bayesian network. :func:`sample_outputs` does the ``T``
passes as one batched computation: the net stays in ``eval()`` (so every non-dropout module
behaves as at test time), the part before the first dropout layer is computed once, and the
masks come from a private ``torch.Generator`` — never the global RNG — so concurrent calls
are safe and a seed reproduces the samples exactly.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
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


@contextlib.contextmanager
def _eval_mode(net: nn.Module) -> Iterator[None]:
    """``net.eval()`` for the block; a no-op (no writes, so no races) if it already is."""
    if not any(module.training for module in net.modules()):
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
        elif any(isinstance(m, _DropoutNd) and m.p > 0 for m in module.modules()):
            raise ValueError(f"dropout nested inside {type(module).__name__} is not supported")
    return first


def sample_outputs(
    net: nn.Sequential,
    x: Tensor | np.ndarray,
    samples: int,
    seed: int | None = None,
    *,
    max_elements: int = 2**24,
) -> Tensor:
    """Draw ``samples`` (T) MC-dropout outputs for inputs ``x [B, D]``: a ``[T, B, n_out]`` tensor.

    Each ``nn.Dropout(p)`` with p > 0 multiplies by an inverted-dropout mask
    (Bernoulli(1 - p) / (1 - p)) drawn independently per sample, row and unit. The samples are
    computed in chunks of T so that no activation exceeds ``max_elements`` elements. With a
    ``seed`` the result is reproducible for the same inputs, batch size and ``max_elements``;
    the chunk size changes the order of the draws, so a different chunking gives different
    (identically distributed) samples. Without a seed the masks use fresh OS randomness.
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
        widest = max([prefix.shape[-1]] + [m.out_features for m in suffix if isinstance(m, nn.Linear)])
        chunk = max(1, max_elements // max(1, rows * widest))
        output: Tensor | None = None
        for start in range(0, samples, chunk):
            t = min(chunk, samples - start)
            hidden = prefix.unsqueeze(0).expand(t, *prefix.shape)
            for module in suffix:
                if isinstance(module, nn.Dropout):
                    if module.p > 0:
                        # Bernoulli(keep) as uniform < keep: several times faster than bernoulli_ on CPU.
                        keep = 1.0 - module.p
                        noise = torch.rand(hidden.shape, generator=generator, device=hidden.device,
                                           dtype=hidden.dtype)
                        hidden = hidden * noise.lt_(keep).div_(keep)
                else:
                    hidden = module(hidden.reshape(t * rows, -1)).reshape(t, rows, -1)
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
    log_probabilities = torch.log_softmax(logit_samples.detach().to(torch.float64), dim=-1)
    probabilities = log_probabilities.exp()
    mean = probabilities.mean(dim=0)
    predictive_entropy = -torch.xlogy(mean, mean).sum(dim=-1)
    # p * log p with a finite log p: exactly 0 where p underflows to 0.
    expected_entropy = -(probabilities * log_probabilities).sum(dim=-1).mean(dim=0)
    # Jensen: the difference is >= 0, so a negative value is round-off only.
    mutual_information = (predictive_entropy - expected_entropy).clamp(min=0.0)
    return ClassificationPrediction(
        probabilities=mean.cpu().numpy(),
        probabilities_std=probabilities.std(dim=0, correction=0).cpu().numpy(),
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
