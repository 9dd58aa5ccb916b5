"""1-2. The MC dropout engine: speed against a plain loop, GFLOP/s against a plain matmul, and why.

1. ``service.ml.mc.sample_outputs`` (T passes as one batched forward, the part before the first
   dropout computed once, masks from a private generator) against ``sample_outputs_loop``
   (T separate forwards), T = 100, batch 1 and 64.
2. The engine's achieved GFLOP/s (Linear FLOPs counted analytically: 2·m·n·k per layer over the
   T passes, the cached prefix once) against ``torch.matmul`` of a comparable shape
   ``[T·B, width] @ [width, width]`` timed in turn with the engine, block by block (pairs of
   ~50 ms blocks, each after a short pause; the share is the median of the pairs' ratios),
   float32, same threads; and the
   ceiling of the engine's arithmetic ("layers alone": the net's own Linear layers on the
   engine's blocks of rows by the engine's matmul kernels, no masks, bias or activation), next to
   the same layers by ``torch.mm``.

On the CPU every row measures the fused path (float32 nets shaped ``Dropout (Linear [act]
[Dropout])*`` after the cached prefix, i.e. every built-in net): blocks of rows that stay in
cache; for ReLU nets the whole call in one numba function (``service.ml.mc_whole``), its
matmuls the register-tiled kernels of ``service.ml.mc_simd`` with the bias, ReLU and next mask
applied as each tile is stored, the masks drawn by the kernels of ``service.ml.mc_kernels``, its
blocks shared out over the threads. CPU-only sections explain the numbers:

* 2b. the fused path against its Python loop over blocks and the general torch path
  (``sample_outputs(..., fused=False)``), batch 1, 16 and 64, both thread settings;
* 2c. where the time of a batch-64 call goes at 1 thread: the matmuls (the layers alone), the
  mask kernels (alone, on the engine's blocks) and the rest;
* 2d. the effect of the glibc malloc tuning on page faults.

Both networks: the README's textbook classifier (64 → 64 ReLU → dropout 0.5 → 64 ReLU →
dropout 0.5 → 10) and the UCI regression net (13 → dropout 0.05 → 50 ReLU → dropout 0.05 → 1).
Both thread settings: 1 thread (how the API serves) and torch's default.

The bench calls ``service.tuning.tune_allocator()`` first, as the API and the workers do at
start-up, so sections 1 to 2c measure the engine as it is served; mallopt is process-wide, so
under ``python -m bench`` the modules after this one run tuned too. Section 2d compares two
fresh processes, one left at glibc's defaults and one tuned.

``python -m bench.mc_engine [--quick]`` prints the sections.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from bench.report import Section
from service.ml import mc
from service.ml.mc import sample_outputs, sample_outputs_loop
from service.ml.nets import NetworkSpec, build_network
from service.tuning import tune_allocator

SAMPLES = 100  # T
BATCHES = (1, 64)
PATH_BATCHES = (1, 16, 64)  # section 2b
SPEEDUP_TARGET = 15.0
PEAK_FRACTION_TARGET = 0.5
SEED = 7


@dataclass(frozen=True)
class Network:
    name: str
    spec: NetworkSpec

    @property
    def width(self) -> int:
        return max(self.spec.hidden_layers)


NETWORKS = (
    Network("textbook 64-64-64-10, p=0.5", NetworkSpec(64, 10, (64, 64), (0.5, 0.5))),
    Network("UCI 13-50-1, p=0.05", NetworkSpec(13, 1, (50,), (0.05,), input_dropout=0.05)),
)

DEFAULT_THREADS = torch.get_num_threads()  # torch's default, read at import (before anything changes it)


def thread_settings() -> list[tuple[str, int]]:
    """(label, threads): 1 thread as the API serves, and torch's default if it differs."""
    settings = [("1", 1)]
    if DEFAULT_THREADS != 1:
        settings.append((f"default ({DEFAULT_THREADS})", DEFAULT_THREADS))
    return settings


@contextlib.contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def synchronizer(device: torch.device) -> Callable[[], None]:
    if device.type == "cuda":
        return torch.cuda.synchronize
    return lambda: None


def calibrated_repetitions(fn: Callable[[], object], block_s: float, sync: Callable[[], None]) -> int:
    """How many calls of ``fn`` take about ``block_s``, after a first (warm-up) call."""
    fn()
    sync()
    started, calls = time.perf_counter(), 0
    while calls < 2 or time.perf_counter() - started < block_s / 2:
        fn()
        calls += 1
    sync()
    return max(1, int(block_s / max((time.perf_counter() - started) / calls, 1e-9)))


def seconds_per_call(fn: Callable[[], object], *, quick: bool, sync: Callable[[], None] = lambda: None) -> float:
    """Median over timed blocks of the mean time per call (warm-up and calibration first).

    Stops adding blocks once a time budget is spent (a loaded machine can make calls 100x
    slower than calibrated), keeping at least one block in quick mode and three otherwise.
    """
    block_s, blocks, budget_s, least = (0.02, 3, 0.4, 1) if quick else (0.1, 9, 3.0, 3)
    begun = time.perf_counter()
    repetitions = calibrated_repetitions(fn, block_s, sync)
    times: list[float] = []
    while len(times) < blocks and (len(times) < least or time.perf_counter() - begun < budget_s):
        started = time.perf_counter()
        for _ in range(repetitions):
            fn()
        sync()
        times.append((time.perf_counter() - started) / repetitions)
    return statistics.median(times)


SETTLE_S = 0.02  # the pause before each of paired_seconds' blocks


