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
``torch.get_num_threads()`` threads (the calling thread and a small pool) take whole blocks one at a
time from a shared counter until none are left, each running its blocks end to end. With several
threads this beats threading each small matmul: that parallelises the matmuls only, and the masks,
bias and activation run on one core.

Masks depend only on the keys and the global row (see :mod:`service.ml.mc_kernels`) and every
matmul runs on one thread over the same block of rows, so a seed gives the same samples whatever
the number of threads. The samples equal those of the Python loop (``torch.mm``) up to float32
rounding: the sums are the same, in another order.

Nets: the fused plan's shape, ``Dropout (Linear [ReLU] [Dropout])*``, with the ReLU (or no
activation) applied by the kernels; a net with another activation keeps the Python loop.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

from service.ml import mc_kernels, mc_simd, numba_cache
from service.ml.mc_kernels import bias_activation_dropout, broadcast_dropout

_FLAGS = dict(nogil=True, fastmath=True, error_model="numpy", cache=True, boundscheck=False)

# Columns of the int64 layer table (one row per Linear after the cached prefix).
IN, OUT, WEIGHT, BIAS, BIAS_SIZE, RELU, DROPOUT, TOP, LOW, THRESHOLD, KEY, DOTS, FINISH = range(13)
COLUMNS = 13


@intrinsic
def _take(typingctx, counter):  # noqa: ANN001, ANN202, ARG001
    """``_take(counter)``: atomically ``counter[0] += 1``, returning the value before (int64 array)."""
    signature = types.int64(counter)

    def codegen(context, builder, signature, args):  # noqa: ANN001, ANN202, ARG001
        data = context.make_array(signature.args[0])(context, builder, args[0]).data
        return builder.atomic_rmw("add", data, ir.Constant(ir.IntType(64), 1), "monotonic")

    return signature, codegen


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
        tiled = np.empty((rows * repeats, width), dtype=np.float32)
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
    masked = np.empty(block * width, dtype=np.float32)
    hidden = np.empty(max(1, block * hidden_size), dtype=np.float32)
    # mc_kernels.words_for, and a vector's bytes more: mc_simd.layer loads whole vectors of mask bytes
    words = np.empty((block * widest + 7) // 8 + 1 + (lanes + 7) // 8, dtype=np.uint64)
    no_words = words[:0]
    no_mask = words.view(np.uint8)[:0]
    flat_out = out.reshape(-1)
    while True:
        b = _take(counter)
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


_POOL: list[ThreadPoolExecutor] = []


def _pool() -> ThreadPoolExecutor:
    with _LOCK:
        if not _POOL:
            _POOL.append(ThreadPoolExecutor(max_workers=max(1, (os.cpu_count() or 2) - 1),
                                            thread_name_prefix="mcdrop-mc"))
        return _POOL[0]


def _forget_pool() -> None:  # a forked child has none of its parent's threads
    _POOL.clear()


os.register_at_fork(after_in_child=_forget_pool)


def run(prefix: np.ndarray, first: np.ndarray, layers: np.ndarray, weights: np.ndarray, biases: np.ndarray,
        keys: np.ndarray, out: np.ndarray, block: int, threads: int, lanes: int) -> None:
    """Fill ``out [T·B, n_out]`` (see :func:`run_blocks`) on up to ``threads`` threads.

    The calling thread starts on the blocks at once; the pool's threads join as they wake and take
    what is left. Waking one costs a round trip of 64-265 µs on a 2-vCPU VM (AMD EPYC, the longer
    the pool sat idle), as long as a small call takes on one core: a thread that has not started by
    the time the blocks are all taken is called off (its task cancelled) rather than waited for."""
    blocks = -(-out.shape[0] // block)
    counter = np.zeros(1, dtype=np.int64)
    if threads == 1 or blocks == 1:
        run_blocks(prefix, first, layers, weights, biases, keys, out, block, counter, blocks, lanes)
        return
    pool = _pool()
    futures: list[Future[None]] = [
        pool.submit(run_blocks, prefix, first, layers, weights, biases, keys, out, block, counter, blocks, lanes)
        for _ in range(min(threads, blocks) - 1)]
    try:
        run_blocks(prefix, first, layers, weights, biases, keys, out, block, counter, blocks, lanes)
    finally:
        for future in futures:
            if not future.cancel():  # started: it is finishing its last block
                future.result()


def warm_up() -> None:
    """Compile (or load from numba's cache) :func:`run_blocks` for the read-only keys that
    :func:`service.ml.mc._fused_keys` gives, seeded or not."""
    prefix = np.ones((1, 3), dtype=np.float32)
    top, low, threshold = mc_kernels.mask_parameters(1 << 15)
    first = np.array([top, low, threshold, 0], dtype=np.int64)
    layers = np.zeros((1, COLUMNS), dtype=np.int64)
    layers[0, IN], layers[0, OUT], layers[0, BIAS_SIZE] = 3, 2, 2
    keys = np.frombuffer(np.ones(2, dtype=np.uint64).tobytes(), dtype=np.uint64)  # read-only, as mc._fused_keys
    run_blocks(prefix, first, layers, np.zeros(3 * mc_simd.padded(2, mc_simd.LANES), dtype=np.float32),
               np.zeros(2, dtype=np.float32), keys, np.empty((2, 2), dtype=np.float32), 2,
               np.zeros(1, dtype=np.int64), 1, mc_simd.LANES)


# run_blocks' machine code holds the kernels it calls: flushed from numba's cache when they change.
numba_cache.refresh("mc_whole", [run_blocks], [__file__, mc_kernels.__file__, mc_simd.__file__])
