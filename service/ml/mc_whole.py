"""The fused CPU path's whole call in one numba function, its matmuls by :mod:`service.ml.mc_simd`.

The per-block loop of :func:`service.ml.mc._run_fused` calls ``torch.mm`` and the kernels of
:mod:`service.ml.mc_kernels` from Python, block after block. :func:`run_blocks` runs that loop in
machine code: per block of rows the first dropout (the cached prefix broadcast and masked), then per
Linear the next dropout's mask bytes drawn and a register-tiled matmul (:func:`service.ml.mc_simd.layer`)
that adds the bias and applies the ReLU and that mask as it stores each tile. A last layer of at
most 4 outputs is computed from the registers of the tiles of the layer before it where that layer
fits one tile (:func:`service.ml.mc_simd.layer_dot`: up to 64 units with 16 lanes, 56 with 8), else as
dot products along the rows, then its bias and ReLU. The matmuls use ``mc_simd.LANES`` (16 floats
a vector with AVX-512, else 8). It
holds no GIL, so the rows of a call can be split over threads: in :func:`run` up to
``torch.get_num_threads()`` threads (the calling thread and the helpers of a team that spin for a
while after each call, as OpenMP's threads do, so that the next call finds them awake) take whole
blocks one at a time from a shared counter until none are left, each running its blocks end to end.
With several threads this beats threading each small matmul: that parallelises the matmuls only,
and the masks, bias and activation run on one core.

Masks depend only on the keys and the global row (see :mod:`service.ml.mc_kernels`) and every
matmul runs on one thread over the same block of rows, so a seed gives the same samples whatever
the number of threads. The samples equal those of the Python loop (``torch.mm``) up to float32
rounding: the sums are the same, in another order.

Nets: the fused plan's shape, ``Dropout (Linear [ReLU] [Dropout])*``, with the ReLU (or no
activation) applied by the kernels; a net with another activation keeps the Python loop.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import os
import platform
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
from llvmlite import ir
from numba import carray, njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from service.ml import mc_kernels, mc_simd, numba_cache
from service.ml.mc_kernels import bias_activation_dropout, broadcast_dropout

_FLAGS = dict(nogil=True, fastmath=True, error_model="numpy", cache=True, boundscheck=False)

# Columns of the int64 layer table (one row per Linear after the cached prefix).
IN, OUT, WEIGHT, BIAS, BIAS_SIZE, RELU, DROPOUT, TOP, LOW, THRESHOLD, KEY, DOTS, FINISH = range(13)
COLUMNS = 13


def _slot(context, builder, signature, args):  # noqa: ANN001, ANN202
    """The address of ``array[index]`` for an intrinsic ``(array, index, ...)`` of an int64 array."""
    data = context.make_array(signature.args[0])(context, builder, args[0]).data
    return builder.gep(data, [context.cast(builder, args[1], signature.args[1], types.intp)])


@intrinsic
def _atomic_load(typingctx, box, index):  # noqa: ANN001, ANN202, ARG001
    """``box[index]`` (int64), read atomically (acquire)."""
    def codegen(context, builder, signature, args):  # noqa: ANN001, ANN202
        return builder.load_atomic(_slot(context, builder, signature, args), "acquire", 8)

    return types.int64(box, index), codegen


@intrinsic
def _atomic_store(typingctx, box, index, value):  # noqa: ANN001, ANN202, ARG001
    """``box[index] = value`` (int64), atomically (release)."""
    def codegen(context, builder, signature, args):  # noqa: ANN001, ANN202
        value = context.cast(builder, args[2], signature.args[2], types.int64)
        builder.store_atomic(value, _slot(context, builder, signature, args), "release", 8)
        return context.get_dummy_value()

    return types.void(box, index, value), codegen


def _read_modify_write(operation: str):  # noqa: ANN202 (a numba intrinsic)
    @intrinsic
    def modify(typingctx, box, index, value):  # noqa: ANN001, ANN202, ARG001
        def codegen(context, builder, signature, args):  # noqa: ANN001, ANN202
            value = context.cast(builder, args[2], signature.args[2], types.int64)
            return builder.atomic_rmw(operation, _slot(context, builder, signature, args), value, "seq_cst")

        return types.int64(box, index, value), codegen

    return modify


# ``_atomic_add(box, index, value)``, ``_atomic_or(...)``: atomically, returning the value before.
_atomic_add, _atomic_or = _read_modify_write("add"), _read_modify_write("or")


@intrinsic
def _compare_exchange(typingctx, box, index, expected, value):  # noqa: ANN001, ANN202, ARG001
    """``box[index] = value`` if it holds ``expected``, atomically; whether it did."""
    def codegen(context, builder, signature, args):  # noqa: ANN001, ANN202
        expected = context.cast(builder, args[2], signature.args[2], types.int64)
        value = context.cast(builder, args[3], signature.args[3], types.int64)
        pair = builder.cmpxchg(_slot(context, builder, signature, args), expected, value, "seq_cst", "seq_cst")
        return builder.extract_value(pair, 1)

    return types.boolean(box, index, expected, value), codegen


_X86 = platform.machine().lower() in ("x86_64", "amd64", "i686", "i386")


@intrinsic
def _pause(typingctx):  # noqa: ANN001, ANN202, ARG001
    """A spin-wait hint (x86 ``pause``: the core idles ~40-140 cycles and leaves the line alone)."""
    def codegen(context, builder, signature, args):  # noqa: ANN001, ANN202, ARG001
        if _X86:
            pause = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), []),
                                                   "llvm.x86.sse2.pause")
            builder.call(pause, [])
        return context.get_dummy_value()

    return types.void(), codegen


@intrinsic
def _ticks(typingctx):  # noqa: ANN001, ANN202, ARG001
    """The CPU's cycle counter (x86 ``rdtsc``: constant rate); 0 on a target without one."""
    def codegen(context, builder, signature, args):  # noqa: ANN001, ANN202, ARG001
        counter = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.IntType(64), []),
                                                 "llvm.readcyclecounter")
        return builder.call(counter, [])

    return types.int64(), codegen


