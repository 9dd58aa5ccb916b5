"""Tenant isolation across every route: a table-driven walk over the OpenAPI document.

Tenant A makes one object of every kind; tenant B then calls every route with A's ids and must
get 404 (or, where A's id is in the body of a create, a 404/422 that says it does not exist);
B's lists never show A's ids; without a key every non-public route is 401. A route added
without an entry here fails the walk, so new routes cannot skip the check."""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from service.api.app import create_app
from service.config import Settings
from tests.conftest import make_key
from tests.factories import make_dataset, make_run, train_in_process
from workers import runners
from workers.daemon import WorkerDaemon

# Open by design: liveness/readiness probes, the scrape endpoint (its own optional token),
# the dashboard's static shell (it asks for a key before calling the API) and API docs.
PUBLIC = re.compile(r"^/(healthz|readyz|metrics|docs|redoc|openapi\.json|dashboard.*|v2/health/.*|v2)$")
# Streams that never end for a live tenant: only their auth is checked here (their tenant
# filter has its own test next to the stream).
STREAMS = {"/v1/events"}

Ids = dict[str, Any]


def _digits_input() -> list[list[float]]:
    return [[0.0] * 64]


def _v2_body() -> dict[str, Any]:
    return {"inputs": [{"name": "input-0", "shape": [1, 64], "datatype": "FP32", "data": [0.0] * 64}]}


def _error_shape_ok(path: str, response: Any, status: int) -> bool:
    """problem+json everywhere, except the Open Inference Protocol's own {"error": ...} under /v2."""
    if path.startswith("/v2"):
        return set(response.json()) == {"error"}
    return response.headers["content-type"].startswith("application/problem+json") and response.json()["status"] == status


# Bodies for routes that need one (keyed by method and path template); a callable gets A's ids.
BODIES: dict[tuple[str, str], Callable[[Ids], Any]] = {
    ("POST", "/v1/runs/{run_id}/predict"): lambda ids: {"inputs": _digits_input(), "samples": 5},
    ("POST", "/v1/runs"): lambda ids: {"dataset_id": ids["dataset_id"], "model": {"hidden_layers": [8]},
                                       "training": {"epochs": 1}},
    ("POST", "/v1/sweeps"): lambda ids: ids["sweep_body"],
    ("POST", "/v1/datasets"): lambda ids: {"name": "b-own", "builtin": "iris"},
    ("POST", "/v1/keys"): lambda ids: {"name": "b-own"},
    ("POST", "/v1/models"): lambda ids: {"name": "b-own", "run_id": ids["run_id"]},
    ("POST", "/v1/batch-predictions"): lambda ids: {"run_id": ids["run_id"], "dataset_id": ids["dataset_id"], "samples": 5},
    ("POST", "/v1/models/{name}/predict"): lambda ids: {"inputs": _digits_input(), "samples": 5},
    ("POST", "/v1/models/{name}/acquire"): lambda ids: {"inputs": _digits_input(), "k": 1, "samples": 2},
    ("PUT", "/v1/models/{name}/aliases/{alias}"): lambda ids: {"version": ids["version"]},
    ("PUT", "/v1/models/{name}/aliases/{alias}/gates"): lambda ids: {"conditions": []},
    ("POST", "/v2/models/{name}/infer"): lambda ids: _v2_body(),
    ("POST", "/v2/models/{name}/versions/{version}/infer"): lambda ids: _v2_body(),
}
# Creates that reference another object in the body: B naming A's object must be refused.
REFERENCING_CREATES = {("POST", "/v1/runs"), ("POST", "/v1/sweeps"), ("POST", "/v1/models"), ("POST", "/v1/batch-predictions")}
# Creates that reference nothing: B may create in its own tenant.
OWN_CREATES = {("POST", "/v1/datasets"), ("POST", "/v1/keys")}


def _routes(app_client: TestClient) -> list[tuple[str, str]]:
    spec = app_client.get("/openapi.json").json()
    return sorted((method.upper(), path) for path, operations in spec["paths"].items() for method in operations)


