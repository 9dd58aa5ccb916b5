"""Import direction (../shared/STYLE.md): api -> domain -> ml; workers -> domain -> ml.

service/ml imports torch/numpy (numba for the MC engine's CPU kernels, and numba's llvmlite to write
the matmul kernels' LLVM IR; scikit-learn for the built-in data) and the standard library only; nothing in service imports workers or service.api, except service.api itself and the
CLI entry point.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def imports_of(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def modules(folder: str) -> list[Path]:
    return sorted((ROOT / folder).rglob("*.py"))


def test_ml_is_pure() -> None:
    allowed = {"torch", "numpy", "numba", "llvmlite", "sklearn", "service"} | set(sys.stdlib_module_names)
    for path in modules("service/ml"):
        for name in imports_of(path):
            top = name.split(".")[0]
            assert top in allowed, f"{path.relative_to(ROOT)} imports {name}"
            if top == "service":
                assert name.startswith("service.ml"), f"{path.relative_to(ROOT)} imports {name}"


def test_domain_never_imports_api_or_workers() -> None:
    for path in modules("service"):
        relative = path.relative_to(ROOT).as_posix()
        if relative == "service/cli.py":  # the entry point starts both the API and workers
            continue
        for name in imports_of(path):
            assert not name.startswith("workers"), f"{relative} imports {name}"
            if not relative.startswith("service/api/"):
                assert not name.startswith("service.api"), f"{relative} imports {name}"


def test_workers_do_not_import_the_api() -> None:
    for path in modules("workers"):
        for name in imports_of(path):
            assert not name.startswith("service.api"), f"{path.relative_to(ROOT)} imports {name}"


def test_the_checks_can_fail(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("import fastapi\nfrom workers import tasks\n")
    assert imports_of(bad) == {"fastapi", "workers"}
