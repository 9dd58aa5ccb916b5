"""The model registry over HTTP: versions, gated aliases, predict by name, preloading on alias
moves (a second app plays another API replica), and tenant isolation."""

from __future__ import annotations

import time
import uuid

import pytest
from fastapi.testclient import TestClient

from service.api.app import create_app
from service.config import Settings
from tests.api.test_datasets import assert_problem
from tests.conftest import make_key
from tests.factories import TEXTBOOK_TRAINING, make_dataset, make_run, train_in_process

DIGIT_ROWS = 4


@pytest.fixture(scope="module")
def digits(client: TestClient) -> dict:
    return make_dataset(client, "digits")


def _train(client: TestClient, settings: Settings, dataset: dict, seed: int, epochs: int = 3) -> dict:
    run = make_run(client, dataset["id"], model={"hidden_layers": [32], "dropout": 0.3},
                   training={**TEXTBOOK_TRAINING, "epochs": epochs, "seed": seed})
    # A long lease: on a busy machine the session's 3 s lease can expire mid-training (the
    # in-process "worker" sends no heartbeats) and the reconciler would requeue the run.
    return train_in_process(client, settings.model_copy(update={"lease_s": 120.0}), run)


@pytest.fixture(scope="module")
def run_a(client: TestClient, settings: Settings, digits: dict) -> dict:
    return _train(client, settings, digits, seed=1)


@pytest.fixture(scope="module")
def run_b(client: TestClient, settings: Settings, digits: dict) -> dict:
    return _train(client, settings, digits, seed=2)


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def register(client: TestClient, name: str, run: dict) -> dict:
    response = client.post("/v1/models", json={"name": name, "run_id": run["id"]})
    assert response.status_code == 201, response.text
    return response.json()


def digit_inputs(count: int = DIGIT_ROWS) -> list[list[float]]:
    from sklearn.datasets import load_digits

    return load_digits().data[:count].tolist()


def test_register_versions_list_and_read(client: TestClient, run_a: dict, run_b: dict) -> None:
    name = unique("digits")
    first, second = register(client, name, run_a), register(client, name, run_b)
    assert (first["version"], first["run_id"], first["name"]) == (1, run_a["id"], name)
    assert (second["version"], second["run_id"]) == (2, run_b["id"])
    again = assert_problem(client.post("/v1/models", json={"name": name, "run_id": run_a["id"]}), 409)
    assert "already version 1" in again["detail"]

    model = client.get(f"/v1/models/{name}").json()
    assert model["name"] == name and model["latest_version"] == 2 and model["aliases"] == []
    versions = client.get(f"/v1/models/{name}/versions").json()
    assert [item["version"] for item in versions["items"]] == [2, 1] and versions["next_cursor"] is None
    page = client.get(f"/v1/models/{name}/versions", params={"limit": 1, "sort": "created_at"}).json()
    assert [item["version"] for item in page["items"]] == [1] and page["next_cursor"]
    rest = client.get(f"/v1/models/{name}/versions",
                      params={"limit": 1, "sort": "created_at", "cursor": page["next_cursor"]}).json()
    assert [item["version"] for item in rest["items"]] == [2]
    listed = client.get("/v1/models", params={"limit": 1000}).json()["items"]
    assert name in [item["name"] for item in listed]


def test_registration_refuses_what_cannot_be_served(client: TestClient, digits: dict) -> None:
    assert_problem(client.post("/v1/models", json={"name": unique("m"), "run_id": str(uuid.uuid4())}), 422,
                   loc=["body", "run_id"])
    queued = make_run(client, digits["id"], training={**TEXTBOOK_TRAINING, "epochs": 1})
    problem = assert_problem(client.post("/v1/models", json={"name": unique("m"), "run_id": queued["id"]}), 409)
    assert "queued" in problem["detail"]
    for bad in ("", "-starts-with-dash", "has space", "x" * 129, "slash/inside"):
        assert_problem(client.post("/v1/models", json={"name": bad, "run_id": queued["id"]}), 422, loc=["body", "name"])
    assert_problem(client.get(f"/v1/models/{unique('missing')}"), 404)
    assert_problem(client.get(f"/v1/models/{unique('missing')}/versions"), 404)


