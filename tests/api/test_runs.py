"""Runs over HTTP: validation, lifecycle reads, and MC dropout predictions."""

from __future__ import annotations

import math
import uuid

import pytest
from fastapi.testclient import TestClient

from tests.api.test_datasets import assert_problem
from tests.factories import TEXTBOOK_TRAINING, make_dataset, make_run, train_in_process


@pytest.fixture(scope="module")
def digits(client: TestClient) -> dict:
    return make_dataset(client, "digits")


@pytest.fixture(scope="module")
def trained_digits(client: TestClient, settings, digits) -> dict:
    run = make_run(client, digits["id"], training={**TEXTBOOK_TRAINING, "epochs": 5})
    return train_in_process(client, settings, run)


@pytest.fixture(scope="module")
def trained_diabetes(client: TestClient, settings) -> dict:
    dataset = make_dataset(client, "diabetes")
    run = make_run(client, dataset["id"], model={"hidden_layers": [50], "dropout": 0.1},
                   training={"epochs": 30, "batch_size": 32, "seed": 1})
    return train_in_process(client, settings, run)


def test_create_run_is_queued_with_recorded_seed(client: TestClient, digits) -> None:
    body = client.post("/v1/runs", json={"dataset_id": digits["id"], "training": {"epochs": 1}})
    assert body.status_code == 202, body.text
    run = body.json()
    assert run["status"] == "queued" and run["epochs_total"] == 1 and run["epochs_done"] == 0
    assert isinstance(run["spec"]["training"]["seed"], int)  # chosen by the service, reproducible
    assert run["task"] == "classification"


@pytest.mark.parametrize(
    ("change", "loc"),
    [
        ({"model": {"hidden_layers": [64, 64], "dropout": [0.5]}}, ["body", "model"]),
        ({"model": {"dropout": 1.0}}, ["body", "model", "dropout"]),
        ({"model": {"hidden_layers": [8, 8], "dropout": [0.2, -0.1]}}, ["body", "model", "dropout"]),
        ({"model": {"hidden_layers": []}}, ["body", "model", "hidden_layers"]),
        ({"model": {"activation": "sigmoid"}}, ["body", "model", "activation"]),
        ({"training": {"epochs": 0}}, ["body", "training", "epochs"]),
        ({"training": {"optimizer": "lbfgs"}}, ["body", "training", "optimizer"]),
        ({"training": {"learning_rate": -1}}, ["body", "training", "learning_rate"]),
        ({"training": {"validation_fraction": 0.95}}, ["body", "training", "validation_fraction"]),
        ({"model": {"tau": 1.0}}, ["body", "model", "tau"]),
        ({"dataset_id": str(uuid.UUID(int=1))}, ["body", "dataset_id"]),
        ({"dataset_id": "nope"}, ["body", "dataset_id"]),
        ({"unknown": 1}, ["body", "unknown"]),
    ],
)
def test_create_run_rejects_bad_specs(client: TestClient, digits, change: dict, loc: list) -> None:
    body = {"dataset_id": digits["id"], **change}
    assert_problem(client.post("/v1/runs", json=body), 422, loc=loc)


def test_validation_fraction_leaving_no_training_rows(client: TestClient) -> None:
    response = client.post(
        "/v1/datasets", data={"name": "tiny", "target": "y", "task": "classification"},
        files={"file": ("t.csv", b"x,y\n1,a\n2,b\n", "text/csv")},
    )
    tiny = response.json()
    body = {"dataset_id": tiny["id"], "training": {"validation_fraction": 0.9}}
    assert_problem(client.post("/v1/runs", json=body), 422, loc=["body", "training", "validation_fraction"])


def test_unknown_run_is_404_everywhere(client: TestClient) -> None:
    missing = uuid.uuid4()
    assert_problem(client.get(f"/v1/runs/{missing}"), 404)
    assert_problem(client.get(f"/v1/runs/{missing}/metrics"), 404)
    assert_problem(client.post(f"/v1/runs/{missing}/predict", json={"inputs": [[0.0]]}), 404)


def test_predict_before_success_is_409(client: TestClient, digits) -> None:
    run = make_run(client, digits["id"], training={"epochs": 1, "seed": 3})
    assert_problem(client.post(f"/v1/runs/{run['id']}/predict", json={"inputs": [[0.0] * 64]}), 409)


def test_run_history_and_listing(client: TestClient, trained_digits) -> None:
    run_id = trained_digits["id"]
    history = client.get(f"/v1/runs/{run_id}/metrics").json()["items"]
    assert [item["epoch"] for item in history] == [1, 2, 3, 4, 5]
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert trained_digits["latest_metrics"]["epoch"] == 5 and trained_digits["epochs_done"] == 5
    assert trained_digits["latest_metrics"]["val_accuracy"] > 0.8
    assert trained_digits["finished_at"] >= trained_digits["started_at"] >= trained_digits["created_at"]
    listed = client.get("/v1/runs").json()["items"]
    created = [item["created_at"] for item in listed]
    assert created == sorted(created, reverse=True)
    assert all(item["status"] == "succeeded" for item in client.get("/v1/runs?status=succeeded").json()["items"])
    assert_problem(client.get("/v1/runs?status=bogus"), 422, loc=["query", "status"])


