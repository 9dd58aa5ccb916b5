"""Monte Carlo dropout prediction (Gal & Ghahramani, 2016).

Keeping dropout on at test time and averaging ``T`` stochastic forward passes approximates
the predictive distribution of a Bayesian network. :func:`sample_outputs` does the ``T``
passes as one batched computation: the net stays in ``eval()`` (so every non-dropout module
behaves as at test time), the part before the first dropout layer is computed once, and the
masks come from keys or a ``torch.Generator`` private to the call — never the global RNG — so
concurrent calls are safe and a seed reproduces the samples exactly. Each dropout rate is
rounded to a multiple of 2**-16 (as in :mod:`service.ml.sweep`) and each 1/keep scale is folded
into the next Linear. On the CPU the masks are drawn and applied in cache-sized blocks of rows
by the fused kernels of :mod:`service.ml.mc_kernels` — for ReLU nets the whole loop over blocks in
one machine-code call (:mod:`service.ml.mc_whole`, its matmuls the register-tiled kernels of
:mod:`service.ml.mc_simd`) that shares the blocks out over torch's threads; elsewhere by torch
ops on tensors the engine creates. What a call needs of the net (the plans, the scaled weights)
is kept per net while its modules, parameters and rates stay the same.
:func:`sample_outputs_loop` is the reference.
"""

from __future__ import annotations

import contextlib
import functools
import os
import weakref
from collections.abc import Callable, Iterator
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
def _eval_mode(net: nn.Module, modules: tuple[nn.Module, ...] | None = None) -> Iterator[None]:
    """``net.eval()`` for the block; a no-op (no writes, so no races) if it already is. ``modules``:
    all of the net's modules, where the caller has them."""
    if not (any(m.training for m in modules) if modules is not None else _any_training(net)):
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


# The fused CPU path (service.ml.mc_kernels): rows per block, so that a block's activations stay
# in the core's cache (64 Ki floats: 256 KiB) while the masks, matmuls and activations go over it.
_FUSED_BLOCK_ELEMENTS = 1 << 16
_FUSED_ACTIVATIONS: dict[type[nn.Module], Callable[[Tensor], Tensor]] = {
    nn.Tanh: torch.tanh_, nn.Sigmoid: torch.sigmoid_, nn.GELU: lambda h: h.copy_(F.gelu(h)),
}


class _FusedDropout(NamedTuple):
    top: int  # service.ml.mc_kernels.mask_parameters of the keep count
    low: int
    threshold: int
    index: int  # which pair of keys


class _FusedLayer(NamedTuple):
    weight_t: Tensor  # [in, out] contiguous, with the 1/keep of the dropout before it folded in
    bias: np.ndarray  # [out] float32 (zeros without a bias), repeated: mc_kernels.tiled_bias
    relu: bool  # ReLU applied by the kernel
    activation: Callable[[Tensor], Tensor] | None  # another activation, in place, by torch
    dropout: _FusedDropout | None  # the dropout after it


class _FusedPlan(NamedTuple):
    first: _FusedDropout  # the dropout the prefix ends at
    layers: list[_FusedLayer]
    widest: int  # the widest activation, the prefix's included
    dropouts: int
    finish_last: bool  # whether the last layer has a bias or an activation to apply
    last_weight: Tensor | None  # [out, in] contiguous for a narrow last layer, computed as W @ hᵀ
    whole: _WholePlan | None  # the plan as mc_whole.run_blocks takes it: ReLU or no activation only


class _WholePlan(NamedTuple):
    """The arguments of :func:`service.ml.mc_whole.run_blocks` that describe the net."""
    first: np.ndarray  # int64 (top, low, threshold, key index) of the first dropout
    layers: np.ndarray  # int64 [Linear layers, mc_whole.COLUMNS]
    weights: np.ndarray  # float32, flat
    biases: np.ndarray  # float32, flat
    lanes: int  # the matmuls' vector width (mc_simd.LANES: 16 with AVX-512, else 8)
    outputs: int  # the net's outputs


