"""numba's on-disk cache, invalidated when a source a cached function calls into changes too.

numba keys a cached function on its own bytecode and file: the machine code of a caller holds the
callees it compiled in from other modules, so after an edit of ``mc_simd.py`` alone,
``mc_whole.run_blocks`` would load its old machine code with the old kernels in it (a checkout
updated in place and run again, or a developer's test run). :func:`refresh` flushes the cached
functions of a module when the sources it names differ from those of the last check.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any


def refresh(module: str, dispatchers: Iterable[Any], sources: Iterable[str]) -> bool:
    """Flush ``dispatchers``' on-disk caches where the ``sources`` (paths) have changed since the
    last call for ``module``; True if it flushed. A cache directory that cannot be written is left
    alone (numba then compiles in memory anyway)."""
    digest = hashlib.sha256()
    for source in sorted(sources):
        digest.update(Path(source).read_bytes())
    stamp_text = digest.hexdigest()
    caches = [d._cache for d in dispatchers if getattr(d, "_cache", None) is not None and hasattr(d._cache, "flush")]
    if not caches:
        return False
    stamp = Path(caches[0].cache_path) / f"{module}.sources.sha256"
    try:
        if stamp.exists() and stamp.read_text() == stamp_text:
            return False
        for cache in caches:
            cache.flush()
        stamp.write_text(stamp_text)
    except OSError:
        return False
    return True
