"""The Open Inference Protocol (KServe V2) against a real server process, from a plain HTTP
client: health, server and model metadata, readiness, infer by alias and by version, V2-shaped
errors, and tenant isolation."""

from __future__ import annotations

import math
import sys
import uuid
from collections.abc import Iterator

import httpx
import pytest
from fastapi.testclient import TestClient

from service.config import Settings
from tests.conftest import Process, free_port, make_key, settings_env
from tests.factories import make_dataset, make_run, train_in_process


@pytest.fixture(scope="module")
def server(settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    process = Process([sys.executable, "-m", "service.cli", "serve", "--host", "127.0.0.1", "--port", str(port)],
                      settings_env(settings), tmp_path_factory.mktemp("v2") / "api.log")
    try:
        process.wait_for_output("Uvicorn running on", timeout=60)  # bound, not only started up
        yield f"http://127.0.0.1:{port}"
    finally:
        process.stop()


@pytest.fixture(scope="module")
def http(server: str, api_key: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server, headers={"Authorization": f"Bearer {api_key}"}, timeout=30) as plain:
        yield plain


def _registered(client: TestClient, settings: Settings, builtin: str, model: dict, training: dict) -> tuple[str, dict]:
    dataset = make_dataset(client, builtin)
    run = train_in_process(client, settings.model_copy(update={"lease_s": 120.0}),
                           make_run(client, dataset["id"], model=model, training=training))
    name = f"v2-{builtin}-{uuid.uuid4().hex[:6]}"
    assert client.post("/v1/models", json={"name": name, "run_id": run["id"]}).status_code == 201
    assert client.put(f"/v1/models/{name}/aliases/production", json={"version": 1}).status_code == 200
    return name, run


@pytest.fixture(scope="module")
def classifier(client: TestClient, settings: Settings) -> tuple[str, dict]:
    return _registered(client, settings, "iris", {"hidden_layers": [16], "dropout": 0.2},
                       {"epochs": 5, "batch_size": 16, "seed": 0})


IRIS_ROWS = [[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3], [5.9, 3.0, 4.2, 1.5]]


def infer_body(data: list, shape: list[int], **parameters: object) -> dict:
    return {"id": "req-1", "parameters": parameters,
            "inputs": [{"name": "input-0", "shape": shape, "datatype": "FP32", "data": data}]}


def assert_v2_error(response: httpx.Response, status: int) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and body["error"], body
    return body["error"]


def test_health_and_server_metadata(server: str) -> None:
    with httpx.Client(base_url=server) as anonymous:  # probes need no key
        assert anonymous.get("/v2/health/live").json() == {"live": True}
        assert anonymous.get("/v2/health/ready").json() == {"ready": True}
        metadata = anonymous.get("/v2").json()
        assert metadata["name"] == "mcdrop" and metadata["version"]
        assert "Bearer" in anonymous.get("/v2/models/anything").headers.get("www-authenticate", "")
        assert_v2_error(anonymous.get("/v2/models/anything"), 401)


def test_model_metadata_and_readiness(http: httpx.Client, classifier: tuple[str, dict]) -> None:
    name, _ = classifier
    metadata = http.get(f"/v2/models/{name}").json()
    assert metadata["name"] == name and metadata["versions"] == ["1"]
    assert metadata["inputs"] == [{"name": "input-0", "datatype": "FP32", "shape": [-1, 4]}]
    outputs = {tensor["name"]: tensor for tensor in metadata["outputs"]}
    assert outputs["probabilities"]["shape"] == [-1, 3] and outputs["predicted_class"]["datatype"] == "INT64"
    assert {"predictive_entropy", "expected_entropy", "mutual_information"} <= set(outputs)
    assert http.get(f"/v2/models/{name}/versions/1").json()["versions"] == ["1"]
    assert http.get(f"/v2/models/{name}/ready").json() == {"name": name, "ready": True}
    assert http.get(f"/v2/models/{name}/versions/1/ready").status_code == 200
    assert_v2_error(http.get(f"/v2/models/{name}/versions/2/ready"), 404)
    assert_v2_error(http.get(f"/v2/models/{name}/ready", params={"alias": "staging"}), 404)


def test_infer_returns_named_uncertainty_outputs(http: httpx.Client, classifier: tuple[str, dict]) -> None:
    name, run = classifier
    flat = [value for row in IRIS_ROWS for value in row]
    response = http.post(f"/v2/models/{name}/infer", json=infer_body(flat, [3, 4], samples=40, seed=9))
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model_name"] == name and body["model_version"] == "1" and body["id"] == "req-1"
    assert body["parameters"]["samples"] == 40 and body["parameters"]["seed"] == 9
    assert body["parameters"]["run_id"] == run["id"]
    outputs = {tensor["name"]: tensor for tensor in body["outputs"]}
    probabilities = outputs["probabilities"]
    assert probabilities["shape"] == [3, 3] and probabilities["datatype"] == "FP64" and len(probabilities["data"]) == 9
    for row in range(3):
        assert math.isclose(sum(probabilities["data"][row * 3 : row * 3 + 3]), 1.0, abs_tol=1e-6)
    for field in ("predictive_entropy", "expected_entropy", "mutual_information", "predicted_class"):
        assert outputs[field]["shape"] == [3] and len(outputs[field]["data"]) == 3

    # The same numbers as /v1 predict of the run with the same seed.
    v1 = http.post(f"/v1/runs/{run['id']}/predict", json={"inputs": IRIS_ROWS, "samples": 40, "seed": 9}).json()
    assert outputs["mutual_information"]["data"] == [p["mutual_information"] for p in v1["predictions"]]
    assert outputs["predicted_class"]["data"] == [p["class_index"] for p in v1["predictions"]]
    assert outputs["label"]["data"] == [p["label"] for p in v1["predictions"]]

    # Nested data, requested outputs only, and a version in the path: the same answer.
    nested = infer_body(IRIS_ROWS, [3, 4], samples=40, seed=9)
    nested["outputs"] = [{"name": "mutual_information"}]
    only = http.post(f"/v2/models/{name}/versions/1/infer", json=nested).json()
    assert [tensor["name"] for tensor in only["outputs"]] == ["mutual_information"]
    assert only["outputs"][0]["data"] == outputs["mutual_information"]["data"]


@pytest.mark.parametrize(("change", "status", "says"), [
    ({"inputs": [{"name": "input-0", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]}]}, 422, "[N, 4]"),
    ({"inputs": [{"name": "input-0", "shape": [2, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}, 422, "needs 8"),
    ({"inputs": [{"name": "input-0", "shape": [1, 4], "datatype": "BYTES", "data": ["a", "b", "c", "d"]}]}, 422, "BYTES"),
    ({"inputs": [{"name": "input-0", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, "x", 4]}]}, 422, "finite number"),
    ({"inputs": []}, 422, "inputs"),
    ({"parameters": {"samples": 0}}, 422, "samples"),
    ({"outputs": [{"name": "logits"}]}, 422, "unknown output"),
])
def test_infer_errors_are_v2_shaped(
    http: httpx.Client, classifier: tuple[str, dict], change: dict, status: int, says: str,
) -> None:
    name, _ = classifier
    body = {**infer_body(IRIS_ROWS[0], [1, 4]), **change}
    assert says in assert_v2_error(http.post(f"/v2/models/{name}/infer", json=body), status)


def test_unknown_and_other_tenants_models_are_404(
    http: httpx.Client, server: str, settings: Settings, classifier: tuple[str, dict],
) -> None:
    name, _ = classifier
    body = infer_body(IRIS_ROWS[0], [1, 4])
    assert "does not exist" in assert_v2_error(http.post("/v2/models/no-such-model/infer", json=body), 404)
    assert_v2_error(http.post(f"/v2/models/{name}/versions/7/infer", json=body), 404)
    assert "staging" in assert_v2_error(
        http.post(f"/v2/models/{name}/infer", json={**body, "parameters": {"alias": "staging"}}), 404)
    other = {"Authorization": f"Bearer {make_key(settings, 'other')}"}
    with httpx.Client(base_url=server, headers=other, timeout=30) as stranger:
        for method, path, payload in [
            ("GET", f"/v2/models/{name}", None), ("GET", f"/v2/models/{name}/ready", None),
            ("GET", f"/v2/models/{name}/versions/1", None), ("POST", f"/v2/models/{name}/infer", body),
            ("POST", f"/v2/models/{name}/versions/1/infer", body),
        ]:
            assert_v2_error(stranger.request(method, path, json=payload), 404)


def test_regression_outputs(http: httpx.Client, client: TestClient, settings: Settings) -> None:
    name, _ = _registered(client, settings, "diabetes", {"hidden_layers": [16], "dropout": 0.2},
                          {"epochs": 2, "batch_size": 32, "seed": 0})
    outputs = {tensor["name"] for tensor in http.get(f"/v2/models/{name}").json()["outputs"]}
    assert outputs == {"mean", "std", "epistemic_std", "aleatoric_std", "lower", "upper"}
    rows = [[0.01] * 10, [-0.02] * 10]
    response = http.post(f"/v2/models/{name}/infer", json=infer_body(rows, [2, 10], samples=30, seed=1))
    assert response.status_code == 200, response.text
    result = {tensor["name"]: tensor["data"] for tensor in response.json()["outputs"]}
    for i in range(2):
        assert result["lower"][i] < result["mean"][i] < result["upper"][i] and result["std"][i] > 0