@pytest.fixture(scope="module")
def tenants(settings: Settings) -> Iterator[tuple[TestClient, TestClient, TestClient, Ids]]:
    key_a, key_b = make_key(settings, "tenant-a"), make_key(settings, "tenant-b")
    app = create_app(settings.model_copy(update={"reconcile_interval_s": 0.0}))  # trains in-process below
    with TestClient(app, headers={"Authorization": f"Bearer {key_a}"}) as a, \
            TestClient(app, headers={"Authorization": f"Bearer {key_b}"}) as b, TestClient(app) as anonymous:
        dataset = make_dataset(a, "digits")
        run = train_in_process(a, settings, make_run(a, dataset["id"], model={"hidden_layers": [16], "dropout": 0.2},
                                                     training={"epochs": 2, "batch_size": 64, "validation_fraction": 0.2,
                                                               "seed": 0}))
        diabetes = make_dataset(a, "diabetes")
        sweep_body = {"dataset_id": diabetes["id"], "grid": {"dropout": [0.1]},
                      "model": {"hidden_layers": [8], "tau": 1.0}, "training": {"epochs": 1},
                      "splits": {"folds": 2}}
        sweep = a.post("/v1/sweeps", json=sweep_body)
        assert sweep.status_code == 202, sweep.text
        key = a.post("/v1/keys", json={"name": "a-second"}).json()
        job = a.post("/v1/batch-predictions", json={"run_id": run["id"], "dataset_id": dataset["id"], "samples": 5}).json()
        long_lease = settings.model_copy(update={"lease_s": 300.0})
        runners.train_run(uuid.UUID(job["id"]), long_lease, WorkerDaemon(long_lease, ["cpu"], "cpu"))  # results exist
        assert a.post("/v1/models", json={"name": "a-model", "run_id": run["id"]}).status_code == 201
        assert a.put("/v1/models/a-model/aliases/production", json={"version": 1}).status_code == 200
        ids = {
            "dataset_id": dataset["id"], "run_id": run["id"], "sweep_id": sweep.json()["id"], "key_id": key["id"],
            "job_id": job["id"], "sweep_body": sweep_body, "name": "a-model", "alias": "production", "version": 1,
        }
        yield a, b, anonymous, ids


def _fill(path: str, ids: Ids) -> str:
    def value(match: re.Match[str]) -> str:
        name = match.group(1)
        assert name in ids, f"no id of tenant A for path parameter {{{name}}} in {path}: add one to the fixture"
        return str(ids[name])

    return re.sub(r"\{([^}]+)\}", value, path)


def _call(client: TestClient, method: str, path: str, ids: Ids) -> Any:
    body_of = BODIES.get((method, path))
    kwargs = {"json": body_of(ids)} if body_of is not None else {}
    return client.request(method, _fill(path, ids), **kwargs)


def test_every_route_hides_tenant_a_from_tenant_b(tenants) -> None:
    a, b, anonymous, ids = tenants
    a_ids = {str(ids[name]) for name in ("dataset_id", "run_id", "sweep_id", "key_id", "job_id")}
    checked = []
    for method, path in _routes(a):
        if PUBLIC.match(path):
            continue
        if "{" not in path and method == "POST":
            assert (method, path) in REFERENCING_CREATES | OWN_CREATES, f"{method} {path}: classify it in this test"
        if path in STREAMS:
            continue
        response = _call(b, method, path, ids)
        text = response.text
        if "{" in path:
            assert response.status_code == 404, f"{method} {path} as tenant B: {response.status_code} {text[:300]}"
            assert _error_shape_ok(path, response, 404), f"{method} {path}: {text[:300]}"
        elif (method, path) in REFERENCING_CREATES:
            assert response.status_code in (404, 422) and "does not exist" in text, f"{method} {path}: {text[:300]}"
        elif (method, path) in OWN_CREATES:
            assert response.status_code == 201, f"{method} {path}: {text[:300]}"
        else:
            assert response.status_code == 200, f"{method} {path} as tenant B: {response.status_code} {text[:300]}"
        asked = _fill(path, ids) + json.dumps(BODIES[(method, path)](ids) if (method, path) in BODIES else None)
        leaked = [identifier for identifier in a_ids if identifier in text and identifier not in asked]
        assert not leaked, f"{method} {path} shows tenant A's {leaked} to tenant B"
        checked.append((method, path))
    assert len(checked) >= 15


def test_tenant_a_reaches_its_own_objects(tenants) -> None:
    """The ids used above are real: the owner's reads succeed (so B's 404s mean isolation)."""
    a, _, _, ids = tenants
    for method, path in _routes(a):
        if method != "GET" or "{" not in path or PUBLIC.match(path) or path.endswith("/events"):
            continue
        response = _call(a, method, path, ids)
        assert response.status_code == 200, f"GET {path} as the owner: {response.status_code} {response.text[:300]}"
    predicted = _call(a, "POST", "/v1/runs/{run_id}/predict", ids)
    assert predicted.status_code == 200, predicted.text


def test_every_non_public_route_needs_a_key(tenants) -> None:
    a, _, anonymous, ids = tenants
    for method, path in _routes(a):
        if PUBLIC.match(path):
            continue
        response = _call(anonymous, method, path, ids)
        assert response.status_code == 401, f"{method} {path} without a key: {response.status_code} {response.text[:200]}"
        assert _error_shape_ok(path, response, 401), f"{method} {path}: {response.text[:200]}"
