"""The typed client on the model registry, the KServe V2 routes and batch prediction jobs."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service.batch_predictions.schemas import BatchPredictionRead
from service.client import ApiError, McdropClient
from service.config import Settings
from service.datasets.schemas import DatasetRead
from service.registry.schemas import AcquireResponse, ModelVersionRead
from service.runs.schemas import RunRead
from tests.client.test_client import DIGIT_ZERO

STRIPES = ([16.0] * 8 + [0.0] * 8) * 4  # no digit
MODEL = "client-digits"


@pytest.fixture(scope="module")
def registered(mcdrop: McdropClient, trained: RunRead) -> ModelVersionRead:
    version = mcdrop.register_model(MODEL, trained.id)
    assert mcdrop.set_alias(MODEL, "production", version.version).version == version.version
    return version


def test_registry_versions_aliases_and_gates(mcdrop: McdropClient, trained: RunRead, registered) -> None:
    assert isinstance(registered, ModelVersionRead) and registered.run_id == trained.id and registered.version == 1
    model = mcdrop.get_model(MODEL)
    assert model.latest_version == 1 and [(a.alias, a.version) for a in model.aliases] == [("production", 1)]
    assert MODEL in [m.name for m in mcdrop.iter_models(page_size=1)]
    assert [v.version for v in mcdrop.iter_model_versions(MODEL, page_size=1)] == [1]
    assert mcdrop.list_model_versions(MODEL).items[0].aliases == ["production"]

    gated = mcdrop.set_alias_gates(MODEL, "staging", [{"metric": "mc.accuracy", "op": ">=", "value": 1.5},
                                                      {"metric": "mc.ece", "op": "<=", "value": 1.0}])
    assert gated.version is None and len(gated.gates) == 2
    with pytest.raises(ApiError) as refused:
        mcdrop.set_alias(MODEL, "staging", 1)
    assert refused.value.status == 409 and [e["metric"] for e in refused.value.errors] == ["mc.accuracy"]
    assert "mc.accuracy" in str(refused.value)
    mcdrop.delete_alias(MODEL, "staging")
    assert [a.alias for a in mcdrop.get_model(MODEL).aliases] == ["production"]
    with pytest.raises(ApiError) as missing:
        mcdrop.get_model("no-such-model")
    assert missing.value.status == 404


def test_predict_and_acquire_by_model_name(mcdrop: McdropClient, trained: RunRead, registered) -> None:
    by_run = mcdrop.predict(trained.id, [DIGIT_ZERO], samples=40, seed=3)
    assert mcdrop.predict_model(MODEL, [DIGIT_ZERO], samples=40, seed=3) == by_run  # production is version 1
    assert mcdrop.predict_model(MODEL, [DIGIT_ZERO], version=1, samples=40, seed=3) == by_run
    assert mcdrop.predict_model(MODEL, [DIGIT_ZERO], alias="production", samples=40, seed=3) == by_run

    acquired = mcdrop.acquire(MODEL, inputs=[DIGIT_ZERO, STRIPES, DIGIT_ZERO], k=2, strategy="bald", samples=40, seed=1)
    assert isinstance(acquired, AcquireResponse) and acquired.pool_size == 3 and len(acquired.items) == 2
    assert acquired.items[0].score >= acquired.items[1].score
    assert mcdrop.acquire(MODEL, inputs=[DIGIT_ZERO, STRIPES, DIGIT_ZERO], k=2, samples=40, seed=1) == acquired


def test_open_inference_protocol(mcdrop: McdropClient, registered) -> None:
    assert mcdrop.v2_live() == {"live": True}
    assert mcdrop.v2_ready()["ready"] is True
    assert mcdrop.v2_server_metadata()["name"] == "mcdrop"
    metadata = mcdrop.v2_model_metadata(MODEL)
    assert metadata["name"] == MODEL and metadata["inputs"][0]["shape"] == [-1, 64]
    assert mcdrop.v2_model_metadata(MODEL, version=1)["inputs"] == metadata["inputs"]
    assert mcdrop.v2_model_ready(MODEL)["ready"] is True
    assert mcdrop.v2_model_ready(MODEL, version=1)["ready"] is True

    inferred = mcdrop.v2_infer(MODEL, [DIGIT_ZERO, STRIPES], samples=30, seed=5, request_id="r-1")
    outputs = {output["name"]: output for output in inferred["outputs"]}
    assert inferred["id"] == "r-1" and outputs["probabilities"]["shape"] == [2, 10]
    assert {"predictive_entropy", "mutual_information", "predicted_class"} <= set(outputs)
    same = mcdrop.v2_infer(MODEL, [DIGIT_ZERO, STRIPES], version=1, samples=30, seed=5, outputs=["mutual_information"])
    assert [output["name"] for output in same["outputs"]] == ["mutual_information"]
    assert same["outputs"][0]["data"] == outputs["mutual_information"]["data"]

    with pytest.raises(ApiError) as unknown:
        mcdrop.v2_model_metadata("no-such-model")
    assert unknown.value.status == 404 and "no-such-model" in unknown.value.detail  # from {"error": ...}


def test_batch_predictions(mcdrop: McdropClient, settings: Settings, trained: RunRead, digits: DatasetRead,
                           tmp_path: Path, cancel_later) -> None:
    from workers import runners
    from workers.daemon import WorkerDaemon

    job = mcdrop.create_batch_prediction({"run_id": str(trained.id), "dataset_id": str(digits.id), "samples": 5,
                                          "seed": 1, "chunk_rows": 512})
    cancel_later.append(job.id)
    assert isinstance(job, BatchPredictionRead) and job.status == "queued" and job.rows_total == digits.n_rows
    daemon = WorkerDaemon(settings, ["cpu"], "cpu").start()
    try:
        runners.train_run(job.id, settings, daemon)  # what a worker does with the queued job
    finally:
        daemon.stop()
    done = mcdrop.wait_for_batch_prediction(job.id, timeout=5)
    assert done.status == "succeeded" and done.rows_done == digits.n_rows

    table = list(csv.reader(io.StringIO(mcdrop.download_batch_prediction(job.id).decode())))
    assert table[0] == done.columns and len(table) == 1 + digits.n_rows
    parquet = tmp_path / "results.parquet"
    assert mcdrop.download_batch_prediction(job.id, format="parquet", to=parquet) is None
    assert parquet.read_bytes()[:4] == b"PAR1"

    rows = ",".join(digits.feature_names) + "\n" + ",".join(map(str, DIGIT_ZERO)) + "\n"
    uploaded = mcdrop.upload_batch_prediction(rows.encode(), model_name=MODEL, model_alias="production", samples=5)
    cancel_later.append(uploaded.id)
    assert uploaded.input.source == "upload" and uploaded.input.rows == 1 and uploaded.model.name == MODEL
    listed = [j.id for j in mcdrop.iter_batch_predictions(model_run_id=trained.id, page_size=1)]
    assert listed[:2] == [uploaded.id, job.id]
    assert mcdrop.get_batch_prediction(uploaded.id).status == "queued"
    assert mcdrop.cancel_batch_prediction(uploaded.id).status == "cancelled"
    with pytest.raises(ApiError) as unfinished:
        mcdrop.download_batch_prediction(uploaded.id)
    assert unfinished.value.status == 409


def test_cancel_later_also_cancels_batch_jobs(mcdrop: McdropClient, trained: RunRead, digits: DatasetRead) -> None:
    """A batch job is a run of kind "predict": POST /v1/runs/{id}/cancel cancels it too (what
    the cancel_later fixture relies on)."""
    job = mcdrop.create_batch_prediction({"run_id": str(trained.id), "dataset_id": str(digits.id), "samples": 2})
    assert mcdrop.cancel_run(job.id).status == "cancelled"
    assert mcdrop.get_batch_prediction(job.id).status == "cancelled"