def test_gates_refuse_a_failing_version_and_list_every_failing_condition(client: TestClient, run_a: dict) -> None:
    name = unique("gated")
    register(client, name, run_a)
    evaluation = client.get(f"/v1/runs/{run_a['id']}/evaluation").json()
    accuracy, ece = evaluation["mc"]["accuracy"], evaluation["mc"]["ece"]
    strict = [
        {"metric": "mc.accuracy", "op": ">=", "value": 0.9999},  # fails: accuracy is below
        {"metric": "mc.ece", "op": "<=", "value": 1.0},  # passes
        {"metric": "mc.rmse", "op": "<=", "value": 1.0},  # a classifier has no rmse: fails as missing
    ]
    gated = client.put(f"/v1/models/{name}/aliases/production/gates", json={"conditions": strict})
    assert gated.status_code == 200, gated.text
    assert gated.json()["version"] is None and len(gated.json()["gates"]) == 3

    refused = assert_problem(client.put(f"/v1/models/{name}/aliases/production", json={"version": 1}), 409)
    failing = {item["metric"]: item for item in refused["errors"]}
    assert set(failing) == {"mc.accuracy", "mc.rmse"}
    assert failing["mc.accuracy"]["actual"] == pytest.approx(accuracy)
    assert failing["mc.accuracy"]["op"] == ">=" and failing["mc.accuracy"]["value"] == 0.9999
    assert failing["mc.rmse"]["actual"] is None and "missing" in failing["mc.rmse"]["msg"]
    assert "mc.accuracy" in refused["detail"] and "2 of the 3" in refused["detail"]
    assert client.get(f"/v1/models/{name}").json()["aliases"][0]["version"] is None  # nothing moved

    passing = [{"metric": "mc.accuracy", "op": ">=", "value": accuracy - 0.01},
               {"metric": "mc.ece", "op": "<=", "value": ece + 0.01}]
    assert client.put(f"/v1/models/{name}/aliases/production/gates", json={"conditions": passing}).status_code == 200
    moved = client.put(f"/v1/models/{name}/aliases/production", json={"version": 1})
    assert moved.status_code == 200, moved.text
    body = moved.json()
    assert (body["alias"], body["version"], body["run_id"], body["generation"]) == ("production", 1, run_a["id"], 1)


@pytest.mark.parametrize(("body", "loc"), [
    ({"conditions": [{"metric": "mc.ece", "op": "~", "value": 1}]}, ["body", "conditions", 0, "op"]),
    ({"conditions": [{"metric": "Bad Metric", "op": "<", "value": 1}]}, ["body", "conditions", 0, "metric"]),
    ({"conditions": [{"metric": "mc.ece", "op": "<"}]}, ["body", "conditions", 0, "value"]),
])
def test_bad_gates_are_422(client: TestClient, run_a: dict, body: dict, loc: list) -> None:
    name = unique("badgates")
    register(client, name, run_a)
    assert_problem(client.put(f"/v1/models/{name}/aliases/production/gates", json=body), 422, loc=loc)
    assert_problem(client.put(f"/v1/models/{name}/aliases/Prod", json={"version": 1}), 422, loc=["path", "alias"])
    assert_problem(client.put(f"/v1/models/{name}/aliases/production", json={"version": 0}), 422)
    assert_problem(client.put(f"/v1/models/{name}/aliases/production", json={"version": 9}), 404)


