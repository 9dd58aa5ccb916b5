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

    # No daemon renews the lease in-process: a long one keeps the test app's reconciler from
    # handing the sweep to another worker while a loaded machine trains slowly.
    settings = settings.model_copy(update={"lease_s": 300.0})
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


@pytest.fixture(scope="module")
def digits(client: TestClient) -> dict:
    return make_dataset(client, "digits", name="digits-sweeps")


def classification_body(dataset_id: str, **overrides) -> dict:
    return {
        "dataset_id": dataset_id,
        "model": {"hidden_layers": [64], "dropout": 0.0},
        "training": {"epochs": 12, "batch_size": 64, "learning_rate": 0.003, "seed": 0, "validation_fraction": 0.25},
        "grid": {"dropout": [0.0, 0.5]},
        "splits": {"folds": 3},
        "test_every_configuration": True,
        "search_samples": 20,
        "test_samples": 50,
        **overrides,
    }


def test_classification_sweep_reports_train_validation_and_test(client: TestClient, settings, digits) -> None:
    created = client.post("/v1/sweeps", json=classification_body(digits["id"]))
    assert created.status_code == 202, created.text
    sweep = created.json()
    assert sweep["spec"]["metric"] == "nll"  # the default for classification, recorded
    assert sweep["n_configurations"] == 2 and sweep["n_splits"] == 3 and sweep["epochs_total"] == 24
    run_in_process(settings, sweep["id"])
    done = client.get(f"/v1/sweeps/{sweep['id']}").json()
    assert done["status"] == "succeeded", done
    results = done["results"]
    assert results["metric"] == "nll"
    ranking = results["ranking"]
    means = [entry["validation"]["nll"]["mean"] for entry in ranking]
    assert means == sorted(means)  # lowest NLL first
    assert results["best"] == ranking[0]["configuration"]
    by_rate = {entry["configuration"]["dropout"]: entry for entry in ranking}
    assert set(by_rate) == {0.0, 0.5}
    for entry in ranking:
        assert len(entry["per_split"]) == 3
        for part in ("validation", "train", "test"):
            assert 0.7 < entry[part]["accuracy"]["mean"] <= 1.0, (part, entry[part])
            assert 0 < entry[part]["nll"]["mean"] < 1.5 and entry[part]["nll"]["se"] > 0
            assert 0 <= entry[part]["ece"]["mean"] < 0.5
            assert entry[part]["deterministic_nll"]["mean"] > 0
        # The gap is validation minus train, split by split.
        gaps = [s["nll"] - s["train"]["nll"] for s in entry["per_split"]]
        assert entry["gap"]["nll"]["mean"] == pytest.approx(float(np.mean(gaps)))
        assert entry["train"]["accuracy"]["mean"] >= entry["validation"]["accuracy"]["mean"] - 0.02
    # Without dropout every MC sample is the deterministic net: the same predictions.
    no_dropout = by_rate[0.0]["validation"]
    assert no_dropout["nll"]["mean"] == pytest.approx(no_dropout["deterministic_nll"]["mean"], rel=1e-6)
    assert no_dropout["accuracy"]["mean"] == no_dropout["deterministic_accuracy"]["mean"]
    with_dropout = by_rate[0.5]["validation"]
    assert with_dropout["nll"]["mean"] != pytest.approx(with_dropout["deterministic_nll"]["mean"], rel=1e-3)
    assert with_dropout["auroc_mutual_information"]["mean"] > 0.6  # disagreement between masks flags errors
    # The best configuration per split, retrained on all its training rows and tested.
    test = results["test"]
    assert test["samples"] == 50 and [p["split"] for p in test["per_split"]] == [0, 1, 2]
    assert 0.8 < test["accuracy"]["mean"] <= 1.0 and 0 < test["nll"]["mean"] < 1.0
    for name in ("brier", "ece", "deterministic_accuracy", "deterministic_nll", "deterministic_ece"):
        assert test[name]["mean"] is not None, name
    assert all(p["configuration"] in (0, 1) for p in test["per_split"])


def test_classification_sweep_ranked_by_accuracy_without_retraining(client: TestClient, settings) -> None:
    iris = make_dataset(client, "iris", name="iris-sweeps")
    body = classification_body(iris["id"], metric="accuracy", retrain_best=False, test_every_configuration=False,
                               grid={"dropout": [0.1, 0.3], "weight_decay": [0.0, 0.01]},
                               training={"epochs": 30, "batch_size": 16, "learning_rate": 0.01, "seed": 1,
                                         "validation_fraction": 0.2})
    sweep = client.post("/v1/sweeps", json=body).json()
    assert sweep["epochs_total"] == 30 and sweep["n_configurations"] == 4
    run_in_process(settings, sweep["id"])
    done = client.get(f"/v1/sweeps/{sweep['id']}").json()
    assert done["status"] == "succeeded", done
    results = done["results"]
    accuracies = [entry["validation"]["accuracy"]["mean"] for entry in results["ranking"]]
    assert accuracies == sorted(accuracies, reverse=True) and accuracies[0] > 0.85
    assert "test" not in results and all("test" not in entry for entry in results["ranking"])
    assert all("train" in entry and "gap" in entry for entry in results["ranking"])


