"""service.api.fast_routes.JsonBodyRoute answers exactly as FastAPI's own handler would: the
same predict endpoint mounted twice in one app, once with each route class, compared on good
and bad requests (auth on, as the test settings have it)."""

from __future__ import annotations

import json
import uuid

import pytest
from fastapi import APIRouter, FastAPI
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient

from service.api.errors import install_error_handlers
from service.api.fast_routes import JsonBodyRoute, _Plan
from service.api.routes import runs as run_routes
from service.auth.service import KeyCache
from service.runs.inference import ModelCache
from service.runs.schemas import PredictResponse
from tests.factories import make_dataset, make_run, train_in_process


@pytest.fixture(scope="module")
def twins(settings, api_key: str) -> TestClient:
    app = FastAPI()
    app.state.settings = settings
    app.state.model_cache = ModelCache(4)
    app.state.key_cache = KeyCache(settings.auth_cache_s)
    install_error_handlers(app)
    for prefix, route_class in (("/fast", JsonBodyRoute), ("/plain", APIRoute)):
        router = APIRouter(prefix=prefix)
        router.add_api_route("/v1/runs/{run_id}/predict", run_routes.predict, methods=["POST"],
                             route_class_override=route_class, response_model=PredictResponse)
        app.include_router(router)
    with TestClient(app) as client:
        yield client


@pytest.fixture(scope="module")
def iris_run(client: TestClient, settings) -> dict:
    dataset = make_dataset(client, "iris", name="iris-fast-routes")
    run = make_run(client, dataset["id"], model={"hidden_layers": [8], "dropout": 0.2},
                   training={"epochs": 2, "batch_size": 32, "seed": 3})
    return train_in_process(client, settings, run)


def both(twins: TestClient, path_tail: str, **request) -> tuple[tuple[int, dict], tuple[int, dict]]:
    answers = []
    for prefix in ("/fast", "/plain"):
        response = twins.post(f"{prefix}/v1/runs/{path_tail}", **request)
        body = response.json()
        body.pop("instance", None)  # the request's path: differs by prefix
        answers.append((response.status_code, body))
    return answers[0], answers[1]


def test_the_real_predict_route_takes_the_fast_path() -> None:
    route = next(r for r in run_routes.router.routes if r.path.endswith("/predict"))
    assert isinstance(route, JsonBodyRoute)
    plan = _Plan(route.endpoint, set(route.param_convertors))
    assert plan.ok and set(plan.path) == {"run_id"} and plan.tenant and plan.request


GOOD = {"inputs": [[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3]], "samples": 50, "seed": 9}


@pytest.mark.parametrize(
    ("case", "tail", "request_kwargs"),
    [
        ("unknown run", f"{uuid.UUID(int=5)}/predict", {"json": GOOD}),
        ("bad run id", "nope/predict", {"json": GOOD}),
        ("bad run id and body", "nope/predict", {"json": {"inputs": [], "samples": 0, "extra": 1}}),
        ("missing body", "{run}/predict", {}),
        ("empty inputs", "{run}/predict", {"json": {"inputs": []}}),
        ("strings", "{run}/predict", {"json": {"inputs": [["a", 1, 2, 3]]}}),
        ("numeric strings", "{run}/predict", {"json": {"inputs": [["5.1", 3.5, 1.4, 0.2]], "seed": 1}}),
        ("samples out of range", "{run}/predict", {"json": {"inputs": GOOD["inputs"], "samples": 10_001}}),
        ("unknown field", "{run}/predict", {"json": {**GOOD, "temperature": 2}}),
        ("NaN token", "{run}/predict", {"content": '{"inputs": [[NaN, 1, 2, 3]]}'}),
        ("huge number", "{run}/predict", {"content": '{"inputs": [[1e400, 1, 2, 3]]}'}),
        ("malformed JSON", "{run}/predict", {"content": '{"inputs": [[1, 2,'}),
        ("text/plain", "{run}/predict", {"content": json.dumps(GOOD), "content_type": "text/plain"}),
        ("no content type", "{run}/predict", {"content": json.dumps(GOOD), "content_type": None}),
        ("+json content type", "{run}/predict", {"content": json.dumps(GOOD), "content_type": "application/vnd.x+json; charset=utf-8"}),
        ("wrong feature count", "{run}/predict", {"json": {"inputs": [[1.0, 2.0]]}}),
        ("good", "{run}/predict", {"json": GOOD}),
    ],
)
def test_same_answers_as_fastapis_handler(twins: TestClient, iris_run: dict, api_key: str, case: str, tail: str,
                                          request_kwargs: dict) -> None:
    request_kwargs = dict(request_kwargs)
    headers = {"Authorization": f"Bearer {api_key}"}
    if "content" in request_kwargs:
        content_type = request_kwargs.pop("content_type", "application/json")
        if content_type is not None:
            headers["content-type"] = content_type
    fast, plain = both(twins, tail.format(run=iris_run["id"]), headers=headers, **request_kwargs)
    assert fast == plain
    ok = ("good", "numeric strings", "+json content type")
    assert fast[0] == (200 if case in ok else 404 if case == "unknown run" else 422), fast


@pytest.mark.parametrize(
    ("headers", "content"),
    [
        ({}, json.dumps(GOOD)),  # no key
        ({"Authorization": "Bearer mcd_not-a-key"}, json.dumps(GOOD)),  # unknown key
        ({"Authorization": "Basic dXNlcjpwYXNz"}, json.dumps(GOOD)),  # not a bearer token
        ({}, '{"inputs": ['),  # malformed JSON is reported before the missing key, as FastAPI does
        ({}, '{"inputs": []}'),  # a valid JSON body's errors come after the missing key
    ],
)
def test_auth_errors_in_fastapis_order(twins: TestClient, iris_run: dict, headers: dict, content: str) -> None:
    fast, plain = both(twins, f"{iris_run['id']}/predict", content=content,
                       headers={"content-type": "application/json", **headers})
    assert fast == plain
    assert fast[0] in (401, 422)