def test_predict_by_alias_and_version(client: TestClient, run_a: dict, run_b: dict) -> None:
    name = unique("served")
    register(client, name, run_a), register(client, name, run_b)
    url = f"/v1/models/{name}/predict"
    body = {"inputs": digit_inputs(), "samples": 20, "seed": 3}
    missing = assert_problem(client.post(url, json=body), 404)
    assert "production" in missing["detail"]  # the default alias, not set yet

    assert client.put(f"/v1/models/{name}/aliases/production", json={"version": 2}).status_code == 200
    assert client.put(f"/v1/models/{name}/aliases/staging", json={"version": 1}).status_code == 200
    by_default = client.post(url, json=body)
    assert by_default.status_code == 200, by_default.text
    assert by_default.json()["run_id"] == run_b["id"] and by_default.headers["x-model-version"] == "2"
    by_run = client.post(f"/v1/runs/{run_b['id']}/predict", json=body).json()
    assert by_default.json()["predictions"] == by_run["predictions"]  # the same model, the same seed

    staging = client.post(url, params={"alias": "staging"}, json=body)
    assert staging.json()["run_id"] == run_a["id"] and staging.headers["x-model-version"] == "1"
    version = client.post(url, params={"version": 1}, json=body)
    assert version.json()["run_id"] == run_a["id"] and version.json()["predictions"] == staging.json()["predictions"]

    assert_problem(client.post(url, params={"version": 3}, json=body), 404)
    assert_problem(client.post(url, params={"alias": "canary"}, json=body), 404)
    assert_problem(client.post(url, params={"alias": "staging", "version": 1}, json=body), 422)
    assert_problem(client.post(url, json={"inputs": [[0.0] * 3]}), 422, loc=["body", "inputs", 0])

    versions = client.get(f"/v1/models/{name}/versions").json()["items"]
    assert {item["version"]: item["aliases"] for item in versions} == {2: ["production"], 1: ["staging"]}

    # Deleting an alias stops serving it at once on this replica.
    assert client.delete(f"/v1/models/{name}/aliases/staging").status_code == 204
    assert_problem(client.post(url, params={"alias": "staging"}, json=body), 404)
    assert_problem(client.delete(f"/v1/models/{name}/aliases/staging"), 404)


def test_an_alias_move_is_preloaded_by_another_replica_before_it_switches(
    client: TestClient, settings: Settings, auth_headers: dict, digits: dict, run_a: dict,
) -> None:
    """Replica A (the session's app) moves the alias; replica B (a second app on the same
    database, with its own model cache and refresher) loads the new model and only then
    switches: its first request after the switch is served from the cache, with no load."""
    fresh = _train(client, settings, digits, seed=7, epochs=2)  # in nobody's cache yet
    name = unique("replicated")
    register(client, name, run_a), register(client, name, fresh)
    assert client.put(f"/v1/models/{name}/aliases/production", json={"version": 1}).status_code == 200
    key = ("default", name, "production")
    with TestClient(create_app(settings), headers=auth_headers) as replica:
        aliases, cache = replica.app.state.model_aliases, replica.app.state.model_cache
        _wait_for(lambda: (found := aliases.lookup(*key)) is not None and found.version == 1)
        assert cache.peek(uuid.UUID(fresh["id"])) is None

        assert client.put(f"/v1/models/{name}/aliases/production", json={"version": 2}).status_code == 200
        _wait_for(lambda: aliases.lookup(*key).version == 2)
        switch = [s for s in aliases.switches if s.key == key][-1]
        assert switch.run_id == uuid.UUID(fresh["id"]) and switch.version == 2
        assert switch.cached_at_switch  # loaded BEFORE the map pointed at it

        loads = cache.loads
        response = replica.post(f"/v1/models/{name}/predict", json={"inputs": digit_inputs(), "samples": 10})
        assert response.status_code == 200, response.text
        assert response.json()["run_id"] == fresh["id"] and response.headers["x-model-version"] == "2"
        assert cache.loads == loads  # no load on the request path


