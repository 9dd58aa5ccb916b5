"""The dashboard's files as the API serves them (no browser): every file the page loads is
there with the right type, module imports resolve, nothing is fetched from elsewhere, the
vendored chart library is the one its note names, and the sample digits are the data set's."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
from fastapi.testclient import TestClient

from service.api.app import create_app
from service.api.routes.dashboard import DASHBOARD_DIR
from service.config import Settings

OWN_FILES = [p for p in DASHBOARD_DIR.rglob("*") if p.is_file() and "vendor" not in p.parts]
IMPORT = re.compile(r"""^\s*(?:import|export)\b[^'"]*?\bfrom\s+["']([^"']+)["']""", re.MULTILINE)


def anonymous(settings: Settings) -> TestClient:
    """A client without an API key (the session's client sends one)."""
    return TestClient(create_app(settings))


def test_the_page_and_everything_it_loads_is_served_without_a_key(settings: Settings) -> None:
    client = anonymous(settings)
    assert client.get("/v1/runs").status_code == 401  # auth is on; the page itself is public
    redirect = client.get("/dashboard", follow_redirects=False)
    assert redirect.status_code == 308 and redirect.headers["location"] == "/dashboard/"
    page = client.get("/dashboard/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert "mcdrop dashboard" in page.text
    assets = re.findall(r'(?:src|href)="([^"#:]+)"', page.text)
    assert {"js/app.js", "style.css", "vendor/uplot/uPlot.iife.min.js", "vendor/uplot/uPlot.min.css"} <= set(assets)
    for asset in assets:
        response = client.get(f"/dashboard/{asset}")
        assert response.status_code == 200, asset
        expected = "text/javascript" if asset.endswith(".js") else "text/css"
        assert response.headers["content-type"].startswith(expected), (asset, response.headers["content-type"])
    head = client.head("/dashboard/js/app.js")
    assert head.status_code == 200 and head.headers["etag"]


def test_missing_files_and_paths_outside_the_folder_are_404_problems(settings: Settings) -> None:
    client = anonymous(settings)
    for path in ("/dashboard/nothing-here.js", "/dashboard/%2e%2e/routes/dashboard.py", "/dashboard/..%2F..%2Fconfig.py",
                 "/dashboard/js/../../routes/dashboard.py"):
        response = client.get(path)
        assert response.status_code == 404, path
        assert response.headers["content-type"].startswith("application/problem+json"), path


def test_every_module_import_resolves_to_a_served_file(settings: Settings) -> None:
    client = anonymous(settings)
    modules = [p for p in OWN_FILES if p.suffix == ".js"]
    assert len(modules) >= 8
    seen = 0
    for module in modules:
        for specifier in IMPORT.findall(module.read_text()):
            assert specifier.startswith("./") or specifier.startswith("../"), f"{module.name} imports {specifier}"
            target = (module.parent / specifier).resolve()
            assert target.is_file(), f"{module.relative_to(DASHBOARD_DIR)} imports missing {specifier}"
            url = "/dashboard/" + target.relative_to(DASHBOARD_DIR).as_posix()
            assert client.get(url).status_code == 200, url
            seen += 1
    assert seen >= 15


def test_nothing_is_loaded_from_another_origin() -> None:
    remote = re.compile(r"""(?:src|href)\s*=\s*["']\s*(?:https?:)?//|from\s+["'](?:https?:)?//|fetch\(\s*["'](?:https?:)?//|@import""")
    for path in OWN_FILES:
        text = path.read_text()
        assert not remote.search(text), f"{path.relative_to(DASHBOARD_DIR)} loads something from elsewhere"


def test_vendored_uplot_is_the_version_its_note_names() -> None:
    folder = DASHBOARD_DIR / "vendor" / "uplot"
    note = (folder / "README.md").read_text()
    hashes = dict(re.findall(r"`([\w.]+)` \(sha256 `([0-9a-f]{64})`\)", note))
    assert set(hashes) == {"uPlot.iife.min.js", "uPlot.min.css"}
    for name, digest in hashes.items():
        assert hashlib.sha256((folder / name).read_bytes()).hexdigest() == digest, name
    assert "uPlot (v1.6.32)" in (folder / "uPlot.iife.min.js").read_text()[:200] and "uplot@1.6.32" in note
    assert "MIT License" in (folder / "LICENSE").read_text()


def test_sample_digits_are_images_of_the_data_set() -> None:
    from sklearn.datasets import load_digits

    digits = load_digits()
    text = (DASHBOARD_DIR / "js" / "digits.js").read_text()
    samples = re.findall(r'label: "(\d)", index: (\d+), pixels: (\[[\d,]+\])', text)
    assert [label for label, _, _ in samples] == [str(c) for c in range(10)]
    for label, index, pixels in samples:
        assert int(digits.target[int(index)]) == int(label)
        np.testing.assert_array_equal(np.asarray(json.loads(pixels)), digits.data[int(index)])