def paired_seconds(first: Callable[[], object], second: Callable[[], object], *, quick: bool,
                   sync: Callable[[], None] = lambda: None) -> list[tuple[float, float]]:
    """Timed blocks of two calls in turn (first, second, first, second, ...): per pair, the mean
    time per call of each. Both calls of a pair run within a fraction of a second of each other,
    so they see the same machine: a neighbour on a core, the other vCPU's load or a clock change
    slows both, and their ratio stays. Each is warmed up and calibrated first (as
    :func:`seconds_per_call`); stops adding pairs once a time budget is spent, keeping at least
    one pair in quick mode and three otherwise.

    Each block starts after a pause of :data:`SETTLE_S`, so that it never runs beside the other's
    threads still spinning after its last call: libgomp's (MKL's matmul) spin ~4 ms after a
    parallel region, the engine's helpers 1 ms; beside them a call's threads share a core in time
    slices (a few calls of milliseconds each)."""
    block_s, pairs, budget_s, least = (0.02, 3, 0.6, 1) if quick else (0.05, 15, 5.0, 3)
    begun = time.perf_counter()
    repetitions = [calibrated_repetitions(fn, block_s, sync) for fn in (first, second)]
    times: list[tuple[float, float]] = []
    while len(times) < pairs and (len(times) < least or time.perf_counter() - begun < budget_s):
        pair = []
        for fn, count in zip((first, second), repetitions):
            time.sleep(SETTLE_S)
            started = time.perf_counter()
            for _ in range(count):
                fn()
            sync()
            pair.append((time.perf_counter() - started) / count)
        times.append((pair[0], pair[1]))
    return times


def linear_flops(net: nn.Sequential, batch: int, samples: int) -> int:
    """2·m·n·k per Linear: once for the layers before the first sampled dropout (the cached
    prefix), ``samples`` times for the others."""
    flops, passes = 0, 1
    for module in net:
        if isinstance(module, nn.Dropout) and module.p > 0:
            passes = samples
        elif isinstance(module, nn.Linear):
            flops += 2 * passes * batch * module.in_features * module.out_features
    return flops


def matmul_call(rows: int, width: int, device: torch.device) -> Callable[[], object]:
    """float32 ``[rows, width] @ [width, width]`` with ``torch.matmul``: the baseline of item 2."""
    generator = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(rows, width, generator=generator, device=device)
    b = torch.randn(width, width, generator=generator, device=device)
    return lambda: torch.matmul(a, b)


def matmul_gflops(rows: int, width: int, device: torch.device, *, quick: bool) -> float:
    """GFLOP/s of :func:`matmul_call`."""
    seconds = seconds_per_call(matmul_call(rows, width, device), quick=quick, sync=synchronizer(device))
    return 2 * rows * width * width / seconds / 1e9


def split_linears(net: nn.Sequential) -> tuple[list[nn.Linear], list[nn.Linear]]:
    """The Linear layers before the first sampled dropout (the cached prefix) and after it."""
    modules = list(net)
    first = next((i for i, m in enumerate(modules) if isinstance(m, nn.Dropout) and m.p > 0), len(modules))
    return ([m for m in modules[:first] if isinstance(m, nn.Linear)],
            [m for m in modules[first:] if isinstance(m, nn.Linear)])


