"""Process-level tuning for serving MC dropout: glibc malloc thresholds, the garbage collector.

An MC call on the general (torch) path allocates fresh activation and mask tensors of a few MB
(the fused CPU path, per-block buffers of under 1 MiB). With glibc's default (dynamic) thresholds
such blocks are mapped from the kernel and given back when freed, so their pages fault in again
on the next call (~1,500 minor page faults per call for the textbook net at batch 64, T = 100, on
the general path: bench/mc_engine.py section 2d). Raising the mmap threshold to 64 MiB serves them
from the heap, and raising the trim threshold to 256 MiB keeps freed heap pages for reuse; the price
is up to ~256 MiB of freed memory the process keeps instead of returning it to the kernel.

Call :func:`tune_allocator` once at process start (API lifespan, worker start). It is the same as
setting ``MALLOC_MMAP_THRESHOLD_=67108864`` and ``MALLOC_TRIM_THRESHOLD_=268435456`` in the
environment, which only works before the process starts.

:func:`tune_garbage_collector` (API lifespan): every request allocates thousands of container
objects (ASGI scopes, pydantic models, futures), so with Python's default threshold (700) the
youngest generation is collected every few requests, and each older collection walks everything
the process built at start-up (FastAPI, torch, the models): ~10 % of the API's CPU under load.

:func:`worker_torch_threads` (worker start): how many torch threads each worker process trains
with, never more than the cores left free by its siblings and, under ``mcdrop up``, the API.
"""

from __future__ import annotations

import ctypes
import gc
import os
import platform
import sys
import threading

# <malloc.h> parameter numbers for mallopt.
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3

MMAP_THRESHOLD_BYTES = 64 << 20
# glibc before 2.35 rejects an mmap threshold above HEAP_MAX_SIZE / 2 (32 MiB on 64-bit).
_FALLBACK_MMAP_THRESHOLD_BYTES = 32 << 20
TRIM_THRESHOLD_BYTES = 256 << 20

_lock = threading.Lock()
_applied: bool | None = None  # the result of the first call


def _is_glibc_linux() -> bool:
    return sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"


def _set_thresholds() -> bool:
    if not _is_glibc_linux():
        return False
    libc = ctypes.CDLL("libc.so.6")
    mallopt = libc.mallopt
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    mmap_set = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) or bool(
        mallopt(M_MMAP_THRESHOLD, _FALLBACK_MMAP_THRESHOLD_BYTES)
    )
    trim_set = bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))
    return mmap_set and trim_set


def tune_allocator() -> bool:
    """Raise glibc's malloc mmap and trim thresholds for this process; True if they were set.

    A no-op returning False off glibc Linux or if libc cannot be reached; never raises.
    Idempotent and thread-safe: only the first call acts, later calls return its result.
    """
    global _applied
    with _lock:
        if _applied is None:
            try:
                _applied = _set_thresholds()
            except Exception:  # any ctypes/OS failure: leave the allocator as it is
                _applied = False
        return _applied


_gc_tuned = False


def tune_garbage_collector(threshold: int) -> bool:
    """Once per process: freeze what exists now (start-up objects are never traversed again;
    cycles among them are never collected) and collect the youngest generation every
    ``threshold`` net container allocations; ``threshold`` 0 leaves Python's defaults. True if
    this call tuned it."""
    global _gc_tuned
    with _lock:
        if _gc_tuned or threshold <= 0:
            return False
        gc.freeze()
        gc.set_threshold(threshold, *gc.get_threshold()[1:])
        _gc_tuned = True
        return True


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity, as a container's cpuset sets it)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def worker_torch_threads(configured: int, processes: int, cores: int, *, beside_api: bool) -> int:
    """torch intra-op threads for each of a worker's ``processes``: ``configured`` when it is > 0,
    else the ``cores`` shared out among the processes, less one core for the API when the worker
    runs beside it (``mcdrop up``), and at least 1.

    Never more threads than free cores: each torch op with more than one thread is an OpenMP
    parallel region that waits for its slowest thread, so when another busy process holds one of
    the cores, every region waits for a time slice. Measured on 2 cores, one of them kept busy:
    a 64-256-256-10 MLP trained 5x slower at 2 threads than at 1 (batch 16; 2.4x at 1024 wide,
    batch 128), where on idle cores 2 threads gained 0-30 %.
    """
    if configured > 0:
        return configured
    free = cores - 1 if beside_api else cores
    return max(1, free // max(1, processes))
