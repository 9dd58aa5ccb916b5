"""The fused CPU path's whole call in one numba function, its matmuls by the MKL inside torch.

The per-block loop of :func:`service.ml.mc._run_fused` calls ``torch.mm`` and the kernels of
:mod:`service.ml.mc_kernels` from Python, block after block. :func:`run_blocks` runs that loop in
machine code: per block of rows the first dropout (the cached prefix broadcast and masked), then per
Linear an ``sgemm`` and the kernel that adds the bias, applies the ReLU and the next dropout. It
holds no GIL, so the rows of a call can be split over threads: :func:`run` gives each of
``torch.get_num_threads()`` threads whole blocks (the calling thread and a small pool), each running
MKL on one thread. With several threads this beats MKL's own threading of each small matmul: that
parallelises the matmuls only, and the masks, bias and activation run on one core.

The ``sgemm`` is MKL's, from torch's own ``libtorch_cpu`` (torch links MKL in and exports its BLAS
symbols on x86-64 Linux), so it is the BLAS that ``torch.mm`` runs. Where that library or those
symbols are not there (other platforms, builds without MKL), :func:`available` is False and the
engine keeps its Python loop. Masks depend only on the keys and the global row (see
:mod:`service.ml.mc_kernels`) and every matmul runs on one thread over the same block of rows, so a
seed gives the same samples whatever the number of threads.

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
from numba import njit, types

from service.ml import mc_kernels
from service.ml.mc_kernels import bias_activation_dropout, broadcast_dropout, transpose_bias_activation

# BLAS and MKL service functions as the linker sees them (resolved in libtorch_cpu, see _load):
# sgemm_ is the Fortran interface (every argument by address, 32-bit integers); the addresses are
# passed as pointer-sized integers.
_sgemm = types.ExternalFunction("sgemm_", types.void(*([types.intp] * 13)))
_mkl_local_threads = types.ExternalFunction("MKL_Set_Num_Threads_Local", types.int32(types.int32))

_FLAGS = dict(nogil=True, fastmath=True, error_model="numpy", cache=True, boundscheck=False)

# Columns of the int64 layer table (one row per Linear after the cached prefix).
IN, OUT, WEIGHT, BIAS, BIAS_SIZE, RELU, DROPOUT, TOP, LOW, THRESHOLD, KEY, NARROW, FINISH = range(13)
COLUMNS = 13
_N, _T = 78, 84  # 'N' and 'T'


@njit(inline="always")
def _matmul(a_ptr, b_ptr, c_ptr, m, n, k, lda, ldb, ldc, trans_a, trans_b, ints, floats, chars):
    """Column-major ``C[m, n] = op(A) @ op(B)`` by MKL's sgemm (``ints``, ``floats``, ``chars``:
    scratch for the arguments it takes by address)."""
    ints[0], ints[1], ints[2], ints[3], ints[4], ints[5] = m, n, k, lda, ldb, ldc
    chars[0], chars[1] = trans_a, trans_b
    floats[0], floats[1] = 1.0, 0.0
    i, f, c = ints.ctypes.data, floats.ctypes.data, chars.ctypes.data
    _sgemm(c, c + 1, i, i + 4, i + 8, f, a_ptr, i + 12, b_ptr, i + 16, f + 4, c_ptr, i + 20)


@njit(**_FLAGS)
def run_blocks(prefix, first, layers, weights, biases, keys, out, block, first_block, end_block):
    """Blocks ``first_block .. end_block`` of ``block`` rows of the T·B rows into ``out [T·B, n_out]``.
    Only where :func:`available` is True (this module checks it on import; :func:`run` again).

    ``prefix``: the cached prefix ``[B, width]`` (repeated here as ``tiled_rows`` does); ``first``:
    the first dropout's ``(top, low, threshold, key)``; ``layers``: the int64 table (columns IN ...
    FINISH); ``weights`` and ``biases``: flat float32 arrays it points into — a hidden Linear's
    ``Wᵀ [in, out]``, a narrow last one's ``W [out, in]`` (computed as W @ hᵀ and transposed back),
    each bias repeated (``tiled_bias``). Sets MKL to one thread on this thread for the call and puts
    back what was set before."""
    total, n_out = out.shape
    rows, width = prefix.shape
    if rows * width < mc_kernels.RUN_UNITS:  # as mc_kernels.tiled_rows: whole copies, long flat runs
        repeats = -(-mc_kernels.RUN_UNITS // max(1, rows * width))
        tiled = np.empty((rows * repeats, width), dtype=np.float32)
        for r in range(rows * repeats):
            tiled[r] = prefix[r % rows]
        prefix = tiled
    count = layers.shape[0]
    widest = width
    hidden_size = 0
    for i in range(count):
        widest = max(widest, layers[i, OUT])
        if i < count - 1:
            hidden_size += layers[i, OUT]
    masked = np.empty(block * width, dtype=np.float32)
    hidden = np.empty(max(1, block * hidden_size), dtype=np.float32)
    transposed = np.empty(block * n_out, dtype=np.float32)
    words = np.empty((block * widest + 7) // 8 + 1, dtype=np.uint64)  # mc_kernels.words_for
    no_words = words[:0]
    ints = np.empty(6, dtype=np.int32)
    floats = np.empty(2, dtype=np.float32)
    chars = np.empty(2, dtype=np.uint8)
    flat_out = out.reshape(-1)
    previous = _mkl_local_threads(1)
    for b in range(first_block, end_block):
        start = b * block
        n = min(block, total - start)
        h = masked[: n * width].reshape((n, width))
        broadcast_dropout(prefix, h, words, start, keys[first[3]], keys[first[3] + 1], first[0], first[1], first[2])
        offset = 0
        for i in range(count):
            k, m = layers[i, IN], layers[i, OUT]
            w = weights[layers[i, WEIGHT] :]
            bias = biases[layers[i, BIAS] : layers[i, BIAS] + layers[i, BIAS_SIZE]]
            relu = mc_kernels.RELU if layers[i, RELU] else mc_kernels.IDENTITY
            if i < count - 1:
                dst = hidden[offset : offset + n * m].reshape((n, m))
                offset += n * m
                # row-major dst [n, m] = h [n, k] @ Wᵀ [k, m]: column-major dstᵀ = (Wᵀ)ᵀ @ hᵀ
                _matmul(w.ctypes.data, h.ctypes.data, dst.ctypes.data, m, n, k, m, k, m, _N, _N, ints, floats, chars)
                if layers[i, DROPOUT]:
                    key = layers[i, KEY]
                    bias_activation_dropout(dst, bias, relu, words, start, keys[key], keys[key + 1],
                                            layers[i, TOP], layers[i, LOW], layers[i, THRESHOLD])
                else:
                    bias_activation_dropout(dst, bias, relu, no_words, 0, keys[0], keys[0], 0, 0, 0)
                h = dst
            elif layers[i, NARROW]:
                # row-major tᵀ [m, n] = W [m, k] @ hᵀ: column-major t [n, m] = op(h)ᵀ @ W
                _matmul(h.ctypes.data, w.ctypes.data, transposed.ctypes.data, n, m, k, k, k, n, _T, _N,
                        ints, floats, chars)
                transpose_bias_activation(transposed[: m * n].reshape((m, n)), bias, relu,
                                          flat_out[start * n_out : (start + n) * n_out].reshape((n, n_out)))
            else:
                dst = flat_out[start * n_out : (start + n) * n_out].reshape((n, n_out))
                _matmul(w.ctypes.data, h.ctypes.data, dst.ctypes.data, m, n, k, m, k, m, _N, _N, ints, floats, chars)
                if layers[i, FINISH]:  # a bias or a ReLU
                    bias_activation_dropout(dst, bias, relu, no_words, 0, keys[0], keys[0], 0, 0, 0)
    _mkl_local_threads(previous)


_LOCK = threading.Lock()
# MKL_Set_Num_Threads_Local through ctypes, once _load found it; empty where it did not.
_SET_LOCAL_THREADS: list[Callable[[int], int]] = []
_LOADED: list[bool] = []


def _load() -> bool:
    """Make MKL's symbols in torch's ``libtorch_cpu`` visible to numba's linker; False if they are
    not there."""
    import torch
    from llvmlite import binding

    if not torch.backends.mkl.is_available():
        return False
    library = Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"
    try:
        handle = ctypes.CDLL(str(library))
        handle.sgemm_  # noqa: B018 (raises AttributeError where it is missing)
        set_local = handle.MKL_Set_Num_Threads_Local
        binding.load_library_permanently(str(library))
    except (OSError, AttributeError, RuntimeError):
        return False
    set_local.argtypes, set_local.restype = [ctypes.c_int], ctypes.c_int
    _SET_LOCAL_THREADS.append(set_local)
    return True


def available() -> bool:
    """Whether :func:`run` can be used in this process (MKL's sgemm found in torch's library)."""
    if not _LOADED:
        with _LOCK:
            if not _LOADED:
                _LOADED.append(_load())
    return _LOADED[0]


@contextlib.contextmanager
def one_mkl_thread() -> Iterator[None]:
    """MKL on one thread on this thread for the block (no-op where :func:`available` is False).

    For the torch ops of a call around :func:`run` with several threads (the cached prefix's Linear
    layers): MKL would run them as OpenMP parallel regions, whose threads then spin-wait on the
    cores for a while after each (libgomp's default) and slow the threads of :func:`run` ~1.7x."""
    if not available():
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
        keys: np.ndarray, out: np.ndarray, block: int, threads: int) -> None:
    """Fill ``out [T·B, n_out]`` (see :func:`run_blocks`), the blocks split over up to ``threads``
    threads in contiguous runs: the calling thread takes the first, a small pool the others."""
    if not available():  # run_blocks' machine code would call an unresolved sgemm_
        raise RuntimeError("MKL's sgemm was not found in torch's library: use the engine's Python loop")
    blocks = -(-out.shape[0] // block)
    parts = max(1, min(threads, blocks))
    if parts == 1:
        run_blocks(prefix, first, layers, weights, biases, keys, out, block, 0, blocks)
        return
    bounds = [blocks * i // parts for i in range(parts + 1)]
    pool = _pool()
    futures: list[Future[None]] = [
        pool.submit(run_blocks, prefix, first, layers, weights, biases, keys, out, block, bounds[i], bounds[i + 1])
        for i in range(1, parts)]
    try:
        run_blocks(prefix, first, layers, weights, biases, keys, out, block, bounds[0], bounds[1])
    finally:
        for future in futures:
            future.result()


def warm_up() -> None:
    """Compile (or load from numba's cache) :func:`run_blocks`, where it can run."""
    if not available():
        return
    prefix = np.ones((1, 3), dtype=np.float32)
    top, low, threshold = mc_kernels.mask_parameters(1 << 15)
    first = np.array([top, low, threshold, 0], dtype=np.int64)
    layers = np.zeros((1, COLUMNS), dtype=np.int64)
    layers[0, IN], layers[0, OUT], layers[0, BIAS_SIZE] = 3, 2, 2
    keys = np.ones(2, dtype=np.uint64)
    unseeded = np.frombuffer(keys.tobytes(), dtype=np.uint64)  # read-only, as mc._fused_keys gives them
    for each in (keys, unseeded):
        run_blocks(prefix, first, layers, np.zeros(6, dtype=np.float32), np.zeros(2, dtype=np.float32), each,
                   np.empty((2, 2), dtype=np.float32), 2, 0, 1)


available()  # before anything can call run_blocks: its cached machine code links to sgemm_ on load