def _digit_inputs(count: int) -> list[list[float]]:
    from sklearn.datasets import load_digits

    return load_digits().data[:count].tolist()


def test_predict_classification_fields(client: TestClient, trained_digits) -> None:
    response = client.post(
        f"/v1/runs/{trained_digits['id']}/predict", json={"inputs": _digit_inputs(8), "samples": 100, "seed": 7}
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["samples"] == 100 and len(body["predictions"]) == 8 and body["class_names"][0] == "0"
    for prediction in body["predictions"]:
        assert math.isclose(sum(prediction["probabilities"]), 1.0, abs_tol=1e-6)
        assert len(prediction["probabilities_std"]) == 10
        assert prediction["predictive_entropy"] >= prediction["mutual_information"] >= 0
        assert prediction["expected_entropy"] >= 0
        assert prediction["predictive_entropy"] <= math.log(10) + 1e-9
        assert prediction["class_index"] == int(prediction["label"])
        assert math.isclose(sum(prediction["deterministic"]["probabilities"]), 1.0, abs_tol=1e-6)
    from sklearn.datasets import load_digits

    labels = [p["class_index"] for p in body["predictions"]]
    assert sum(a == b for a, b in zip(labels, load_digits().target[:8])) >= 6


def test_predict_seed_reproduces_and_no_seed_varies(client: TestClient, trained_digits) -> None:
    url = f"/v1/runs/{trained_digits['id']}/predict"
    inputs = _digit_inputs(3)
    first = client.post(url, json={"inputs": inputs, "samples": 50, "seed": 11}).json()["predictions"]
    again = client.post(url, json={"inputs": inputs, "samples": 50, "seed": 11}).json()["predictions"]
    other = client.post(url, json={"inputs": inputs, "samples": 50, "seed": 12}).json()["predictions"]
    assert first == again
    assert first != other
    unseeded = [client.post(url, json={"inputs": inputs, "samples": 50}).json()["predictions"] for _ in range(2)]
    assert unseeded[0] != unseeded[1]


@pytest.mark.parametrize(
    ("body", "status", "loc"),
    [
        ({"inputs": [[0.0] * 63]}, 422, ["body", "inputs", 0]),
        ({"inputs": [[0.0] * 64, [0.0] * 65]}, 422, ["body", "inputs", 1]),
        ({"inputs": []}, 422, ["body", "inputs"]),
        ({"inputs": [[0.0] * 64], "samples": 0}, 422, ["body", "samples"]),
        ({"inputs": [[0.0] * 64], "samples": 10_001}, 422, ["body", "samples"]),
        ({"inputs": [[0.0] * 64] * 65}, 422, ["body", "inputs"]),
        ({"inputs": [["a"] * 64]}, 422, ["body", "inputs", 0, 0]),
        ({"inputs": [[1e39] * 64]}, 422, ["body", "inputs"]),
        ({"samples": 10}, 422, ["body", "inputs"]),
    ],
    ids=["too-few-features", "too-many-features", "empty", "zero-samples", "too-many-samples",
         "over-input-limit", "strings", "float32-overflow", "missing-inputs"],
)
def test_predict_rejects_bad_inputs(client: TestClient, trained_digits, body, status, loc) -> None:
    assert_problem(client.post(f"/v1/runs/{trained_digits['id']}/predict", json=body), status, loc=loc)


@pytest.mark.parametrize("token", ["NaN", "Infinity", "-Infinity"])
def test_predict_rejects_nan_and_infinity(client: TestClient, trained_digits, token: str) -> None:
    raw = '{"inputs": [[' + ", ".join([token] + ["0"] * 63) + "]]}"
    response = client.post(
        f"/v1/runs/{trained_digits['id']}/predict", content=raw, headers={"content-type": "application/json"}
    )
    assert_problem(response, 422, loc=["body", "inputs", 0, 0])


def test_predict_regression_fields(client: TestClient, trained_diabetes) -> None:
    from sklearn.datasets import load_diabetes

    data = load_diabetes()
    response = client.post(
        f"/v1/runs/{trained_diabetes['id']}/predict",
        json={"inputs": data.data[:20].tolist(), "samples": 200, "seed": 0},
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["task"] == "regression" and body["class_names"] is None
    for prediction in body["predictions"]:
        assert prediction["std"] >= prediction["epistemic_std"] > 0
        assert math.isclose(prediction["std"] ** 2, prediction["epistemic_std"] ** 2 + prediction["aleatoric_std"] ** 2, rel_tol=1e-9)
        interval = prediction["interval_95"]
        assert interval["lower"] < prediction["mean"] < interval["upper"]
    means = [p["mean"] for p in body["predictions"]]
    # predictions are in the target's units (disease progression, ~25..346), not standardised
    assert 50 < sum(means) / len(means) < 300
    coverage = sum(p["interval_95"]["lower"] <= y <= p["interval_95"]["upper"]
                   for p, y in zip(body["predictions"], data.target[:20]))
    assert coverage >= 14


def test_evaluation_of_a_classifier(client: TestClient, trained_digits) -> None:
    response = client.get(f"/v1/runs/{trained_digits['id']}/evaluation")
    assert response.status_code == 200, response.text
    report = response.json()
    assert report["rows"] == "validation" and report["n"] == 359 and report["samples"] == 100
    for side in ("mc", "deterministic"):
        metrics = report[side]
        assert 0.8 < metrics["accuracy"] <= 1 and 0 <= metrics["ece"] <= 1 and metrics["nll"] > 0
        assert 0 <= metrics["brier"] <= 2 and len(metrics["reliability"]) == 15
        assert sum(b["count"] for b in metrics["reliability"]) == report["n"]
    mc = report["mc"]
    assert 0.5 < mc["auroc_predictive_entropy"] <= 1 and 0.5 < mc["auroc_mutual_information"] <= 1
    histogram = mc["mutual_information_histogram"]
    assert sum(histogram["correct"]) + sum(histogram["wrong"]) == report["n"]


def test_evaluation_needs_a_succeeded_run(client: TestClient, digits) -> None:
    run = make_run(client, digits["id"], training={"epochs": 1, "seed": 4})
    assert_problem(client.get(f"/v1/runs/{run['id']}/evaluation"), 409)


def test_paper_regression_with_given_split_prior_lengthscale_and_heteroscedastic_head(client: TestClient, settings) -> None:
    dataset = make_dataset(client, "diabetes")
    rng = __import__("numpy").random.default_rng(0)
    order = rng.permutation(442).tolist()
    split = {"train_indices": order[:380], "test_indices": order[380:]}
    results = {}
    for name, model in {
        "paper": {"hidden_layers": [50], "dropout": 0.05, "input_dropout": 0.05, "tau": 0.0003, "prior_lengthscale": 0.01},
        "heteroscedastic": {"hidden_layers": [50], "dropout": 0.05, "input_dropout": 0.05, "heteroscedastic": True},
    }.items():
        run = client.post("/v1/runs", json={"dataset_id": dataset["id"], "model": model, "split": split,
                                            "training": {"epochs": 40, "batch_size": 32, "seed": 0, "validation_fraction": 0.2}}).json()
        train_in_process(client, settings, run)
        report = client.get(f"/v1/runs/{run['id']}/evaluation").json()
        assert report["rows"] == "test" and report["n"] == 62
        assert report["mc"]["rmse"] < 75 and math.isfinite(report["mc"]["log_likelihood"])
        assert 0.5 < report["mc"]["coverage_95"] <= 1
        results[name] = (run, report)
    run, _ = results["heteroscedastic"]
    from sklearn.datasets import load_diabetes

    data = load_diabetes().data[:30].tolist()
    predictions = client.post(f"/v1/runs/{run['id']}/predict", json={"inputs": data, "samples": 50, "seed": 0}).json()["predictions"]
    aleatoric = [p["aleatoric_std"] for p in predictions]
    assert max(aleatoric) > min(aleatoric) > 0  # learned per input, not one constant
    for p in predictions:
        assert math.isclose(p["std"] ** 2, p["epistemic_std"] ** 2 + p["aleatoric_std"] ** 2, rel_tol=1e-6)


@pytest.mark.parametrize(
    ("change", "loc"),
    [
        ({"split": {"train_indices": [0, 1, 500]}}, ["body", "split", "train_indices"]),
        ({"split": {"train_indices": [0, 1, 2], "test_indices": [2, 3]}}, ["body", "split", "test_indices"]),
        ({"split": {"train_indices": [0, 1, 1]}}, ["body", "split", "train_indices"]),
        ({"model": {"prior_lengthscale": 0.01}}, ["body", "model", "prior_lengthscale"]),
        ({"model": {"prior_lengthscale": 0.01, "tau": 1.0}, "training": {"weight_decay": 0.1}}, ["body", "training", "weight_decay"]),
    ],
)
def test_regression_spec_errors(client: TestClient, change: dict, loc: list) -> None:
    dataset = make_dataset(client, "diabetes", name="diabetes-errors")
    assert_problem(client.post("/v1/runs", json={"dataset_id": dataset["id"], **change}), 422, loc=loc)


def test_regression_options_refused_for_classification(client: TestClient, digits) -> None:
    body = {"dataset_id": digits["id"], "model": {"heteroscedastic": True}}
    assert_problem(client.post("/v1/runs", json=body), 422, loc=["body", "model", "heteroscedastic"])