def _pointer_to(kind: types.Type):  # noqa: ANN202 (a numba intrinsic)
    @intrinsic
    def pointer(typingctx, address):  # noqa: ANN001, ANN202, ARG001
        def codegen(context, builder, signature, args):  # noqa: ANN001, ANN202
            return builder.inttoptr(args[0], context.get_value_type(signature.return_type))

        return types.CPointer(kind)(address), codegen

    return pointer


# An int64 address as a pointer to float32, int64 or uint64 (for numba.carray).
_f32_at, _i64_at, _u64_at = (_pointer_to(kind) for kind in (types.float32, types.int64, types.uint64))


def layer_weights(weight_t: np.ndarray, last: bool, lanes: int) -> tuple[np.ndarray, bool]:
    """A Linear's weights as :func:`run_blocks` takes them, from ``Wᵀ [in, out]``, and whether the
    layer runs as dot products: ``W [out, in]`` for a last layer of at most
    ``mc_simd.DOT_OUTPUTS`` outputs, else ``Wᵀ``; their rows padded with zeros to whole vectors of
    ``lanes`` either way (:func:`service.ml.mc_simd.gemm` and :func:`service.ml.mc_simd.layer_dot`
    load whole vectors of them)."""
    if last and weight_t.shape[1] <= mc_simd.DOT_OUTPUTS:
        return mc_simd.padded_weights(weight_t.T, lanes), True
    return mc_simd.padded_weights(weight_t, lanes), False


@njit(inline="always")
def fuses_last(layers, lanes):  # noqa: ANN001, ANN201 (numba)
    """Whether :func:`run_blocks` computes the narrow last layer of the table ``layers`` from the
    tiles of the layer before it (:func:`service.ml.mc_simd.layer_dot`), whose outputs are then
    never stored."""
    count = layers.shape[0]
    return count >= 2 and layers[count - 1, DOTS] != 0 and mc_simd.fits_one_tile(layers[count - 2, OUT], lanes)


