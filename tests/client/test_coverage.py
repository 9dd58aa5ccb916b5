"""Every route of the API has a method in the typed client (service.client.ENDPOINTS): this
fails when a route is added without one, or when the table names a route or method that is gone."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

from service.api.app import create_app
from service.client import ENDPOINTS, McdropClient
from service.config import Settings

HTTP_METHODS = {"get", "put", "post", "delete", "patch", "head", "options"}


def api_operations(tmp_path: Path) -> set[tuple[str, str]]:
    schema = create_app(Settings(auth="off", data_dir=tmp_path)).openapi()
    return {(method.upper(), path) for path, item in schema["paths"].items() for method in item if method in HTTP_METHODS}


def test_every_route_has_a_client_method(tmp_path: Path) -> None:
    operations = api_operations(tmp_path)
    missing = sorted(operations - ENDPOINTS.keys())
    assert not missing, f"routes without a client method (add them to service/client.py and ENDPOINTS): {missing}"
    stale = sorted(ENDPOINTS.keys() - operations)
    assert not stale, f"ENDPOINTS names routes the API does not have: {stale}"


def test_the_named_methods_exist_and_call_their_route() -> None:
    for (method, path), names in ENDPOINTS.items():
        assert names, (method, path)
        for name in names:
            function = getattr(McdropClient, name, None)
            assert callable(function), f"McdropClient.{name} (for {method} {path}) does not exist"
        # The path appears (as a literal or an f-string with the same parameters) in one of them,
        # or in a method it delegates to (iter_runs -> list_runs).
        pattern = re.escape(path).replace(r"\{", "{").replace(r"\}", "}")
        pattern = re.sub(r"{[a-z_]+}", r"{[^}]+}", pattern)
        sources = [inspect.getsource(getattr(McdropClient, name)) for name in names]
        assert any(re.search(rf"[\"']{pattern}[\"'?]", source) for source in sources), (
            f"none of {names} sends {method} {path}"
        )