def engine_block_rows(net: nn.Sequential, batch: int, samples: int, device: torch.device) -> int:
    """Rows per block as ``sample_outputs`` (default ``max_elements``) splits the T·B rows: on the
    CPU the fused path's blocks (``service.ml.mc._block_rows``: at most 65536 // widest rows, and
    for the whole call their number rounded up to a multiple of 4); elsewhere the general path's
    chunks of ``max_elements // (B·widest)`` samples. ``widest``: the widest activation after the
    prefix."""
    _, suffix = split_linears(net)
    widest = max([suffix[0].in_features] + [m.out_features for m in suffix])
    total, max_elements = samples * batch, 2**24
    if device.type == "cpu":  # every built-in float32 net takes the fused path there
        return mc._block_rows(total, widest, max_elements, whole=uses_whole_call(net))
    chunk = max(1, max_elements // max(1, batch * widest))
    return min(chunk, samples) * batch


def mc_simd_lanes() -> int:
    """The vector width of the whole call's matmuls on this machine (16 with AVX-512, else 8)."""
    from service.ml import mc_simd

    return mc_simd.LANES


def uses_whole_call(net: nn.Sequential) -> bool:
    """Whether the engine runs this net's fused CPU path as one machine-code call (service.ml.mc_whole)."""
    fused = mc._compiled(net).fused
    return fused is not None and fused.whole is not None and mc._WHOLE_CALL


class LayersAlone:
    """The net's own Linear layers by torch (the BLAS: MKL on the CPU), with no masks, bias or
    activation: the prefix Linear layers once over B rows, then each Linear after the prefix as
    ``torch.mm(h, Wᵀ, out=...)`` on blocks of :func:`engine_block_rows` rows over the T·B rows (the
    last layer into a ``[T·B, n_out]`` output, or on the CPU a narrow one as ``W @ hᵀ`` into an
    ``[n_out, T·B]`` one, hidden ones into per-block buffers), as the fused path's Python loop and
    the general path make them. Same FLOPs as :func:`linear_flops`."""

    def __init__(self, net: nn.Sequential, batch: int, samples: int, device: torch.device) -> None:
        prefix, suffix = split_linears(net)
        generator = torch.Generator(device=device).manual_seed(5)
        self.total = samples * batch
        self.block = engine_block_rows(net, batch, samples, device)
        with torch.no_grad():
            self.prefix = [(torch.randn(batch, m.in_features, generator=generator, device=device),
                            m.weight.detach().t().contiguous(), torch.empty(batch, m.out_features, device=device))
                           for m in prefix]
            weights = [m.weight.detach().t().contiguous() for m in suffix]
        self.input = torch.randn(self.block, suffix[0].in_features, generator=generator, device=device)
        self.hidden = [(w, torch.empty(self.block, w.shape[1], device=device)) for w in weights[:-1]]
        self.last = weights[-1]
        # As the fused path: a narrow last layer as W @ hᵀ into the columns of a transposed output.
        outputs = self.last.shape[1]
        self.narrow = (self.last.t().contiguous() if device.type == "cpu" and 1 < outputs < mc._NARROW_OUTPUTS
                       else None)
        self.output = (torch.empty(self.total, outputs, device=device) if self.narrow is None
                       else torch.empty(outputs, self.total, device=device))

    def __call__(self) -> None:
        for x, weight_t, out in self.prefix:
            torch.mm(x, weight_t, out=out)
        block, total = self.block, self.total
        for start in range(0, total, block):
            n = min(block, total - start)
            h = self.input if n == block else self.input[:n]
            for weight_t, out in self.hidden:
                h = torch.mm(h, weight_t, out=out if n == block else out[:n])
            if self.narrow is None:
                torch.mm(h, self.last, out=self.output[start : start + n])
            else:
                torch.mm(self.narrow, h.t(), out=self.output[:, start : start + n])


class EngineLayersAlone:
    """The net's own Linear layers by the whole call's matmul kernels (service.ml.mc_simd), with no
    masks, bias or activation: the prefix Linear layers once over B rows (torch, as the engine
    computes them), then per block of :func:`engine_block_rows` rows each Linear as the whole call
    runs it — ``mc_simd.gemm`` on its padded weights, or ``mc_simd.dot_rows`` for a last layer of
    at most ``mc_simd.DOT_OUTPUTS`` outputs, or, where the whole call computes such a last layer
    from the tiles of the layer before it, ``mc_simd.layer_dot`` for the two (zero biases, no
    ReLU, no mask) — into per-block buffers. Same FLOPs as :func:`linear_flops`."""

    def __init__(self, net: nn.Sequential, batch: int, samples: int) -> None:
        from service.ml import mc_simd, mc_whole

        prefix, _ = split_linears(net)
        plan = mc._compiled(net).fused.whole
        generator = torch.Generator().manual_seed(5)
        self.simd, self.total, self.lanes = mc_simd, samples * batch, plan.lanes
        self.block = engine_block_rows(net, batch, samples, torch.device("cpu"))
        with torch.no_grad():
            self.prefix = [(torch.randn(batch, m.in_features, generator=generator), m.weight.detach().t().contiguous(),
                            torch.empty(batch, m.out_features)) for m in prefix]
        self.layers = []
        k = int(plan.layers[0, mc_whole.IN])
        h = torch.randn(self.block, k, generator=generator).numpy()
        self.input = h
        for row in plan.layers:
            m, at, dots = int(row[mc_whole.OUT]), int(row[mc_whole.WEIGHT]), bool(row[mc_whole.DOTS])
            shape = (m, mc_simd.padded(k, plan.lanes)) if dots else (k, mc_simd.padded(m, plan.lanes))
            weights = plan.weights[at : at + shape[0] * shape[1]].reshape(shape)
            self.layers.append((dots, weights, mc_simd.aligned_zeros((self.block, m))))  # as run_blocks's
            k = m
        self.fuse_last = mc_whole.fuses_last(plan.layers, plan.lanes)  # as run_blocks decides it
        widest = max(int(w) for w in plan.layers[:, mc_whole.OUT])
        self.zeros = np.zeros(mc_simd.padded(widest, plan.lanes), dtype=np.float32)
        self.no_mask = np.empty(0, dtype=np.uint8)

    def __call__(self) -> None:
        for x, weight_t, out in self.prefix:
            torch.mm(x, weight_t, out=out)
        simd, lanes, zeros, layers = self.simd, self.lanes, self.zeros, self.layers
        last = len(layers) - 2 if self.fuse_last else len(layers)
        for start in range(0, self.total, self.block):
            n = min(self.block, self.total - start)
            h = self.input[:n]
            for i, (dots, weights, out) in enumerate(layers):
                if i == last:  # this layer and the last from its tiles
                    _, weights2, out2 = layers[i + 1]
                    simd.layer_dot(h, weights, out.shape[1], zeros, 0, self.no_mask, 0, weights2, zeros, 0,
                                   out2[:n], lanes)
                    break
                if dots:
                    simd.dot_rows(h, weights, out[:n], lanes)
                else:
                    simd.gemm(h, weights, out[:n], lanes)
                h = out[:n]


def load_average() -> str:
    try:
        return "/".join(f"{value:.2f}" for value in os.getloadavg())
    except OSError:
        return "?"


# -- measurements ------------------------------------------------------------------------------
@dataclass
class Measurement:
    network: Network
    threads: str
    batch: int
    engine_s: float
    loop_s: float
    layers_s: float  # the engine's matmuls alone (EngineLayersAlone on the CPU, LayersAlone elsewhere)
    blas_s: float  # the same Linear layers by torch (LayersAlone)
    flops: int
    matmul_gflops: float  # the median of the pairs' matmul blocks
    share: float  # engine GFLOP/s / matmul GFLOP/s: the median of the pairs' ratios
    share_spread: tuple[float, float]  # the pairs' ratios' lower and upper quartiles (their middle half)

    @property
    def speedup(self) -> float:
        return self.loop_s / self.engine_s

    def gflops(self, seconds: float) -> float:
        return self.flops / seconds / 1e9


def measure(quick: bool = False, device: str | torch.device = "cpu",
            threads: list[tuple[str, int]] | None = None) -> list[Measurement]:
    device = torch.device(device)
    sync = synchronizer(device)
    results = []
    for label, count in threads or thread_settings():
        with torch_threads(count):
            for network in NETWORKS:
                net = build_network(network.spec, seed=0).to(device)
                generator = torch.Generator().manual_seed(1)
                for batch in BATCHES:
                    x = torch.randn(batch, network.spec.n_inputs, generator=generator).to(device)
                    # The engine and the matmul baseline in turn, block by block (paired_seconds):
                    # the share is the median of the pairs' ratios, each pair seeing the same machine.
                    baseline_flops = 2 * SAMPLES * batch * network.width ** 2
                    flops = linear_flops(net, batch, SAMPLES)
                    pairs = paired_seconds(matmul_call(SAMPLES * batch, network.width, device),
                                           lambda: sample_outputs(net, x, SAMPLES, SEED), quick=quick, sync=sync)
                    engine = statistics.median(e for _, e in pairs)
                    matmul = baseline_flops / statistics.median(m for m, _ in pairs) / 1e9
                    ratios = [(flops / e) / (baseline_flops / m) for m, e in pairs]
                    share = statistics.median(ratios)
                    spread = (share, share) if len(ratios) < 2 else tuple(statistics.quantiles(ratios, n=4)[::2])
                    loop = seconds_per_call(lambda: sample_outputs_loop(net, x, SAMPLES, SEED), quick=quick, sync=sync)
                    blas = seconds_per_call(LayersAlone(net, batch, SAMPLES, device), quick=quick, sync=sync)
                    layers = (seconds_per_call(EngineLayersAlone(net, batch, SAMPLES), quick=quick)
                              if device.type == "cpu" and uses_whole_call(net) else blas)
                    results.append(Measurement(network, label, batch, engine, loop, layers, blas, flops, matmul, share,
                                               spread))
    return results


@contextlib.contextmanager
def python_loop() -> Iterator[None]:
    """The fused path as a Python loop over blocks (torch.mm and the kernels called block after
    block) instead of the whole call in machine code, for the block."""
    saved = mc._WHOLE_CALL
    mc._WHOLE_CALL = False
    try:
        yield
    finally:
        mc._WHOLE_CALL = saved


def path_comparison(quick: bool, threads: list[tuple[str, int]] | None = None) -> list[list[object]]:
    """Rows of 2b: ms per call of the fused CPU path as the engine runs it (the whole call where it
    can), of the same path as a Python loop over blocks, and of the general torch path, same net,
    inputs, seed and threads, measured back to back."""
    rows: list[list[object]] = []
    for label, count in threads or thread_settings():
        with torch_threads(count):
            for network in NETWORKS:
                net = build_network(network.spec, seed=0)
                generator = torch.Generator().manual_seed(2)
                for batch in PATH_BATCHES:
                    x = torch.randn(batch, network.spec.n_inputs, generator=generator)
                    fused = seconds_per_call(lambda: sample_outputs(net, x, SAMPLES, SEED, fused=True), quick=quick)
                    with python_loop():
                        loop = seconds_per_call(lambda: sample_outputs(net, x, SAMPLES, SEED, fused=True), quick=quick)
                    general = seconds_per_call(lambda: sample_outputs(net, x, SAMPLES, SEED, fused=False), quick=quick)
                    rows.append([network.name, label, batch, fused * 1e3, loop * 1e3, loop / fused, general * 1e3,
                                 general / fused])
    return rows


_MASK_WORK: list[Callable[..., None]] = []


def _compiled_mask_work() -> Callable[..., None]:
    """KernelsAlone's loop over the blocks as a numba function, as run_blocks runs it (compiled on
    first use; the kernels it calls are service.ml.mc_kernels')."""
    if not _MASK_WORK:
        from numba import njit

        from service.ml.mc_kernels import bias_activation_dropout, broadcast_dropout, draw

        @njit(nogil=True)
        def mask_work(total, block, prefix, masked, words, keys, first, draws, output, bias, relu, finish):  # noqa: ANN001, ANN202
            start = 0
            while start < total:
                n = min(block, total - start)
                broadcast_dropout(prefix, masked[:n], words, start, keys[first[3]], keys[first[3] + 1], first[0],
                                  first[1], first[2])
                for d in range(draws.shape[0]):
                    width, key = draws[d, 0], draws[d, 1]
                    draw(words, start * width, n * width, keys[key], keys[key + 1], draws[d, 2], draws[d, 3])
                if finish:
                    bias_activation_dropout(output[:n], bias, relu, words[:0], 0, keys[0], keys[0], 0, 0, 0)
                start += n

        _MASK_WORK.append(mask_work)
    return _MASK_WORK[0]


class KernelsAlone:
    """The whole call's mask work on the engine's blocks of the T·B rows, with no matmuls: per
    block the first dropout (the prefix broadcast and masked: ``mc_kernels.broadcast_dropout``),
    each hidden dropout's mask bytes drawn (``mc_kernels.draw``; the whole call applies them with
    the bias and ReLU as it stores the matmul's tile), and a dot-product last layer's bias —
    service.ml.mc_kernels' functions on buffers of the blocks' shapes, called from one numba loop
    over the blocks as the whole call calls them (from Python, the ~1-3 µs dispatch of each call
    would weigh as much as the UCI net's draws)."""

    def __init__(self, net: nn.Sequential, batch: int, samples: int) -> None:
        from service.ml import mc_whole

        kernels, fused = mc._kernels(), mc._compiled(net).fused
        generator = torch.Generator().manual_seed(6)
        width = fused.layers[0].weight_t.shape[0]
        whole = fused.whole
        table = whole.layers
        last = table[-1]
        draws = np.array([(row[mc_whole.OUT], row[mc_whole.KEY], row[mc_whole.TOP], row[mc_whole.LOW])
                          for row in table[:-1] if row[mc_whole.DROPOUT]], dtype=np.int64).reshape(-1, 4)
        block = engine_block_rows(net, batch, samples, torch.device("cpu"))
        self.work = _compiled_mask_work()
        self.args = (samples * batch, block, kernels.tiled_rows(torch.randn(batch, width, generator=generator).numpy()),
                     torch.randn(block, width, generator=generator).numpy(),
                     np.empty(kernels.words_for(block, fused.widest) + 1, dtype=np.uint64),
                     mc._fused_keys(2 * fused.dropouts, 1), whole.first, draws,
                     torch.randn(block, int(last[mc_whole.OUT]), generator=generator).numpy(), fused.layers[-1].bias,
                     kernels.RELU if last[mc_whole.RELU] else kernels.IDENTITY,
                     bool(last[mc_whole.DOTS] and last[mc_whole.FINISH]))
        self.work(*self.args)  # compiled here, not in the timing

    def __call__(self) -> None:
        self.work(*self.args)


def time_split(quick: bool, batch: int = 64) -> list[dict[str, float]]:
    """2c: per network, at 1 thread, seconds per call of the engine, of its matmuls alone
    (EngineLayersAlone) and of its mask kernels alone (KernelsAlone); each the median of a few
    rounds measured back to back, so that the machine's load changes little between the three."""
    rounds = 1 if quick else 3
    results: list[dict[str, float]] = []
    with torch_threads(1):
        for network in NETWORKS:
            net = build_network(network.spec, seed=0)
            x = torch.randn(batch, network.spec.n_inputs, generator=torch.Generator().manual_seed(3))
            layers = EngineLayersAlone(net, batch, SAMPLES)
            kernels = KernelsAlone(net, batch, SAMPLES)
            engine_s: list[float] = []
            kernels_s: list[float] = []
            layers_s: list[float] = []
            for _ in range(rounds):
                engine_s.append(seconds_per_call(lambda: sample_outputs(net, x, SAMPLES, SEED), quick=quick))
                kernels_s.append(seconds_per_call(kernels, quick=quick))
                layers_s.append(seconds_per_call(layers, quick=quick))
            total = statistics.median(engine_s)
            matmuls = statistics.median(layers_s)
            kernels_time = statistics.median(kernels_s)
            results.append({"total": total, "matmuls": matmuls, "kernels": kernels_time,
                            "rest": total - matmuls - kernels_time})
    return results


def mask_units(net: nn.Sequential, batch: int, samples: int) -> int:
    """Dropout mask elements a fused call draws: T·B rows times the width of each sampled dropout."""
    plan = mc._compiled(net).fused
    widths = [plan.layers[0].weight_t.shape[0]] + [layer.weight_t.shape[1] for layer in plan.layers
                                                   if layer.dropout is not None]
    return samples * batch * sum(widths)


def budget_notes(results: list[Measurement], split: list[dict[str, float]], batch: int = 64) -> list[str]:
    """Per network, what the 50 % target of item 2 leaves for the masks at 1 thread, from 2c's times:
    the call may take 2 × FLOPs / matmul GFLOP/s; its matmuls alone take what 2c measured."""
    notes = []
    for network, part in zip(NETWORKS, split):
        m = next((m for m in results if m.network is network and m.threads == "1" and m.batch == batch), None)
        if m is None:
            continue
        budget = m.flops / (PEAK_FRACTION_TARGET * m.matmul_gflops * 1e9)
        units = mask_units(build_network(network.spec, seed=0), batch, SAMPLES)
        left = budget - part["matmuls"]
        rest = (f"which leaves {left * 1e6:,.0f} µs for the {units:,} mask elements (and the bias and ReLU): "
                f"{left / units * 1e9:.2f} ns each, where the mask kernels alone take "
                f"{part['kernels'] / units * 1e9:.2f} ns each" if left > 0 else
                f"{-left * 1e6:,.0f} µs over it before a single one of the {units:,} mask elements is drawn")
        notes.append(f"Budget, {network.name}: 50 % of the matmul's {m.matmul_gflops:.1f} GFLOP/s allows "
                     f"{budget * 1e6:,.0f} µs a call for its {m.flops / 1e6:.2f} MFLOP. Its matmuls alone take "
                     f"{part['matmuls'] * 1e6:,.0f} µs, {rest}.")
    return notes


class WholeCallAlone:
    """The whole call alone (``service.ml.mc_whole.run_blocks`` over all the blocks, on the calling
    thread) on the engine's arrays for the net at ``batch``: a call less its Python side (the
    checks, the key draw, the cached prefix, the output tensor)."""

    def __init__(self, net: nn.Sequential, batch: int, samples: int) -> None:
        from service.ml import mc_whole

        compiled = mc._compiled(net)
        self.run_blocks, self.plan = mc_whole.run_blocks, compiled.fused.whole
        width = compiled.fused.layers[0].weight_t.shape[0]
        self.prefix = torch.randn(batch, width, generator=torch.Generator().manual_seed(8)).numpy()
        self.keys = mc._fused_keys(2 * compiled.fused.dropouts, 1)
        total = samples * batch
        self.block = engine_block_rows(net, batch, samples, torch.device("cpu"))
        self.blocks = -(-total // self.block)
        self.out = np.empty((total, compiled.fused.layers[-1].weight_t.shape[1]), dtype=np.float32)

    def __call__(self) -> None:
        plan = self.plan
        self.run_blocks(self.prefix, plan.first, plan.layers, plan.weights, plan.biases, self.keys, self.out,
                        self.block, np.zeros(1, dtype=np.int64), self.blocks, plan.lanes)


def handoff_seconds(quick: bool) -> tuple[float, float]:
    """Median time a call on 2 threads waits for the engine's helper thread to join it
    (mc_whole.join_seconds): back to back (the helper still spinning since the last call), and
    after the caller spent twice the helpers' spin time elsewhere (the helper asleep, woken)."""
    from service.ml import mc_whole

    mc_whole.join_seconds()
    results = []
    for gap in (0.0, 2 * mc_whole.SPIN_SECONDS):
        times = []
        for _ in range(50 if quick else 300):
            until = time.perf_counter() + gap
            while time.perf_counter() < until:
                pass
            times.append(mc_whole.join_seconds())
        results.append(statistics.median(times))
    return results[0], results[1]


def thread_notes(results: list[Measurement], quick: bool, batch: int = 64) -> list[str]:
    """Per network, what the 50 % target asks of a call at torch's default threads and what the
    parts of a call measured here allow: the whole call alone and the rest of a call at 1 thread
    (measured back to back here), and the round trip of handing work to another thread."""
    many = {m.network.name: m for m in results if m.threads != "1" and m.batch == batch}
    if not many:
        return []
    back_to_back, after_gap = handoff_seconds(quick)
    from service.ml import mc_whole

    notes = [f"A helper thread of the engine joined a call {back_to_back * 1e6:,.2f} µs after it was posted back to "
             f"back (the helper spins for {mc_whole.SPIN_SECONDS * 1e3:g} ms after each call, as MKL's OpenMP threads, "
             f"which the matmul baseline runs on, spin between parallel regions) and {after_gap * 1e6:,.0f} µs after "
             f"{2 * mc_whole.SPIN_SECONDS * 1e3:g} ms without calls (median), when it has to be woken (on a VM its vCPU "
             "may have halted)."]
    for network in NETWORKS:
        if network.name not in many:
            continue
        mt = many[network.name]
        net = build_network(network.spec, seed=0)
        x = torch.randn(batch, network.spec.n_inputs, generator=torch.Generator().manual_seed(9))
        alone_call = WholeCallAlone(net, batch, SAMPLES)
        calls, alones = [], []
        with torch_threads(1):  # back to back, so that the machine's load changes little between the two
            for _ in range(1 if quick else 3):
                calls.append(seconds_per_call(lambda: sample_outputs(net, x, SAMPLES, SEED), quick=quick))
                alones.append(seconds_per_call(alone_call, quick=quick))
        alone = statistics.median(alones)
        serial = max(0.0, statistics.median(calls) - alone)
        threads = DEFAULT_THREADS
        budget = mt.flops / (PEAK_FRACTION_TARGET * mt.matmul_gflops * 1e9)
        ideal = serial + alone / threads
        notes.append(
            f"{threads} threads, {network.name}, batch {batch}: 50 % of the {threads}-thread matmul's "
            f"{mt.matmul_gflops:.0f} GFLOP/s allows {budget * 1e6:,.0f} µs a call. At 1 thread the whole call "
            f"alone (mc_whole.run_blocks) took {alone * 1e6:,.0f} µs and the rest of the call (Python, checks, "
            f"keys, prefix, output) {serial * 1e6:,.0f} µs; shared perfectly over {threads} threads with no "
            f"handoff, a call would take {ideal * 1e6:,.0f} µs ({'within' if ideal <= budget else 'over'} the "
            f"budget), and a helper joins after the wait above; measured: "
            f"{mt.engine_s * 1e6:,.0f} µs.")
    return notes


def allocation_probe(quick: bool) -> dict[str, dict[str, float]]:
    """The engine at batch 64, 1 thread: ms per call, minor page faults per call, and the share of
    this process's matmul GFLOP/s ([T·64, width] @ [width, width]) that the call reaches."""
    import resource

    results: dict[str, dict[str, float]] = {}
    torch.set_num_threads(1)
    for network in NETWORKS:
        net = build_network(network.spec, seed=0)
        x = torch.randn(64, network.spec.n_inputs, generator=torch.Generator().manual_seed(4))
        peak = matmul_gflops(SAMPLES * 64, network.width, torch.device("cpu"), quick=quick)
        seconds = seconds_per_call(lambda: sample_outputs(net, x, SAMPLES, SEED), quick=quick)
        calls = 20
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(calls):
            sample_outputs(net, x, SAMPLES, SEED)
        faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / calls
        fraction = linear_flops(net, 64, SAMPLES) / seconds / 1e9 / peak
        results[network.name] = {"ms": seconds * 1e3, "faults": faults, "of_matmul": fraction}
    return results


def _probe_in_subprocess(quick: bool, tuned: bool) -> dict[str, dict[str, float]]:
    import json
    import subprocess
    import sys
    from pathlib import Path

    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}  # glibc's defaults
    command = ([sys.executable, "-m", "bench.mc_engine", "--allocation-probe"] + (["--quick"] if quick else [])
               + (["--tuned"] if tuned else []))
    done = subprocess.run(command, env=env, cwd=Path(__file__).resolve().parents[1], capture_output=True,
                          text=True, timeout=600, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def allocation_section(quick: bool) -> Section:
    plain = _probe_in_subprocess(quick, tuned=False)
    tuned = _probe_in_subprocess(quick, tuned=True)
    rows = []
    for key in plain:
        rows.append([key, plain[key]["ms"], plain[key]["faults"], f"{100 * plain[key]['of_matmul']:.0f}%",
                     tuned[key]["ms"], tuned[key]["faults"], f"{100 * tuned[key]['of_matmul']:.0f}%",
                     plain[key]["ms"] / tuned[key]["ms"]])
    return Section(
        key="mc-engine-allocation",
        title=f"2d. Page faults: batch 64, T = {SAMPLES}, 1 thread, glibc malloc as is vs service.tuning",
        baseline="a fresh process with glibc's default (dynamic) malloc thresholds, same code",
        columns=["network", "default ms/call", "default page faults/call", "default / matmul",
                 "tuned ms/call", "tuned page faults/call", "tuned / matmul", "speed-up from tuning"],
        rows=rows,
        notes=["Tuned: service.tuning.tune_allocator() at start-up, i.e. mallopt(M_MMAP_THRESHOLD, 64 MiB) and "
               "mallopt(M_TRIM_THRESHOLD, 256 MiB), as the API and the workers call it. A call of the fused path "
               "allocates only per-block buffers of at most 256 KiB (64 Ki floats: the masked block and each hidden "
               "layer's outputs, plus their mask words) and its [T·B, n_out] output (250 KiB for the textbook net, "
               "25 KiB for the UCI net), under 1 MiB in all; glibc serves these from its heap even at its default "
               "thresholds once the first calls are done, so there are few page faults either way and the tuning "
               "changes little here. It still matters for the general path (fused=False, other nets and devices): "
               "its activation and mask tensors span whole chunks of T samples (~1.6 MB each for the textbook net "
               "at batch 64), which the default thresholds map from the kernel and give back, so their pages fault "
               "in again on every call. Two fresh processes, one after the other, each measured the same way; "
               "\"/ matmul\" is the share of that process's own matmul GFLOP/s (as in 2), the 50% target of item 2."],
    )


def run(quick: bool = False, device: str | torch.device = "cpu",
        threads: list[tuple[str, int]] | None = None) -> list[Section]:
    """The sections; ``threads`` as (label, count) pairs, default 1 and torch's default.

    Tunes glibc malloc for this process first (service.tuning.tune_allocator), as the API and the
    workers do at start-up.
    """
    tune_allocator()
    device = torch.device(device)
    load_before = load_average()
    results = measure(quick, device, threads)
    load_after = load_average()
    where = "" if device.type == "cpu" else f" on {device.type.upper()}"
    noise = (f"Load average (1/5/15 min) {load_before} before, {load_after} after: the machine is shared, "
             "so compare ratios, not absolute times.")

    speed_rows, speed_ok = [], []
    for m in results:
        ok = m.speedup >= SPEEDUP_TARGET
        if m.batch == 1:
            speed_ok.append(ok)
        speed_rows.append([m.network.name, m.threads, m.batch, m.engine_s * 1e3, m.loop_s * 1e3, m.speedup,
                           ("yes" if ok else "no") if m.batch == 1 else "—"])
    speed = Section(
        key="mc-engine",
        title=f"1. MC engine vs a plain loop of T forwards (T = {SAMPLES}){where}",
        baseline="service.ml.mc.sample_outputs_loop: T separate forward passes with the dropout modules on, "
                 "same net, inputs, seed and threads",
        columns=["network", "threads", "batch", "engine ms/call", "loop ms/call", "speed-up", ">= 15x"],
        rows=speed_rows,
        target=f">= {SPEEDUP_TARGET:.0f}x at batch 1 (every thread setting)",
        met=all(speed_ok),
        notes=[noise],
    )
    slow_default = [m for m in results if m.threads != "1" and m.batch == 1 and m.speedup < SPEEDUP_TARGET]
    if slow_default and device.type == "cpu":
        speed.notes.append(
            "With more than one thread, each matmul of the batched engine is an OpenMP parallel region; when "
            "another process holds one of the cores, every region waits for a time slice (oversubscription), "
            "so the engine can fall far behind the loop, whose tiny [B, 64] matmuls stay single-threaded. "
            "The API serves with 1 thread (MCDROP_API_TORCH_THREADS=1), which avoids this.")

    flop_rows, flop_ok = [], []
    for m in results:
        fraction = m.share
        ok = fraction >= PEAK_FRACTION_TARGET
        if m.batch == 64:
            flop_ok.append(ok)
        flop_rows.append([m.network.name, m.threads, m.batch, m.flops / 1e6, m.engine_s * 1e3, m.gflops(m.engine_s),
                          f"[{SAMPLES * m.batch}, {m.network.width}] @ [{m.network.width}, {m.network.width}]",
                          m.matmul_gflops, f"{100 * fraction:.0f}%",
                          f"{100 * m.share_spread[0]:.0f}-{100 * m.share_spread[1]:.0f}%",
                          ("yes" if ok else "no") if m.batch == 64 else "—",
                          m.gflops(m.layers_s), f"{100 * m.gflops(m.layers_s) / m.matmul_gflops:.0f}%"]
                         + ([m.gflops(m.blas_s)] if device.type == "cpu" else []))
    of_ceiling = "; ".join(f"{m.network.name}, {m.threads} thread{'' if m.threads == '1' else 's'}: "
                           f"{100 * m.layers_s / m.engine_s:.0f}%" for m in results if m.batch == 64)
    if device.type == "cpu":
        blocks = ", ".join(f"{engine_block_rows(build_network(n.spec), 64, SAMPLES, device):,} for the "
                           f"{n.name.split(',')[0]} net" for n in NETWORKS)
        whole = all(uses_whole_call(build_network(n.spec)) for n in NETWORKS)
        how = ("the whole call is one numba function (service.ml.mc_whole) that, per block, broadcasts the cached "
               "prefix over the samples and masks it (a kernel of service.ml.mc_kernels), then per Linear draws the "
               "next dropout's mask bytes and runs the register-tiled matmul of service.ml.mc_simd, which adds the "
               "bias, applies the ReLU and the mask as it stores each tile, in vectors of "
               f"{mc_simd_lanes()} floats; a last layer of at most 4 outputs is computed from the registers of the "
               "tiles of the layer before it where that layer fits one tile (up to 64 units with 16 lanes, 56 "
               "with 8: the UCI net's 50 either way), "
               "else as dot products along the rows. With more than one thread the calling thread and the "
               "engine's helper threads take the blocks one at a time from a shared counter, each running its "
               "blocks from end to end (the caller starts at once; the helpers spin for a while after each call, "
               "as OpenMP's threads do, and join the next within a microsecond), so masks and matmuls scale "
               "together and a seed gives the same samples whatever the threads" if whole else
               "per block, torch.mm (MKL) computes each Linear into a buffer of the block and one numba kernel of "
               "service.ml.mc_kernels adds the bias, applies the ReLU and draws and applies the next dropout's mask "
               "in one pass (the Python loop over blocks)")
        engine_notes = [
            "The engine here is sample_outputs' fused CPU path: the T·B rows go in blocks of at most 65536 / "
            f"widest activation rows, their number a multiple of 4 (at batch 64: {blocks}) that stay in the "
            f"core's cache; {how}.",
            "Layers alone: the net's own Linear layers computed on the engine's blocks with no masks, bias or "
            "activation, by the engine's own kernels (service.ml.mc_simd: gemm on the padded weights, dot_rows "
            "for a last layer of at most 4 outputs, each layer stored, or layer_dot for such a last layer and "
            "the one before it where the engine computes the one from the tiles of the other; the prefix Linear "
            "once over B rows by torch): at 1 thread the ceiling of the engine's arithmetic. torch layers "
            "alone: the same Linear "
            "layers as torch.mm with out= "
            "on the same blocks (MKL, a narrow last layer as W @ hᵀ), as the Python loop over blocks runs them. "
            "The engine left MKL for its own kernels because MKL runs these small shapes far below its square "
            "matmul (packing and dispatch on every call), most of all the UCI net's [·, 13] @ [13, 50] and "
            "[·, 50] @ [50, 1]; at more threads MKL parallelises each matmul, while the engine runs whole blocks "
            "on each thread.",
            "Engine GFLOP/s as a share of layers-alone GFLOP/s (at 1 thread how close the engine comes to that "
            f"ceiling), batch 64: {of_ceiling}. The UCI net does 22 Linear FLOPs per mask element (textbook: 75), "
            "so its masks weigh 3.4x as much per FLOP (2c).",
        ]
    else:
        engine_notes = [
            f"The engine here is sample_outputs' general path (torch ops over chunks of T samples){where}. "
            "Layers alone: the net's own Linear layers as torch.mm with out= over the same rows per chunk, the "
            "prefix Linear once, with no masks, bias or activation: the ceiling of an engine making those "
            f"BLAS calls. Engine GFLOP/s as a share of layers-alone GFLOP/s, batch 64: {of_ceiling}.",
        ]
    flops = Section(
        key="mc-engine-flops",
        title=f"2. MC engine GFLOP/s vs this machine's matmul GFLOP/s (float32, T = {SAMPLES}){where}",
        baseline="torch.matmul of [T·B, width] @ [width, width] (width = the widest hidden layer), float32, "
                 "same threads, timed in turn with the engine: blocks of ~50 ms of each, one after the other, "
                 f"each after a {SETTLE_S * 1e3:g} ms pause (so that neither runs beside the other's threads still "
                 "spinning after its last call), up to 15 pairs; engine / matmul is the median of the pairs' "
                 "ratios and the pairs' middle half their quartiles (how much the machine moved the share), the "
                 "ms/call and GFLOP/s columns the medians of the blocks",
        columns=["network", "threads", "batch", "engine MFLOP/call", "engine ms/call", "engine GFLOP/s",
                 "matmul shape", "matmul GFLOP/s", "engine / matmul", "pairs' middle half", ">= 50%",
                 "layers alone GFLOP/s",
                 "layers alone / matmul"] + (["torch layers alone GFLOP/s"] if device.type == "cpu" else []),
        rows=flop_rows,
        target=f">= {100 * PEAK_FRACTION_TARGET:.0f}% of matmul GFLOP/s at batch 64 (every thread setting)",
        met=all(flop_ok),
        notes=["FLOPs are the Linear layers' 2·m·n·k over the T passes; the layers before the first dropout "
               "are counted once (they are computed once). Masks, bias, ReLU and copies count as no FLOPs: they "
               "are the overhead this ratio exposes. The UCI net does 22 Linear FLOPs per mask element "
               "(textbook: 75)."] + engine_notes
              + (thread_notes(results, quick) if device.type == "cpu" else []) + [noise],
    )

    sections = [speed, flops]
    if device.type == "cpu":
        load_before = load_average()
        path_rows = path_comparison(quick, threads)
        sections.append(Section(
            key="mc-engine-paths",
            title=f"2b. Fused CPU path (whole call) vs its Python loop and the general torch path (T = {SAMPLES})",
            baseline="the same fused path as a Python loop over blocks (torch.mm and the kernels called block after "
                     "block, the engine's path for nets with tanh or GELU), and sample_outputs(..., "
                     "fused=False): the general path (torch ops over chunks of T samples, masks from 16-bit lanes of "
                     "a torch.Generator); same net, inputs, seed and threads",
            columns=["network", "threads", "batch", "fused ms/call", "Python loop ms/call", "speed-up vs loop",
                     "general ms/call", "speed-up vs general"],
            rows=path_rows,
            notes=["The fused path and its Python loop draw the same masks (the same samples up to float32 rounding: "
                   "the whole call's matmuls are service.ml.mc_simd's, the loop's torch.mm); "
                   "the general path draws masks with the same distribution (different masks for the same seed). "
                   "The three calls of a row are measured back to back. At torch's default threads the Python "
                   "loop's and the general path's matmuls are OpenMP parallel regions, so another process on the "
                   "cores slows them by uneven amounts (see 1).",
                   f"Load average (1/5/15 min) {load_before} before, {load_average()} after: the machine is shared, "
                   "so compare ratios, not absolute times."],
        ))
        split = time_split(quick)
        split_rows = []
        for network, part in zip(NETWORKS, split):
            total = part["total"]
            split_rows.append([network.name, total * 1e6]
                              + [value for key in ("matmuls", "kernels", "rest")
                                 for value in (part[key] * 1e6, f"{100 * part[key] / total:.0f}%")])
        sections.append(Section(
            key="mc-engine-profile",
            title=f"2c. Where the time goes: batch 64, T = {SAMPLES}, 1 thread",
            baseline="the engine's time per call (sample_outputs, fused path); the three shares add up to 100%",
            columns=["network", "engine µs/call", "matmuls µs/call", "matmuls share", "mask kernels µs/call",
                     "mask kernels share", "rest µs/call", "rest share"],
            rows=split_rows,
            notes=["Matmuls: the layers-alone time of section 2 (service.ml.mc_simd's kernels on the engine's "
                   "blocks, no masks, bias or activation), measured here. Mask kernels: the mask work of the whole "
                   "call alone on buffers of the engine's blocks (the first dropout broadcast and masked, each hidden "
                   "dropout's mask bytes drawn, a dot-product last layer's bias), called from Python "
                   "(bench.mc_engine.KernelsAlone). Rest: engine − matmuls − kernels — the bias, ReLU and masks "
                   "applied as the matmul stores its tiles, Python, allocations, the key draw, the cached prefix, and "
                   "what the kernels and the matmuls cost each other in cache when interleaved. Each is the median of "
                   f"{1 if quick else 3} round(s) of the three measured back to back; noise can make a small share "
                   "negative."] + budget_notes(results, split),
        ))
        sections.append(allocation_section(quick))
    return sections


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--allocation-probe", action="store_true", help="internal: print 2d's JSON for this process")
    parser.add_argument("--tuned", action="store_true", help="internal: with --allocation-probe, tune malloc first")
    args = parser.parse_args()
    if args.allocation_probe:
        import json

        if args.tuned:
            tune_allocator()
        print(json.dumps(allocation_probe(args.quick)))
        raise SystemExit(0)
    for section in run(quick=args.quick):
        print(section.markdown())