@njit(**_FLAGS)
def run_blocks(prefix, first, layers, weights, biases, keys, out, block, counter, end_block, lanes):
    """Blocks of ``block`` rows of the T·B rows into ``out [T·B, n_out]``, taken one at a time from
    ``counter`` (int64 ``[1]``, shared by the threads of a call) until it reaches ``end_block``;
    the matmuls in vectors of ``lanes`` (``mc_simd.NARROW`` or ``mc_simd.WIDE``).

    ``prefix``: the cached prefix ``[B, width]`` (repeated here as ``tiled_rows`` does); ``first``:
    the first dropout's ``(top, low, threshold, key)``; ``layers``: the int64 table (columns IN ...
    FINISH); ``weights`` and ``biases``: flat float32 arrays it points into — each Linear's weights
    from :func:`layer_weights` for ``lanes`` (DOTS says which form), each bias repeated (``tiled_bias``)."""
    total, n_out = out.shape
    rows, width = prefix.shape
    if rows * width < mc_kernels.RUN_UNITS:  # as mc_kernels.tiled_rows: whole copies, long flat runs
        repeats = -(-mc_kernels.RUN_UNITS // max(1, rows * width))
        tiled = mc_simd.aligned_floats(rows * repeats * width).reshape((rows * repeats, width))
        for r in range(rows * repeats):
            tiled[r] = prefix[r % rows]
        prefix = tiled
    count = layers.shape[0]
    fuse_last = fuses_last(layers, lanes)
    stored = count - 2 if fuse_last else count - 1  # the hidden layers whose outputs are stored
    widest = width
    hidden_size = 0
    for i in range(count):
        widest = max(widest, layers[i, OUT])
        if i < stored:
            hidden_size += layers[i, OUT]
    masked = mc_simd.aligned_floats(block * width)  # each layer's rows on the same cache lines in every process
    hidden = mc_simd.aligned_floats(max(1, block * hidden_size))
    # mc_kernels.words_for, and a vector's bytes more: mc_simd.layer loads whole vectors of mask bytes
    words = np.empty((block * widest + 7) // 8 + 1 + (lanes + 7) // 8, dtype=np.uint64)
    no_words = words[:0]
    no_mask = words.view(np.uint8)[:0]
    flat_out = out.reshape(-1)
    while True:
        b = _atomic_add(counter, 0, 1)  # this thread's next block
        if b >= end_block:
            break
        start = b * block
        n = min(block, total - start)
        h = masked[: n * width].reshape((n, width))
        broadcast_dropout(prefix, h, words, start, keys[first[3]], keys[first[3] + 1], first[0], first[1], first[2])
        offset = 0
        for i in range(count):
            k, m = layers[i, IN], layers[i, OUT]
            bias = biases[layers[i, BIAS] : layers[i, BIAS] + layers[i, BIAS_SIZE]]
            at = layers[i, WEIGHT]
            if i < stored:
                dst = hidden[offset : offset + n * m].reshape((n, m))
                offset += n * m
            else:  # the last layer, or the one before it that computes it (fuse_last)
                dst = flat_out[start * n_out : (start + n) * n_out].reshape((n, n_out))
            if layers[i, DOTS]:  # a narrow last layer: its bias and ReLU after
                stride = mc_simd.padded(k, lanes)
                mc_simd.dot_rows(h, weights[at : at + m * stride].reshape((m, stride)), dst, lanes)
                if layers[i, FINISH]:
                    relu = mc_kernels.RELU if layers[i, RELU] else mc_kernels.IDENTITY
                    bias_activation_dropout(dst, bias, relu, no_words, 0, keys[0], keys[0], 0, 0, 0)
            else:  # the matmul, bias, ReLU and the next dropout's mask in one pass
                mask, threshold = no_mask, 0
                if layers[i, DROPOUT]:
                    key = layers[i, KEY]
                    first_byte = mc_kernels.draw(words, start * m, n * m, keys[key], keys[key + 1],
                                                 layers[i, TOP], layers[i, LOW])
                    mask, threshold = words.view(np.uint8)[first_byte:], layers[i, THRESHOLD]
                stride = mc_simd.padded(m, lanes)
                weight = weights[at : at + k * stride].reshape((k, stride))
                if fuse_last and i == count - 2:  # the last layer from this layer's tiles
                    j = count - 1
                    at2, outs = layers[j, WEIGHT], layers[j, OUT]
                    last_bias = biases[layers[j, BIAS] : layers[j, BIAS] + layers[j, BIAS_SIZE]]
                    last_weight = weights[at2 : at2 + outs * stride].reshape((outs, stride))
                    mc_simd.layer_dot(h, weight, m, bias, layers[i, RELU], mask, threshold, last_weight, last_bias,
                                      layers[j, RELU], dst, lanes)
                    break
                mc_simd.layer(h, weight, bias, layers[i, RELU], mask, threshold, dst, lanes)
            h = dst


_LOCK = threading.Lock()
# MKL_Set_Num_Threads_Local through ctypes, once _load found it in torch's library; empty where not.
_SET_LOCAL_THREADS: list[Callable[[int], int]] = []
_LOADED: list[bool] = []


def _load() -> bool:
    """Find MKL's thread setting in torch's ``libtorch_cpu`` (torch links MKL in and exports its
    symbols on x86-64 Linux); False where it is not there."""
    import torch

    if not torch.backends.mkl.is_available():
        return False
    try:
        set_local = ctypes.CDLL(str(Path(torch.__file__).parent / "lib" / "libtorch_cpu.so")).MKL_Set_Num_Threads_Local
    except (OSError, AttributeError):
        return False
    set_local.argtypes, set_local.restype = [ctypes.c_int], ctypes.c_int
    _SET_LOCAL_THREADS.append(set_local)
    return True


def mkl_threads_settable() -> bool:
    """Whether :func:`one_mkl_thread` can set MKL's threads in this process."""
    if not _LOADED:
        with _LOCK:
            if not _LOADED:
                _LOADED.append(_load())
    return _LOADED[0]


@contextlib.contextmanager
def one_mkl_thread() -> Iterator[None]:
    """MKL on one thread on this thread for the block (no-op where MKL's setting is not found).

    For the torch ops of a call around :func:`run` with several threads (the cached prefix's Linear
    layers): MKL would run them as OpenMP parallel regions, whose threads then spin-wait on the
    cores for a while after each (libgomp's default) and slow the threads of :func:`run` ~1.7x."""
    if not mkl_threads_settable():
        yield
        return
    previous = _SET_LOCAL_THREADS[0](1)
    try:
        yield
    finally:
        _SET_LOCAL_THREADS[0](previous)


# The team's mailbox: an int64 array, its words written by different threads on their own cache
# lines. STATE: the posted call's generation << 16, CLOSED once its caller has run out of blocks,
# and the helpers that joined it in the low 15 bits; DONE: the joined helpers that have finished;
# COUNTER: the call's block counter (run_blocks' ``counter``); SPINNING: helpers in serve now;
# then the call's arguments (ARGS ...), written before its STATE is.
STATE, DONE, COUNTER, SPINNING, STOP, FAILED, ARGS = 0, 8, 16, 24, 32, 33, 40
_CLOSED, _JOINED = 1 << 15, (1 << 15) - 1
(_PREFIX, _ROWS, _WIDTH, _FIRST, _LAYERS, _COUNT, _WEIGHTS, _WEIGHT_SIZE, _BIASES, _BIAS_SIZE, _KEYS, _KEY_COUNT,
 _OUT, _TOTAL, _N_OUT, _BLOCK, _END, _LANES, _HELPERS) = range(ARGS, ARGS + 19)
_BOX = 64


@njit(**_FLAGS)
def _run_posted(box):  # noqa: ANN001, ANN202 (numba)
    """Take and run blocks of the call posted in ``box`` until none are left (run_blocks on its
    arrays, rebuilt from their addresses)."""
    prefix = carray(_f32_at(box[_PREFIX]), (box[_ROWS], box[_WIDTH]))
    first = carray(_i64_at(box[_FIRST]), 4)
    layers = carray(_i64_at(box[_LAYERS]), (box[_COUNT], COLUMNS))
    weights = carray(_f32_at(box[_WEIGHTS]), box[_WEIGHT_SIZE])
    biases = carray(_f32_at(box[_BIASES]), box[_BIAS_SIZE])
    keys = carray(_u64_at(box[_KEYS]), box[_KEY_COUNT])
    out = carray(_f32_at(box[_OUT]), (box[_TOTAL], box[_N_OUT]))
    run_blocks(prefix, first, layers, weights, biases, keys, out, box[_BLOCK], box[COUNTER : COUNTER + 1],
               box[_END], box[_LANES])


@njit(inline="always")
def _post(box, helpers, prefix, first, layers, weights, biases, keys, out, block, end_block, lanes):  # noqa: ANN001, ANN202
    """Post a call in ``box`` for up to ``helpers`` helpers: its arguments, then its generation."""
    box[_PREFIX], box[_ROWS], box[_WIDTH] = prefix.ctypes.data, prefix.shape[0], prefix.shape[1]
    box[_FIRST], box[_LAYERS], box[_COUNT] = first.ctypes.data, layers.ctypes.data, layers.shape[0]
    box[_WEIGHTS], box[_WEIGHT_SIZE] = weights.ctypes.data, weights.size
    box[_BIASES], box[_BIAS_SIZE] = biases.ctypes.data, biases.size
    box[_KEYS], box[_KEY_COUNT] = keys.ctypes.data, keys.size
    box[_OUT], box[_TOTAL], box[_N_OUT] = out.ctypes.data, out.shape[0], out.shape[1]
    box[_BLOCK], box[_END], box[_LANES], box[_HELPERS] = block, end_block, lanes, helpers
    box[COUNTER] = 0
    box[DONE] = 0
    box[FAILED] = 0
    generation = (_atomic_load(box, STATE) >> 16) + 1
    _atomic_store(box, STATE, generation << 16)  # posted: its arguments are visible to a helper that sees it


@njit(inline="always")
def _close(box):  # noqa: ANN001, ANN202
    """Close the posted call to helpers that have not joined and wait for those that have to
    finish (their last block); whether none failed."""
    joined = _atomic_or(box, STATE, _CLOSED) & _JOINED
    while _atomic_load(box, DONE) < joined:
        _pause()
    return _atomic_load(box, FAILED) == 0


@njit(**_FLAGS)
def run_team(box, helpers, prefix, first, layers, weights, biases, keys, out, block, end_block, lanes):  # noqa: ANN001, ANN201
    """:func:`run_blocks` over all ``end_block`` blocks on this thread and up to ``helpers`` of the
    team's threads (those in :func:`serve`): posts the call in ``box``, runs blocks until none are
    left, closes the call to late helpers and waits for those that joined to finish theirs;
    whether none of them failed."""
    _post(box, helpers, prefix, first, layers, weights, biases, keys, out, block, end_block, lanes)
    _run_posted(box)
    return _close(box)


@njit(**_FLAGS)
def _close_call(box):  # noqa: ANN001, ANN202 (numba)
    """:func:`_close`, after the caller's blocks raised."""
    return _close(box)


@njit(**_FLAGS)
def _abandon(box):  # noqa: ANN001, ANN202 (numba)
    """What :func:`serve` leaves undone when the blocks of a call it joined raise: the call marked
    failed, this helper counted as done with it and as no longer spinning."""
    box[FAILED] = 1
    _atomic_add(box, SPINNING, -1)
    _atomic_add(box, DONE, 1)


@njit(**_FLAGS)
def _join_ticks(box, limit, prefix, first, layers, weights, biases, keys, out, block, lanes):  # noqa: ANN001, ANN202
    """Post a call of no blocks for one helper and wait until one joins it: the ticks that took
    (-1 if none joined within ``limit`` ticks)."""
    began = _ticks()
    _post(box, 1, prefix, first, layers, weights, biases, keys, out, block, 0, lanes)
    ticks = -1
    while _ticks() - began < limit:
        if _atomic_load(box, STATE) & _JOINED:
            ticks = _ticks() - began
            break
        _pause()
    _close(box)
    return ticks


@njit(**_FLAGS)
def serve(box, seen, spin):  # noqa: ANN001, ANN201
    """A helper of the team: joins each newly posted call in ``box`` while it is open (and fewer
    helpers than it allows have joined) and runs its blocks; returns once no call has come for
    ``spin`` ticks of the cycle counter, or ``box[STOP]`` is set. ``seen[0]``: the generation of
    the last call this helper looked at (kept between serves)."""
    _atomic_add(box, SPINNING, 1)
    deadline = _ticks() + spin
    while _atomic_load(box, STOP) == 0:
        state = _atomic_load(box, STATE)
        generation = state >> 16
        if generation != seen[0]:
            if state & _CLOSED or (state & _JOINED) >= box[_HELPERS]:
                seen[0] = generation  # too late for this one
            elif _compare_exchange(box, STATE, state, state + 1):
                seen[0] = generation
                _run_posted(box)
                _atomic_add(box, DONE, 1)
                deadline = _ticks() + spin
            continue
        if _ticks() >= deadline:
            break
        _pause()
    _atomic_add(box, SPINNING, -1)


def _ready() -> None:
    """Compile :func:`serve` (or load it from numba's cache) on the calling thread. A helper that
    compiled it on its first call held a core for the ~10 s of a compile, while the calls ran
    alone; and a process that exited meanwhile crashed (a segfault, or LLVM's own assertion), since
    :meth:`_Team.stop` waits a second at most for a helper at exit."""
    serve(np.zeros(_BOX, dtype=np.int64), np.zeros(1, dtype=np.int64), 0)  # no call posted: returns


class _Team:
    """The helper threads of :func:`run`, each a Python thread that sleeps on its event and, woken,
    spins in :func:`serve` (no GIL held) for ``spin`` seconds after its last call, as OpenMP's
    threads do after a parallel region: a call that comes while they spin is taken up within a
    few hundred nanoseconds instead of the 60-260 µs of waking a thread (a 2-vCPU VM)."""

    def __init__(self, helpers: int, spin: float) -> None:
        raw = np.zeros(_BOX + 8, dtype=np.int64)  # a cache-line aligned view of it
        skip = (-raw.ctypes.data % 64) // 8
        self.box = raw[skip : skip + _BOX]
        self.helpers = helpers
        self.spin_ticks = _spin_ticks(spin)
        self.lock = threading.Lock()  # one call at a time posts in the box; others run alone
        self.error: Exception | None = None  # the last a helper met in a call's blocks
        self.wakes = [threading.Event() for _ in range(helpers)]
        if not serve.signatures:  # compiled (or loaded from numba's cache) here, not by a helper (see _ready)
            _ready()
        self.threads = [threading.Thread(target=self._serve, args=(wake,), name=f"mcdrop-mc-{i}", daemon=True)
                        for i, wake in enumerate(self.wakes)]
        for thread in self.threads:
            thread.start()

    def _serve(self, wake: threading.Event) -> None:
        seen = np.zeros(1, dtype=np.int64)
        while True:
            wake.wait()
            wake.clear()
            if self.box[STOP]:
                return
            try:
                serve(self.box, seen, self.spin_ticks)
            except Exception as error:  # in a call's blocks: the caller raises it rather than wait
                self.error = error
                _abandon(self.box)

    def wake(self) -> None:
        """Wake the helpers that are not spinning (a woken one that finds no open call goes back)."""
        if self.box[SPINNING] < self.helpers:
            for wake in self.wakes:
                wake.set()

    def stop(self) -> None:
        self.box[STOP] = 1
        for wake in self.wakes:
            wake.set()
        for thread in self.threads:
            thread.join(timeout=1.0)


_RATE: list[float] = []


def _tick_rate() -> float:
    """Ticks of :func:`_ticks` a second, measured against ``time.perf_counter`` over ~1 ms, once;
    0 where the counter does not run."""
    if not _RATE:
        _now()  # compiled (or loaded) before it is timed
        began, ticks = time.perf_counter(), _now()
        while time.perf_counter() - began < 1e-3:
            pass
        _RATE.append(max(0.0, (_now() - ticks) / (time.perf_counter() - began)))
    return _RATE[0]


def _spin_ticks(seconds: float) -> int:
    """``seconds`` in ticks of :func:`_ticks`; 0 where the counter does not run (the helpers then
    look once for a call and sleep)."""
    return int(_tick_rate() * seconds) if seconds > 0 else 0


@njit(**_FLAGS)
def _now():  # noqa: ANN202 (numba)
    return _ticks()


# How long the team's helpers spin after a call before they sleep: OpenMP's threads (libgomp's
# GOMP_SPINCOUNT, Intel's KMP_BLOCKTIME of 200 ms) spin the same way between parallel regions.
SPIN_SECONDS = 0.001
_TEAM: list[_Team] = []


def _team(helpers: int) -> _Team:
    with _LOCK:
        if _TEAM and _TEAM[0].helpers < helpers:
            _TEAM.pop().stop()
        if not _TEAM:
            _TEAM.append(_Team(helpers, SPIN_SECONDS))
        return _TEAM[0]


def join_seconds(threads: int = 2) -> float:
    """How long a call on ``threads`` threads waits for a helper to join it, woken as :func:`run`
    wakes it (a measure for the benchmarks); NaN where none joined within a second."""
    team = _team(threads - 1)
    prefix, first, layers, weights, biases, keys, out = _probe_arrays()
    rate = _tick_rate()
    if not _join_ticks.signatures:  # compiled first, or the helper woken below spins out meanwhile
        _join_ticks(np.zeros(_BOX, dtype=np.int64), 0, prefix, first, layers, weights, biases, keys, out, 2,
                    mc_simd.LANES)
    with team.lock:
        team.wake()
        ticks = _join_ticks(team.box, int(rate), prefix, first, layers, weights, biases, keys, out, 2, mc_simd.LANES)
    return ticks / rate if ticks >= 0 and rate > 0 else float("nan")


def _stop_team() -> None:
    while _TEAM:
        _TEAM.pop().stop()


def _forget_team() -> None:  # a forked child has none of its parent's threads
    _TEAM.clear()


os.register_at_fork(after_in_child=_forget_team)
atexit.register(_stop_team)  # before the interpreter tears down the machine code they spin in


def run(prefix: np.ndarray, first: np.ndarray, layers: np.ndarray, weights: np.ndarray, biases: np.ndarray,
        keys: np.ndarray, out: np.ndarray, block: int, threads: int, lanes: int) -> None:
    """Fill ``out [T·B, n_out]`` (see :func:`run_blocks`) on up to ``threads`` threads.

    The calling thread starts on the blocks at once; the team's helpers (``threads - 1``, started
    once) join as they see the call and take what is left. A helper spinning since its last call
    (:data:`SPIN_SECONDS`) joins within a microsecond; a sleeping one is woken, which costs a
    round trip of 60-260 µs on a 2-vCPU VM, as long as a small call takes on one core, and joins
    only if blocks are still left. While one call holds the team, a concurrent call runs alone."""
    if prefix.shape[1] != layers[0, IN] or out.shape[1] != layers[-1, OUT]:
        raise ValueError(f"inputs of {prefix.shape[1]} features and outputs of {out.shape[1]} for a net that takes "
                         f"{layers[0, IN]} and gives {layers[-1, OUT]}")
    blocks = -(-out.shape[0] // block)
    prefix = np.ascontiguousarray(prefix)  # the team's calls pass arrays by address
    helpers = min(threads, blocks) - 1
    if helpers > 0:
        team = _TEAM[0] if _TEAM and _TEAM[0].helpers >= helpers else _team(helpers)
        if team.lock.acquire(blocking=False):
            try:
                team.wake()
                try:
                    finished = run_team(team.box, helpers, prefix, first, layers, weights, biases, keys, out, block,
                                        blocks, lanes)
                except BaseException:
                    _close_call(team.box)  # not before the helpers that joined are done with the arrays
                    raise
                if not finished:
                    raise RuntimeError("a helper thread of the MC engine failed on its blocks") from team.error
            finally:
                team.lock.release()
            return
    run_blocks(prefix, first, layers, weights, biases, keys, out, block, np.zeros(1, dtype=np.int64), blocks, lanes)


def _probe_arrays() -> tuple[np.ndarray, ...]:
    """A call's arrays for a 3 -> 2 net of 2 rows (the warm-up's and the join probe's)."""
    top, low, threshold = mc_kernels.mask_parameters(1 << 15)
    layers = np.zeros((1, COLUMNS), dtype=np.int64)
    layers[0, IN], layers[0, OUT], layers[0, BIAS_SIZE] = 3, 2, 2
    keys = np.frombuffer(np.ones(2, dtype=np.uint64).tobytes(), dtype=np.uint64)  # read-only, as mc._fused_keys
    return (np.ones((1, 3), dtype=np.float32), np.array([top, low, threshold, 0], dtype=np.int64), layers,
            np.zeros(3 * mc_simd.padded(2, mc_simd.LANES), dtype=np.float32), np.zeros(2, dtype=np.float32), keys,
            np.empty((2, 2), dtype=np.float32))


def warm_up() -> None:
    """Compile (or load from numba's cache) :func:`run_blocks` for the read-only keys that
    :func:`service.ml.mc._fused_keys` gives, seeded or not, and the team's :func:`run_team` and
    :func:`serve`."""
    prefix, first, layers, weights, biases, keys, out = _probe_arrays()
    run_blocks(prefix, first, layers, weights, biases, keys, out, 2, np.zeros(1, dtype=np.int64), 1, mc_simd.LANES)
    box, seen = np.zeros(_BOX, dtype=np.int64), np.zeros(1, dtype=np.int64)
    run_team(box, 0, prefix, first, layers, weights, biases, keys, out, 2, 1, mc_simd.LANES)  # no helper joins
    _close_call(box)
    _abandon(np.zeros(_BOX, dtype=np.int64))
    serve(box, seen, 0)  # sees the call above, too late to join it, and returns
    _now()


# run_blocks' machine code holds the kernels it calls: flushed from numba's cache when they change.
numba_cache.refresh("mc_whole", [run_blocks, _run_posted, run_team, _close_call, _abandon, _join_ticks, serve, _now], [__file__, mc_kernels.__file__, mc_simd.__file__])