def test_regression_sweep_can_score_every_configuration_on_the_test_rows(client: TestClient, settings, diabetes) -> None:
    body = sweep_body(diabetes["id"], grid={"dropout": [0.01, 0.1]}, retrain_best=False, test_every_configuration=True)
    sweep = client.post("/v1/sweeps", json=body).json()
    assert sweep["epochs_total"] == 15
    run_in_process(settings, sweep["id"])
    done = client.get(f"/v1/sweeps/{sweep['id']}").json()
    assert done["status"] == "succeeded", done
    for entry in done["results"]["ranking"]:
        assert 40 < entry["test"]["rmse"]["mean"] < 90
        assert entry["test"]["log_likelihood"]["mean"] < -4
        assert "train" not in entry  # regression reports validation (and test) rows only
        assert all("test" in split for split in entry["per_split"])


@pytest.mark.parametrize(
    ("change", "loc"),
    [
        ({"model": {"hidden_layers": [8], "dropout": 0.1, "tau": 1.0}}, ["body", "model", "tau"]),
        ({"model": {"hidden_layers": [8], "dropout": 0.1, "heteroscedastic": True}}, ["body", "model", "heteroscedastic"]),
        ({"grid": {"prior_lengthscale": [0.01]}}, ["body", "grid", "prior_lengthscale"]),
        ({"metric": "rmse"}, ["body", "metric"]),
        ({"metric": "log_likelihood"}, ["body", "metric"]),
        ({"metric": "auroc"}, ["body", "metric"]),
        ({"training": {"epochs": 5, "optimizer": "sgd"}}, ["body", "training", "optimizer"]),
    ],
)
def test_classification_sweep_validation(client: TestClient, digits, change: dict, loc: list) -> None:
    assert_problem(client.post("/v1/sweeps", json=classification_body(digits["id"], **change)), 422, loc=loc)


def test_regression_sweeps_rank_by_regression_metrics(client: TestClient, diabetes) -> None:
    assert_problem(client.post("/v1/sweeps", json=sweep_body(diabetes["id"], metric="nll")), 422, loc=["body", "metric"])
    created = client.post("/v1/sweeps", json={k: v for k, v in sweep_body(diabetes["id"]).items() if k != "metric"})
    assert created.status_code == 202 and created.json()["spec"]["metric"] == "log_likelihood"
    client.post(f"/v1/sweeps/{created.json()['id']}/cancel")


def test_unknown_sweep(client: TestClient) -> None:
    assert_problem(client.get(f"/v1/sweeps/{uuid.uuid4()}"), 404)


def test_a_classification_sweep_resumes_from_its_checkpoint_identically() -> None:
    """The worker's checkpoint round trip (torch.save / weights_only load) mid-search and mid-final."""
    from service.ml.data import load_builtin
    from service.ml.training import TrainingCancelled
    from service.runs import checkpoints
    from service.sweeps.execution import Checkpoint, run_sweep
    from service.sweeps.schemas import SweepCreate

    dataset = load_builtin("iris")
    spec = SweepCreate.model_validate(classification_body(
        str(uuid.uuid4()), metric="nll", grid={"dropout": [0.0, 0.3]}, model={"hidden_layers": [8], "dropout": 0.0},
        training={"epochs": 10, "batch_size": 16, "learning_rate": 0.01, "seed": 3, "validation_fraction": 0.2}))
    expected = run_sweep(dataset, spec, checkpoint=None, save=lambda checkpoint, epochs: None)
    for stop_after in (3, 14):  # saves: during the search stack, then during the final stack
        saved: list[bytes] = []

        def save(checkpoint: Checkpoint, epochs_done: int) -> None:
            saved.append(checkpoints.serialize(checkpoint.to_dict()))

        with pytest.raises(TrainingCancelled):
            run_sweep(dataset, spec, checkpoint=None, save=save, should_stop=lambda: len(saved) >= stop_after)
        resumed = Checkpoint.from_dict(checkpoints.deserialize(saved[-1]))
        assert resumed.phase == ("search" if stop_after == 3 else "final")
        assert run_sweep(dataset, spec, checkpoint=resumed, save=lambda checkpoint, epochs: None) == expected