def _wait_for(condition, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "the replica did not follow the alias in time"
        time.sleep(0.05)


def test_another_tenant_sees_no_model(client: TestClient, settings: Settings, run_a: dict) -> None:
    name = unique("private")
    register(client, name, run_a)
    assert client.put(f"/v1/models/{name}/aliases/production", json={"version": 1}).status_code == 200
    other = {"Authorization": f"Bearer {make_key(settings, 'other')}"}
    predict = {"inputs": digit_inputs(1), "samples": 5}
    for method, path, body in [
        ("GET", f"/v1/models/{name}", None),
        ("GET", f"/v1/models/{name}/versions", None),
        ("POST", f"/v1/models/{name}/predict", predict),
        ("POST", f"/v1/models/{name}/predict?version=1", predict),
        ("POST", f"/v1/models/{name}/acquire", {"inputs": digit_inputs(2), "k": 1}),
        ("PUT", f"/v1/models/{name}/aliases/production", {"version": 1}),
        ("PUT", f"/v1/models/{name}/aliases/production/gates", {"conditions": []}),
        ("DELETE", f"/v1/models/{name}/aliases/production", None),
    ]:
        assert_problem(client.request(method, path, json=body, headers=other), 404)
    assert name not in [m["name"] for m in client.get("/v1/models", headers=other).json()["items"]]
    # Another tenant cannot register the run either (as if it did not exist).
    assert_problem(client.post("/v1/models", json={"name": name, "run_id": run_a["id"]}, headers=other), 422,
                   loc=["body", "run_id"])
    # And the owner still is served.
    assert client.post(f"/v1/models/{name}/predict", json=predict).status_code == 200


# -- acquisition -------------------------------------------------------------------------------
def acquisition_pool() -> tuple[list[list[float]], set[int]]:
    """40 digits (in distribution) then 40 rows of uniform noise over the pixel range (out of
    distribution, where the passes disagree most); returns the pool and the noise rows."""
    import numpy as np

    noise = np.random.default_rng(0).uniform(0.0, 16.0, size=(40, 64)).round().tolist()
    return digit_inputs(40) + noise, set(range(40, 80))


def test_acquire_by_bald_ranks_out_of_distribution_rows_first(client: TestClient, run_a: dict) -> None:
    name = unique("acquire")
    register(client, name, run_a)
    pool, noise = acquisition_pool()
    body = {"inputs": pool, "k": 20, "strategy": "bald", "samples": 50, "seed": 5}
    response = client.post(f"/v1/models/{name}/acquire", params={"version": 1}, json=body)
    assert response.status_code == 200, response.text
    result = response.json()
    assert (result["version"], result["run_id"], result["pool_size"], result["seed"]) == (1, run_a["id"], 80, 5)
    items = result["items"]
    assert len(items) == 20
    scores = [item["score"] for item in items]
    assert scores == sorted(scores, reverse=True)
    assert all(item["score"] == item["mutual_information"] for item in items)
    assert all(item["predictive_entropy"] >= item["mutual_information"] >= 0 for item in items)
    assert sum(item["index"] in noise for item in items) >= 16

    again = client.post(f"/v1/models/{name}/acquire", params={"version": 1}, json=body).json()
    assert again["items"] == items  # the seed reproduces the ranking and the scores
    other = client.post(f"/v1/models/{name}/acquire", params={"version": 1}, json={**body, "seed": 6}).json()
    assert other["items"] != items


def test_acquire_strategies_dataset_pools_and_chosen_seeds(client: TestClient, run_a: dict, digits: dict) -> None:
    name = unique("pool")
    register(client, name, run_a)
    assert client.put(f"/v1/models/{name}/aliases/production", json={"version": 1}).status_code == 200
    url = f"/v1/models/{name}/acquire"  # default alias: production
    for strategy in ("variation_ratio", "predictive_entropy"):
        result = client.post(url, json={"dataset_id": digits["id"], "k": 5, "strategy": strategy, "samples": 8, "seed": 1})
        assert result.status_code == 200, result.text
        body = result.json()
        assert body["pool_size"] == 1797 and body["strategy"] == strategy and len(body["items"]) == 5
        assert all(item["score"] == item[strategy] for item in body["items"])
        assert all(item["label"] == str(item["predicted_class"]) for item in body["items"])
    unseeded = client.post(url, json={"inputs": digit_inputs(6), "k": 10, "samples": 8}).json()
    assert isinstance(unseeded["seed"], int) and len(unseeded["items"]) == 6  # k beyond the pool: all rows
    replay = client.post(url, json={"inputs": digit_inputs(6), "k": 10, "samples": 8, "seed": unseeded["seed"]}).json()
    assert replay["items"] == unseeded["items"]


def test_acquire_rejects_bad_pools(client: TestClient, run_a: dict, digits: dict) -> None:
    name = unique("badpool")
    register(client, name, run_a)
    url = f"/v1/models/{name}/acquire?version=1"
    iris = make_dataset(client, "iris")
    assert_problem(client.post(url, json={"k": 1}), 422)
    assert_problem(client.post(url, json={"inputs": digit_inputs(1), "dataset_id": digits["id"]}), 422)
    assert_problem(client.post(url, json={"inputs": [[1.0] * 64, [1.0] * 3]}), 422, loc=["body", "inputs", 1])
    assert_problem(client.post(url, json={"dataset_id": iris["id"]}), 422, loc=["body", "dataset_id"])
    assert_problem(client.post(url, json={"dataset_id": str(uuid.uuid4())}), 422, loc=["body", "dataset_id"])
    assert_problem(client.post(url, json={"dataset_id": digits["id"], "samples": 10_000}), 422, loc=["body", "samples"])
    assert_problem(client.post(url, json={"inputs": [[1e39] * 64]}), 422, loc=["body", "inputs"])
    assert_problem(client.post(url, json={"inputs": digit_inputs(1), "strategy": "margin"}), 422, loc=["body", "strategy"])
    assert_problem(client.post(url, json={"inputs": digit_inputs(1), "k": 0}), 422, loc=["body", "k"])


def test_acquire_for_regression_ranks_by_predictive_entropy_only(client: TestClient, settings: Settings) -> None:
    diabetes = make_dataset(client, "diabetes")
    run = make_run(client, diabetes["id"], model={"hidden_layers": [16], "dropout": 0.2},
                   training={"epochs": 2, "batch_size": 32, "seed": 1})
    run = train_in_process(client, settings.model_copy(update={"lease_s": 120.0}), run)
    name = unique("regression")
    register(client, name, run)
    url = f"/v1/models/{name}/acquire?version=1"
    problem = assert_problem(client.post(url, json={"dataset_id": diabetes["id"], "strategy": "bald"}), 422,
                             loc=["body", "strategy"])
    assert "predictive_entropy" in problem["detail"]
    result = client.post(url, json={"dataset_id": diabetes["id"], "strategy": "predictive_entropy", "k": 7,
                                    "samples": 10, "seed": 2})
    assert result.status_code == 200, result.text
    items = result.json()["items"]
    stds = [item["std"] for item in items]
    assert len(items) == 7 and stds == sorted(stds, reverse=True)
    assert all(item["mean"] is not None and item["mutual_information"] is None for item in items)


def test_alias_targets_stay_warm_in_a_small_cache(client: TestClient, settings: Settings, run_a: dict, run_b: dict,
                                                  digits: dict) -> None:
    """A cache of 2 keeps 1 alias target warm: evicted by ad-hoc runs, it is reloaded at the
    next poll (refresh is called by hand here; the refresher thread calls it every second)."""
    from service.registry.serving import ServingAliases, serving_model
    from service.runs.inference import ModelCache

    name = unique("warm")
    register(client, name, run_a)
    assert client.put(f"/v1/models/{name}/aliases/production", json={"version": 1}).status_code == 200
    cache = ModelCache(2)
    aliases = ServingAliases(settings, cache)
    aliases.following = True
    aliases.refresh()  # the most recently moved alias is ours: it is the one preloaded
    target = uuid.UUID(run_a["id"])
    assert aliases.lookup("default", name, "production").run_id == target and cache.peek(target) is not None

    other = _train(client, settings, digits, seed=11, epochs=1)
    for run_id in (uuid.UUID(run_b["id"]), uuid.UUID(other["id"])):  # two ad-hoc runs evict it
        serving_model(settings, cache, run_id, "default")
    assert cache.peek(target) is None
    loads = cache.loads
    aliases.refresh()
    assert cache.peek(target) is not None and cache.loads == loads + 1