def _whole_plan(first: _FusedDropout, layers: list[_FusedLayer]) -> _WholePlan | None:
    """The fused plan as flat arrays for :mod:`service.ml.mc_whole`; None where a layer has an
    activation other than ReLU (applied by torch between the kernels)."""
    if any(layer.activation is not None for layer in layers):
        return None
    from service.ml import mc_simd, mc_whole

    table = np.zeros((len(layers), mc_whole.COLUMNS), dtype=np.int64)
    weights, biases, weight_at, bias_at = [], [], 0, 0
    for i, layer in enumerate(layers):
        weight, dots = mc_whole.layer_weights(layer.weight_t.numpy(), i == len(layers) - 1, mc_simd.LANES)
        d = layer.dropout
        table[i] = (layer.weight_t.shape[0], layer.weight_t.shape[1], weight_at, bias_at, layer.bias.size,
                    layer.relu, d is not None, d.top if d else 0, d.low if d else 0, d.threshold if d else 0,
                    2 * d.index if d else 0, dots, layer.relu or bool(layer.bias.any()))
        weights.append(weight.reshape(-1))
        biases.append(layer.bias)
        weight_at += weight.size
        bias_at += layer.bias.size
    flat_weights, flat_biases = mc_simd.aligned_zeros(weight_at), mc_simd.aligned_zeros(bias_at)  # on cache lines
    flat_weights[:] = np.concatenate(weights)
    flat_biases[:] = np.concatenate(biases)
    return _WholePlan(np.array([first.top, first.low, first.threshold, 2 * first.index], dtype=np.int64), table,
                      flat_weights, flat_biases, mc_simd.LANES, layers[-1].weight_t.shape[1])


def _kernels():  # noqa: ANN202 (a module)
    """service.ml.mc_kernels, imported on first use: numba's import takes ~1 s, which processes
    that never sample (the CLI, migrations) should not pay."""
    global _KERNELS
    if _KERNELS is None:
        from service.ml import mc_kernels

        _KERNELS = mc_kernels
    return _KERNELS


_KERNELS = None
_WHOLE = None
# Whether the fused path runs its whole call in service.ml.mc_whole where it can (tests and the
# benchmarks turn it off to compare with the Python loop over blocks).
_WHOLE_CALL = True


def _whole():  # noqa: ANN202 (a module)
    global _WHOLE
    if _WHOLE is None:
        from service.ml import mc_whole

        _WHOLE = mc_whole
    return _WHOLE


def _fused_plan(suffix: list[nn.Module]) -> _FusedPlan | None:
    """The suffix as ``Dropout (Linear [activation] [Dropout])*`` for the fused CPU kernels, or
    None where it is anything else (other modules, two dropouts in a row, a trailing dropout, a
    rate the kernels do not draw): those nets take the general path."""
    mc_kernels = _kernels()
    dropouts: list[_FusedDropout] = []

    def dropout_of(module: nn.Module) -> tuple[_FusedDropout, float] | None:
        count = _keep_count(module.p)
        if type(module) is not nn.Dropout or not mc_kernels.supports_keep_count(count):
            return None
        top, low, threshold = mc_kernels.mask_parameters(count)
        dropouts.append(_FusedDropout(top, low, threshold, len(dropouts)))
        return dropouts[-1], _MASK_LEVELS / count

    modules = [m for m in suffix if not (type(m) is nn.Dropout and m.p == 0)]
    if not modules or type(modules[0]) is not nn.Dropout or (parsed := dropout_of(modules[0])) is None:
        return None
    first, scale = parsed
    layers: list[_FusedLayer] = []
    i = 1
    while i < len(modules):
        linear = modules[i]
        if type(linear) is not nn.Linear:
            return None
        i += 1
        relu, activation, dropout = False, None, None
        if i < len(modules) and type(modules[i]) is nn.ReLU:
            relu, i = True, i + 1
        elif i < len(modules) and type(modules[i]) in _FUSED_ACTIVATIONS:
            activation, i = _FUSED_ACTIVATIONS[type(modules[i])], i + 1
        next_scale = 1.0
        if i < len(modules) and type(modules[i]) is nn.Dropout:
            if i == len(modules) - 1 or (parsed := dropout_of(modules[i])) is None:
                return None
            (dropout, next_scale), i = parsed, i + 1
        weight = linear.weight.detach() * scale if scale != 1.0 else linear.weight.detach()
        bias = (linear.bias.detach().numpy() if linear.bias is not None
                else np.zeros(linear.out_features, dtype=np.float32))
        layers.append(_FusedLayer(weight.t().contiguous(), mc_kernels.tiled_bias(bias), relu, activation, dropout))
        scale = next_scale
    if not layers:
        return None
    widest = max([layers[0].weight_t.shape[0]] + [layer.weight_t.shape[1] for layer in layers])
    last = layers[-1]
    finish_last = last.activation is not None or last.relu or bool(last.bias.any())
    outputs = last.weight_t.shape[1]
    last_weight = last.weight_t.t().contiguous() if 1 < outputs < _NARROW_OUTPUTS else None
    return _FusedPlan(first, layers, widest, len(dropouts), finish_last, last_weight,
                      _whole_plan(first, layers))


