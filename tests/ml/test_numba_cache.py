"""service.ml.numba_cache: a cached numba function is recompiled when a module it calls into
changes, not only when its own file does (numba's own rule)."""

import subprocess
import sys
import textwrap
from pathlib import Path

CALLER = textwrap.dedent('''
    from numba import njit

    import callee
    from service.ml import numba_cache


    @njit(cache=True)
    def caller():
        return callee.value() + 1


    numba_cache.refresh("caller", [caller], [__file__, callee.__file__])
    print(caller())
''')


def _run(directory: Path) -> str:
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, str(directory / "caller.py")], capture_output=True, text=True,
                          timeout=120, env={"PYTHONPATH": f"{directory}:{root}", "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def _write_callee(directory: Path, value: int) -> None:
    (directory / "callee.py").write_text(f"from numba import njit\n\n\n@njit\ndef value():\n    return {value}\n")


def test_a_changed_callee_is_compiled_in_again(tmp_path):
    (tmp_path / "caller.py").write_text(CALLER)
    _write_callee(tmp_path, 1)
    assert _run(tmp_path) == "2"
    assert list((tmp_path / "__pycache__").glob("caller.caller-*.nbc"))  # cached
    assert _run(tmp_path) == "2"  # from the cache
    _write_callee(tmp_path, 41)  # caller.py unchanged: numba alone would load the old machine code
    assert _run(tmp_path) == "42"


def test_an_unchanged_source_keeps_the_cache(tmp_path):
    from numba import njit

    from service.ml import numba_cache

    source = tmp_path / "source.py"
    source.write_text("x = 1\n")

    @njit(cache=True)
    def function():
        return 1

    assert function() == 1
    assert numba_cache.refresh("test", [function], [str(source)])  # no stamp yet
    assert not numba_cache.refresh("test", [function], [str(source)])
    source.write_text("x = 2\n")
    assert numba_cache.refresh("test", [function], [str(source)])
