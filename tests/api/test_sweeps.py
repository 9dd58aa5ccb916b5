"""Sweeps: validation, then a small grid × splits sweep trained by the worker's job logic."""

from __future__ import annotations

import uuid

import numpy as np
import pytest
from fastapi.testclient import TestClient

from tests.api.test_datasets import assert_problem
from tests.factories import make_dataset


@pytest.fixture(scope="module")
def diabetes(client: TestClient) -> dict:
    return make_dataset(client, "diabetes", name="diabetes-sweeps")


def sweep_body(dataset_id: str, **overrides) -> dict:
    return {
        "dataset_id": dataset_id,
        "model": {"hidden_layers": [16], "dropout": 0.05, "input_dropout": 0.05, "tau": 3e-4, "prior_lengthscale": 0.01},
        "training": {"epochs": 15, "batch_size": 32, "seed": 0, "validation_fraction": 0.2},
        "grid": {"dropout": [0.01, 0.1], "tau": [2e-4, 4e-4]},
        "tie_input_dropout": True,
        "splits": {"folds": 3},
        "search_samples": 50,
        "test_samples": 200,
        **overrides,
    }


def run_in_process(settings, sweep_id: str) -> None:
    from workers import runners
    from workers.daemon import WorkerDaemon

    runners.train_run(uuid.UUID(sweep_id), settings, WorkerDaemon(settings, ["cpu"], "cpu"))


def test_sweep_ranks_configurations_and_tests_the_best(client: TestClient, settings, diabetes) -> None:
    created = client.post("/v1/sweeps", json=sweep_body(diabetes["id"]))
    assert created.status_code == 202, created.text
    sweep = created.json()
    assert sweep["status"] == "queued" and sweep["n_configurations"] == 4 and sweep["n_splits"] == 3
    assert sweep["epochs_total"] == 30
    run_in_process(settings, sweep["id"])
    done = client.get(f"/v1/sweeps/{sweep['id']}").json()
    assert done["status"] == "succeeded", done
    results = done["results"]
    ranking = results["ranking"]
    assert len(ranking) == 4
    means = [entry["validation"]["log_likelihood"]["mean"] for entry in ranking]
    assert means == sorted(means, reverse=True)  # best first
    assert all(len(entry["per_split"]) == 3 and entry["validation"]["log_likelihood"]["se"] > 0 for entry in ranking)
    assert results["best"] == ranking[0]["configuration"]
    assert {entry["configuration"]["input_dropout"] == entry["configuration"]["dropout"] for entry in ranking} == {True}
    test = results["test"]
    assert len(test["per_split"]) == 3 and test["samples"] == 200
    assert 40 < test["rmse"]["mean"] < 80  # diabetes: target std ~77
    assert -6.5 < test["log_likelihood"]["mean"] < -4.5
    assert done["epochs_done"] == 30
    assert sweep["id"] in [s["id"] for s in client.get("/v1/sweeps").json()["items"]]
    assert sweep["id"] not in [r["id"] for r in client.get("/v1/runs").json()["items"]]  # runs list only runs


def test_sweep_with_given_splits_and_heteroscedastic_head(client: TestClient, settings, diabetes) -> None:
    order = np.random.default_rng(1).permutation(442).tolist()
    given = [{"train_indices": order[:350], "test_indices": order[350:]},
             {"train_indices": order[92:], "test_indices": order[:92]}]
    body = sweep_body(diabetes["id"], splits={"given": given}, grid={"dropout": [0.05, 0.2]},
                      model={"hidden_layers": [16], "dropout": 0.05, "heteroscedastic": True})
    sweep = client.post("/v1/sweeps", json=body).json()
    run_in_process(settings, sweep["id"])
    done = client.get(f"/v1/sweeps/{sweep['id']}").json()
    assert done["status"] == "succeeded", done
    assert [p["split"] for p in done["results"]["test"]["per_split"]] == [0, 1]
    assert done["results"]["test"]["log_likelihood"]["mean"] is not None


@pytest.mark.parametrize(
    ("change", "loc"),
    [
        ({"splits": {"folds": 3, "given": [{"train_indices": [0, 1], "test_indices": [2]}]}}, ["body", "splits"]),
        ({"splits": {"given": [{"train_indices": [0, 1, 2], "test_indices": [2]}]}}, ["body", "splits", "given", 0]),
        ({"splits": {"given": [{"train_indices": [0, 1, 2], "test_indices": [999]}]}}, ["body", "splits", "given", 0]),
        ({"grid": {"dropout": [1.5]}}, ["body", "grid", "dropout", 0]),
        ({"model": {"hidden_layers": [8], "dropout": 0.1}, "grid": {}}, ["body", "metric"]),
        ({"training": {"epochs": 5, "validation_fraction": 0}}, ["body", "training", "validation_fraction"]),
    ],
)
def test_sweep_validation(client: TestClient, diabetes, change: dict, loc: list) -> None:
    assert_problem(client.post("/v1/sweeps", json=sweep_body(diabetes["id"], **change)), 422, loc=loc)


def test_classification_sweeps_are_refused_clearly(client: TestClient) -> None:
    iris = make_dataset(client, "iris", name="iris-sweep")
    body = assert_problem(client.post("/v1/sweeps", json=sweep_body(iris["id"])), 422, loc=["body", "dataset_id"])
    assert "regression" in body["detail"]


def test_unknown_sweep(client: TestClient) -> None:
    assert_problem(client.get(f"/v1/sweeps/{uuid.uuid4()}"), 404)