def _fused_keys(count: int, seed: int | None) -> np.ndarray:
    """The fused path's ``count`` 64-bit keys (read-only): from the seed's generator, as always, or
    without a seed straight from the OS's randomness (which would otherwise seed a generator: 6-8 µs
    less a call, an eighth of a batch-1 prediction's engine time)."""
    if seed is None:
        return np.frombuffer(os.urandom(8 * count), dtype=np.uint64)
    return np.frombuffer(_seeded_keys(count, seed), dtype=np.uint64)


@functools.lru_cache(maxsize=1024)
def _seeded_keys(count: int, seed: int) -> bytes:
    """A seed's keys, kept for its next call: seeding a generator and drawing from it takes ~8 µs,
    and callers who pass a seed for reproducible predictions tend to pass the same one again."""
    return _random_words(count, _new_generator(seed, torch.device("cpu")), torch.device("cpu")).numpy().tobytes()


def _run_fused(prefix: Tensor, plan: _FusedPlan, samples: int, keys: np.ndarray, max_elements: int) -> Tensor:
    """``samples`` passes over ``prefix [rows, width]`` by blocks of rows: a new
    ``[samples * rows, n_out]``. Row ``t * rows + b`` is sample ``t`` of input ``b``; its masks
    depend on the keys and its row number only, so the block size does not change them.

    This Python loop calls ``torch.mm`` and the kernels block after block: the path of nets whose
    activations :mod:`service.ml.mc_whole` does not apply (ReLU or none it does, in
    :func:`_whole_call`, in machine code, its blocks split over ``torch.get_num_threads()`` threads)."""
    total = samples * prefix.shape[0]
    block = _block_rows(total, plan.widest, max_elements, False)
    mc_kernels = _kernels()
    prefix_np = mc_kernels.tiled_rows(prefix.contiguous().numpy())  # row (t·B + b) % its rows is b
    first, last = plan.first, plan.layers[-1]
    first_args = (keys[2 * first.index], keys[2 * first.index + 1], first.top, first.low, first.threshold)
    masked = torch.empty(block, prefix.shape[1])
    first_words = np.empty(mc_kernels.words_for(block, prefix.shape[1]), dtype=np.uint64)
    hidden = [(layer, torch.empty(block, layer.weight_t.shape[1]),
               np.empty(mc_kernels.words_for(block, layer.weight_t.shape[1]) if layer.dropout else 0, dtype=np.uint64))
              for layer in plan.layers[:-1]]
    # A narrow last layer (a few outputs) as W @ hᵀ into the columns of a transposed output: MKL
    # runs [rows, 64] @ [64, 10] at the speed of [rows, 64] @ [64, 64] (it pads the narrow side),
    # W @ hᵀ 2.5-4x faster (measured on AMD EPYC and Intel Xeon, 1 thread, 128-6400 rows).
    narrow = plan.last_weight
    output = torch.empty(total, last.weight_t.shape[1]) if narrow is None else torch.empty(narrow.shape[0], total)
    broadcast = mc_kernels.broadcast_dropout
    for start in range(0, total, block):
        n = min(block, total - start)
        h = masked if n == block else masked[:n]
        broadcast(prefix_np, h.numpy(), first_words, start, *first_args)
        for layer, out, words in hidden:
            h = torch.mm(h, layer.weight_t, out=out if n == block else out[:n])
            _finish_layer(h, layer, words, start, keys)
        if narrow is None:
            torch.mm(h, last.weight_t, out=output[start : start + n])
        else:
            torch.mm(narrow, h.t(), out=output[:, start : start + n])
    if narrow is not None:  # back to row order, with the bias and a ReLU on the way
        transposed = output
        output = torch.empty(total, narrow.shape[0])
        kind = mc_kernels.RELU if last.relu else mc_kernels.IDENTITY
        mc_kernels.transpose_bias_activation(transposed.numpy(), last.bias, kind, output.numpy())
        if last.activation is not None:
            last.activation(output)
    elif plan.finish_last:  # the last layer's bias and activation once over the whole output
        _finish_layer(output, last, _NO_WORDS, 0, keys)
    return output


