"""service.tuning: the allocator tuning runs, is idempotent and says whether it applied."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import textwrap

import pytest

from service import tuning


def test_tune_allocator_runs_and_is_idempotent():
    first = tuning.tune_allocator()
    assert isinstance(first, bool)
    assert tuning.tune_allocator() is first
    assert tuning.tune_allocator() is first


@pytest.mark.skipif(not (sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"),
                    reason="mallopt is glibc-only")
def test_applies_on_glibc_linux():
    assert tuning.tune_allocator() is True


def test_a_fresh_process_applies_once_and_allocates_normally():
    script = textwrap.dedent("""
        from service import tuning
        results = [tuning.tune_allocator() for _ in range(3)]
        assert len(set(results)) == 1, results
        blocks = [bytearray(8 << 20) for _ in range(4)]  # above the default mmap threshold
        del blocks
        print(results[0])
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True)
    assert done.stdout.strip() in {"True", "False"}


def test_never_raises_when_libc_is_unreachable(monkeypatch):
    monkeypatch.setattr(tuning, "_applied", None)

    def unreachable(*args, **kwargs):
        raise OSError("no libc here")

    monkeypatch.setattr(tuning.ctypes, "CDLL", unreachable)
    monkeypatch.setattr(tuning, "_is_glibc_linux", lambda: True)
    assert tuning.tune_allocator() is False
    assert tuning.tune_allocator() is False


def test_the_garbage_collector_is_tuned_once_per_process():
    script = textwrap.dedent("""
        import gc
        from service import tuning
        default = gc.get_threshold()
        assert tuning.tune_garbage_collector(0) is False and gc.get_threshold() == default
        frozen = gc.get_freeze_count()
        assert tuning.tune_garbage_collector(50_000) is True
        assert gc.get_threshold() == (50_000, *default[1:])
        assert gc.get_freeze_count() > frozen  # what existed at start-up is out of collection
        assert tuning.tune_garbage_collector(1_000) is False and gc.get_threshold()[0] == 50_000
        class Cycle:
            pass
        a, b = Cycle(), Cycle()
        a.other, b.other = b, a
        del a, b
        assert gc.collect() >= 2  # cycles made after the freeze are still collected
    """)
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120)


@pytest.mark.parametrize(
    "configured, processes, cores, beside_api, expected",
    [
        (0, 1, 2, True, 1),  # `mcdrop up` on 2 cores: one for the API, one for training
        (0, 1, 2, False, 2),  # a worker machine of its own: every core
        (0, 1, 16, True, 15),
        (0, 4, 16, False, 4),  # prefork: the cores shared out among the processes
        (0, 3, 16, True, 5),
        (0, 4, 2, False, 1),  # never below 1
        (0, 1, 1, True, 1),
        (3, 4, 2, True, 3),  # configured wins
    ],
)
def test_worker_torch_threads(configured, processes, cores, beside_api, expected):
    assert tuning.worker_torch_threads(configured, processes, cores, beside_api=beside_api) == expected


def test_usable_cores_is_this_process_affinity():
    assert 1 <= tuning.usable_cores() <= (os.cpu_count() or 1)