_NO_WORDS = np.empty(0, dtype=np.uint64)  # a kernel call without dropout
# The whole-call path splits the rows into a multiple of this many blocks (where it needs more than
# one), so that 1, 2 or 4 threads get equal shares of whole blocks.
_BLOCK_MULTIPLE = 4


def _block_rows(total: int, widest: int, max_elements: int, whole: bool) -> int:
    """Rows per block of the fused path: as many as keep ``widest`` activations of the block in
    ``_FUSED_BLOCK_ELEMENTS`` (and ``max_elements``); for the whole-call path (``whole``) the fewest
    blocks of at most that many rows, their number rounded up to a multiple of ``_BLOCK_MULTIPLE``,
    then the rows shared out equally (the last block may be smaller, and where the blocks are many,
    one fewer). It depends on the call's shape only, never on the threads: each block's matmuls run
    on one thread, so a seed gives the same samples whatever the number of threads."""
    largest = max(1, min(total, min(_FUSED_BLOCK_ELEMENTS, max_elements) // widest))
    if not whole or largest >= total:
        return largest
    blocks = -(-total // largest)
    blocks = -(-blocks // _BLOCK_MULTIPLE) * _BLOCK_MULTIPLE
    return -(-total // blocks)


def _finish_layer(h: Tensor, layer: _FusedLayer, words: np.ndarray, start: int, keys: np.ndarray) -> None:
    """In place on a block of a Linear's outputs (global rows from ``start``): bias, activation, dropout."""
    mc_kernels, h_np, d = _kernels(), h.numpy(), layer.dropout
    bias, kind = layer.bias, mc_kernels.RELU if layer.relu else mc_kernels.IDENTITY
    if layer.activation is not None:  # torch's activation between the bias and the mask
        mc_kernels.bias_activation_dropout(h_np, bias, kind, _NO_WORDS, 0, keys[0], keys[0], 0, 0, 0)
        layer.activation(h)
        if d is None:
            return
        bias = np.zeros_like(bias)
    if d is None:
        mc_kernels.bias_activation_dropout(h_np, bias, kind, words, 0, keys[0], keys[0], 0, 0, 0)
    else:
        mc_kernels.bias_activation_dropout(h_np, bias, kind, words, start, keys[2 * d.index],
                                           keys[2 * d.index + 1], d.top, d.low, d.threshold)


class _Compiled(NamedTuple):
    """What a call needs of a net besides its inputs, kept while the net stays the same."""
    children: tuple[nn.Module, ...]  # the Sequential's modules, in order
    modules: tuple[nn.Module, ...]  # all of them, nested ones included
    watched: tuple[nn.Module, ...]  # those with parameters, and the dropouts (see _watched)
    tensors: tuple[Tensor, ...]  # the parameters (held, so that their ids stay theirs)
    state: tuple[float, ...]  # what _state read when this was built
    device: torch.device
    prefix: list[Callable[[Tensor], Tensor]]  # the layers before the first dropout, computed once per call
    suffix: list[nn.Module]
    deterministic: list[Callable[[Tensor], Tensor]]  # the suffix with dropout off (in eval mode)
    steps: list[_Step]  # the general path's plan of the suffix
    fused: _FusedPlan | None  # the fused CPU path's, where the suffix has its shape
    direct: _FusedPlan | None  # fused, where no torch op runs before the kernels' whole call (no prefix, CPU)


_COMPILED: weakref.WeakKeyDictionary[nn.Module, _Compiled] = weakref.WeakKeyDictionary()


def _state(modules: tuple[nn.Module, ...]) -> tuple[float, ...]:
    """Every parameter's id, version counter (it moves on every in-place update: optimiser steps,
    load_state_dict) and data pointer (``.to()`` swaps the data without a new version), and every
    dropout rate."""
    state: list[float] = []
    for module in modules:
        for tensor in module._parameters.values():
            if tensor is not None:
                state += (id(tensor), tensor._version, tensor.data_ptr())
        if isinstance(module, _DropoutNd):
            state.append(module.p)
    return tuple(state)


def _watched(modules: tuple[nn.Module, ...]) -> tuple[nn.Module, ...]:
    """The modules whose :func:`_state` a kept plan depends on: those with parameters and the
    dropouts (an activation or a container adds nothing to it, and a check per call skips them)."""
    return tuple(m for m in modules if isinstance(m, _DropoutNd) or any(t is not None for t in m._parameters.values()))


def _prefix_step(module: nn.Module) -> Callable[[Tensor], Tensor]:
    """``module``'s forward in eval mode, without nn.Module's call machinery for a Linear or a ReLU
    (no hooks to run on these; a few µs per layer of a batch-1 prediction)."""
    if type(module) is nn.Linear and not (module._forward_hooks or module._forward_pre_hooks):
        return lambda h: F.linear(h, module.weight, module.bias)
    if type(module) is nn.ReLU and not (module._forward_hooks or module._forward_pre_hooks):
        return torch.relu
    return module


def _compiled(net: nn.Sequential) -> _Compiled:
    """The net's plans, built once and reused while the net keeps its modules, parameters and
    rates (a batch-1 prediction would otherwise spend much of its time re-deriving them)."""
    compiled = _COMPILED.get(net)
    if (compiled is not None and tuple(net._modules.values()) == compiled.children
            and _state(compiled.watched) == compiled.state):
        return compiled
    children = tuple(net._modules.values())
    modules = tuple(net.modules())
    first = _first_sampled_dropout(list(children))
    suffix = list(children[first:])
    linears = [m for m in suffix if isinstance(m, nn.Linear)]
    with torch.no_grad():
        fused = None
        if linears and linears[0].weight.device.type == "cpu" and linears[0].weight.dtype == torch.float32:
            fused = _fused_plan(suffix)
        steps = _plan(suffix) if suffix else []
    watched = _watched(modules)
    compiled = _Compiled(
        children, modules, watched, tuple(t for m in modules for t in m._parameters.values() if t is not None),
        _state(watched), _device_of(net), [_prefix_step(m) for m in children[:first]], suffix,
        [_prefix_step(m) for m in suffix  # dropout is the identity in eval mode (hooks aside)
         if not (isinstance(m, _DropoutNd) and not (m._forward_hooks or m._forward_pre_hooks))], steps, fused,
        fused if fused is not None and fused.whole is not None and first == 0 else None)
    _COMPILED[net] = compiled
    return compiled


def sample_outputs(
    net: nn.Sequential,
    x: Tensor | np.ndarray,
    samples: int,
    seed: int | None = None,
    *,
    max_elements: int = 2**24,
    fused: bool = True,
) -> Tensor:
    """Draw ``samples`` (T) MC-dropout outputs for inputs ``x [B, D]``: a ``[T, B, n_out]`` tensor.

    Each ``nn.Dropout(p)`` with p > 0 multiplies by an inverted-dropout mask drawn independently
    per sample, row and unit: Bernoulli(keep) / keep, with keep = k / 2**16 and
    k = round((1 - p) * 2**16) clamped to [1, 2**16] — so p is rounded to a multiple of 2**-16
    (|error| <= 7.7e-6, the rule of :mod:`service.ml.sweep`) and the mask stays exactly unbiased
    for the rounded rate; p = 1 drops every unit, as ``nn.Dropout(1.0)``. Each 1/keep scale is
    folded into the weight of the ``nn.Linear`` that follows. ``x`` and the net are never modified.

    Two paths compute this, with the same distribution:

    * the fused CPU path, for float32 nets on the CPU shaped ``Dropout (Linear [activation]
      [Dropout])*`` after the cached prefix (every net :func:`service.ml.nets.build_network`
      makes): blocks of rows that stay in cache, each dropout drawn and applied in one pass by
      :mod:`service.ml.mc_kernels` (counter-based masks). With a ``seed`` the result is
      reproducible for the same inputs and T; ``max_elements`` (which caps the block) does not
      change the masks (the BLAS may round a differently shaped block differently, by an ulp).
    * the general path, for every other net and device (``fused=False`` forces it): torch ops
      on chunks of T samples, masks from 16-bit lanes of a private ``torch.Generator`` (one
      random bit per unit for p = 0.5). With a ``seed`` the result is reproducible for the same
      inputs, T and ``max_elements``; a different chunking gives different (identically
      distributed) samples.

    The two paths draw different masks for the same seed. Without a seed the masks use fresh OS
    randomness.
    """
    return _sample(net, x, samples, seed, max_elements=max_elements, fused=fused, deterministic=False)[0]


def sample_outputs_and_deterministic(
    net: nn.Sequential, x: Tensor | np.ndarray, samples: int, seed: int | None = None,
) -> tuple[Tensor, Tensor]:
    """:func:`sample_outputs` and :func:`deterministic_outputs` of the same inputs in one call (the
    same samples as ``sample_outputs`` with this seed): the net's kept plan is checked, the inputs
    converted and the part before the first dropout computed once for both."""
    outputs, deterministic = _sample(net, x, samples, seed, max_elements=2**24, fused=True, deterministic=True)
    assert deterministic is not None
    return outputs, deterministic


def _sample(
    net: nn.Sequential, x: Tensor | np.ndarray, samples: int, seed: int | None, *, max_elements: int,
    fused: bool, deterministic: bool,
) -> tuple[Tensor, Tensor | None]:
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    if not isinstance(net, nn.Sequential):
        raise TypeError("sample_outputs needs an nn.Sequential")
    compiled = _compiled(net)
    if compiled.direct is not None and fused and _WHOLE_CALL and not deterministic:
        direct = compiled.direct
        return _whole_call(direct, _input_array(x), samples, _fused_keys(2 * direct.dropouts, seed), max_elements), None
    x = torch.as_tensor(x).to(device=compiled.device, dtype=torch.float32)
    if x.ndim != 2:
        raise ValueError(f"inputs must have shape [batch, features], got {tuple(x.shape)}")
    whole = (fused and compiled.fused is not None and compiled.fused.whole is not None and _WHOLE_CALL
             and compiled.device.type == "cpu")
    with torch.inference_mode(), _eval_mode(net, compiled.modules), (
            _whole().one_mkl_thread() if whole and torch.get_num_threads() > 1 else contextlib.nullcontext()):
        prefix = x
        for step in compiled.prefix:
            prefix = step(prefix)
        dropout_off = None
        if deterministic:
            dropout_off = prefix
            for step in compiled.deterministic:
                dropout_off = step(dropout_off)
        return _sample_suffix(compiled, prefix, samples, seed, max_elements, fused), dropout_off


def _input_array(x: Tensor | np.ndarray) -> np.ndarray:
    """The inputs as a C-contiguous float32 ``[batch, features]`` array (a view where they are one)."""
    if isinstance(x, Tensor):
        try:
            array = x.numpy()  # a CPU tensor that autograd does not track: a view, of any numpy dtype
        except (RuntimeError, TypeError):  # tracked, on a GPU, or bfloat16
            array = x.detach().to("cpu", torch.float32).numpy()
    else:
        array = np.asarray(x)
        if not np.issubdtype(array.dtype, np.number) and array.dtype != np.bool_:
            array = torch.as_tensor(x).to(dtype=torch.float32).numpy()  # what torch would take
    if array.ndim != 2:
        raise ValueError(f"inputs must have shape [batch, features], got {tuple(array.shape)}")
    return np.ascontiguousarray(array, dtype=np.float32)


def _whole_call(plan: _FusedPlan, inputs: np.ndarray, samples: int, keys: np.ndarray, max_elements: int) -> Tensor:
    """``[T, B, n_out]`` from the kernels' whole call (:mod:`service.ml.mc_whole`) on ``inputs [B,
    D]``: the cached prefix, or the net's inputs themselves where its first module is the first
    dropout (no torch op runs then, so no inference-mode or eval-mode context is needed)."""
    whole = plan.whole
    assert whole is not None
    rows = inputs.shape[0]
    total = samples * rows
    output = np.empty((samples, rows, whole.outputs), dtype=np.float32)
    _whole().run(inputs, whole.first, whole.layers, whole.weights, whole.biases, keys,
                 output.reshape(total, whole.outputs), _block_rows(total, plan.widest, max_elements, True),
                 torch.get_num_threads(), whole.lanes)
    return torch.from_numpy(output)  # one torch call: each costs µs after the kernels have had the caches


def _sample_suffix(compiled: _Compiled, prefix: Tensor, samples: int, seed: int | None,
                   max_elements: int, fused: bool) -> Tensor:
    """The T passes of the suffix over ``prefix [rows, width]``: ``[T, rows, n_out]``."""
    rows = prefix.shape[0]
    if not compiled.suffix:
        return prefix.unsqueeze(0).expand(samples, *prefix.shape).clone()
    if fused and compiled.fused is not None and prefix.device.type == "cpu" and prefix.dtype == torch.float32:
        keys = _fused_keys(2 * compiled.fused.dropouts, seed)
        if _WHOLE_CALL and compiled.fused.whole is not None:
            return _whole_call(compiled.fused, prefix.contiguous().numpy(), samples, keys, max_elements)
        return _run_fused(prefix, compiled.fused, samples, keys, max_elements).view(samples, rows, -1)
    generator = _new_generator(seed, prefix.device)
    steps, suffix = compiled.steps, compiled.suffix
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


def warm_up() -> None:
    """Pay the engine's one-time costs (numba's import and the kernels' compilation, or loading them
    from its cache: ~1-2 s) at process start instead of in the first prediction."""
    net = nn.Sequential(nn.Linear(2, 4), nn.ReLU(), nn.Dropout(0.5), nn.Linear(4, 4), nn.ReLU(),
                        nn.Dropout(0.05), nn.Linear(4, 1))
    sample_outputs(net, torch.zeros(1, 2), 2, seed=0)
    _kernels().warm_up()  # the kernels as the Python loop over blocks calls them (nets with tanh or GELU)
    _whole().warm_up()  # the whole call on its own (the net above takes it, with read-only keys too)


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
        if isinstance(net, nn.Sequential):
            try:
                compiled = _compiled(net)
            except ValueError:  # a layout the sampler refuses: the net's own forward
                return net(x)
            for step in compiled.prefix:
                x = step(x)
            for step in compiled.deterministic:
                x = step(x)
            return x
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


# Up to this many logits (T·B·C) a CPU summary is one numba pass (mc_kernels.classification_summary)
# instead of ~20 torch ops, whose fixed costs are most of the work for a few rows: T = 100, ten
# classes, 1 thread, one row 9.6 vs 49 µs, 16 rows 124 vs 119 µs (an Intel Xeon). Above it torch's
# vectorised float64 exp wins (the kernel's exp is scalar: ~7.7 ns a logit against torch's ~5).
_SUMMARY_KERNEL_MAX_LOGITS = 1 << 14


def summarize_classification(logit_samples: Tensor) -> ClassificationPrediction:
    """Summarise logits ``[T, B, C]`` (computed in float64, 0 log 0 = 0)."""
    if logit_samples.ndim != 3:
        raise ValueError(f"logit samples must have shape [T, B, C], got {tuple(logit_samples.shape)}")
    if (logit_samples.device.type == "cpu" and logit_samples.dtype in (torch.float32, torch.float64)
            and 0 < logit_samples.numel() <= _SUMMARY_KERNEL_MAX_LOGITS):
        summary = _summarize_classification_kernel(logit_samples.detach().numpy())
        if summary is not None:
            return summary
    return _summarize_classification_torch(logit_samples)


def _summarize_classification_kernel(logits: np.ndarray) -> ClassificationPrediction | None:
    """The numba pass; None where a logit is not finite (torch's ops then give NaN where due)."""
    _, rows, classes = logits.shape
    mean, std = np.empty((rows, classes)), np.empty((rows, classes))
    predictive, expected, mutual = np.empty(rows), np.empty(rows), np.empty(rows)
    label = np.empty(rows, dtype=np.int64)
    if not _kernels().classification_summary(np.ascontiguousarray(logits), mean, std, predictive, expected,
                                             mutual, label):
        return None
    return ClassificationPrediction(probabilities=mean, probabilities_std=std, label=label,
                                    predictive_entropy=predictive, expected_entropy=expected,
                                    mutual_information=mutual)


def _summarize_classification_torch(logit_samples: Tensor) -> ClassificationPrediction:
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
