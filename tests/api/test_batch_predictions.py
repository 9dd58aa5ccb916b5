"""Batch prediction jobs: validation, tenants, the job's lifecycle (resume, cancel), and the
whole path with a real worker — progress over SSE, CSV and Parquet results whose uncertainty
columns obey their invariants and equal the online endpoint's answers for the same seed."""

from __future__ import annotations

import csv
import io
import json
import math
import signal
import time
import uuid
from statistics import NormalDist

import numpy as np
import pyarrow.parquet as pq
import pytest
from fastapi.testclient import TestClient

from service.batch_predictions.execution import block_seed
from tests.api.test_datasets import assert_problem
from tests.conftest import Process, make_key, start_worker
from tests.factories import make_dataset, make_run

SMALL_MODEL = {"hidden_layers": [32], "dropout": 0.3}


@pytest.fixture(scope="module")
def digits(client: TestClient) -> dict:
    return make_dataset(client, "digits", name="digits-batch")


@pytest.fixture(scope="module")
def digits_model(client: TestClient, settings, digits) -> dict:
    run = make_run(client, digits["id"], model=SMALL_MODEL, training={"epochs": 5, "batch_size": 64, "seed": 2})
    return trained(client, settings, run)


@pytest.fixture(scope="module")
def diabetes_model(client: TestClient, settings) -> dict:
    dataset = make_dataset(client, "diabetes", name="diabetes-batch")
    run = make_run(client, dataset["id"], model={"hidden_layers": [16], "dropout": 0.1},
                   training={"epochs": 10, "batch_size": 32, "seed": 1})
    return trained(client, settings, run)


def run_in_process(settings, job_id: str, should_stop=lambda: False) -> None:
    """The worker's job logic in this process, with a daemon renewing the lease."""
    from workers import runners
    from workers.daemon import WorkerDaemon

    daemon = WorkerDaemon(settings, ["cpu"], "cpu").start()
    try:
        runners.train_run(uuid.UUID(job_id), settings, daemon, should_stop=should_stop)
    finally:
        daemon.stop()


def trained(client: TestClient, settings, run: dict) -> dict:
    run_in_process(settings, run["id"])
    body = client.get(f"/v1/runs/{run['id']}").json()
    assert body["status"] == "succeeded", body
    return body


def submit(client: TestClient, **body) -> dict:
    response = client.post("/v1/batch-predictions", json=body)
    assert response.status_code == 202, response.text
    return response.json()


def upload(client: TestClient, content: bytes, headers: dict | None = None, **fields):
    return client.post("/v1/batch-predictions", data={k: str(v) for k, v in fields.items()},
                       files={"file": ("rows.csv", content, "text/csv")}, headers=headers)


def digits_csv(feature_names: list[str], count: int, *, order: list[int] | None = None) -> bytes:
    """The first ``count`` digits as a CSV: an id column, the features in ``order``, the target."""
    from sklearn.datasets import load_digits

    data = load_digits()
    order = order if order is not None else list(range(len(feature_names)))
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["id", *(feature_names[i] for i in order), "class"])
    for r in range(count):
        writer.writerow([f"img-{r}", *(repr(float(data.data[r, i])) for i in order), int(data.target[r])])
    return out.getvalue().encode()


def download(client: TestClient, job_id: str) -> tuple[list[dict], dict[str, list]]:
    """The results as CSV rows (dicts of strings) and as Parquet columns (lists)."""
    as_csv = client.get(f"/v1/batch-predictions/{job_id}/results?format=csv")
    assert as_csv.status_code == 200, as_csv.text
    assert as_csv.headers["content-type"].startswith("text/csv")
    assert as_csv.headers["content-disposition"] == f'attachment; filename="batch-prediction-{job_id}.csv"'
    as_parquet = client.get(f"/v1/batch-predictions/{job_id}/results", params={"format": "parquet"})
    assert as_parquet.status_code == 200, as_parquet.text
    assert as_parquet.headers["content-disposition"].endswith('.parquet"')
    table = pq.read_table(io.BytesIO(as_parquet.content))
    return list(csv.DictReader(io.StringIO(as_csv.text))), table.to_pydict()


def check_classification_invariants(rows: dict[str, list], class_names: list[str]) -> None:
    probabilities = np.array([rows[f"prob_{name}"] for name in class_names]).T
    assert np.allclose(probabilities.sum(axis=1), 1.0, atol=1e-9)
    assert ((probabilities >= 0) & (probabilities <= 1)).all()
    predictive, expected, mutual = (np.array(rows[k]) for k in ("predictive_entropy", "expected_entropy", "mutual_information"))
    assert (mutual >= 0).all() and (expected >= -1e-12).all() and (predictive + 1e-12 >= mutual).all()
    assert np.allclose(predictive, expected + mutual, atol=1e-9)
    assert (predictive <= math.log(len(class_names)) + 1e-9).all()
    ratio = np.array(rows["variation_ratio"])
    assert ((ratio >= 0) & (ratio <= 1 - 1 / len(class_names) + 1e-12)).all()
    assert [class_names[i] for i in probabilities.argmax(axis=1)] == rows["predicted_class"]


def sse_events(client: TestClient, job_id: str) -> list[dict]:
    """The job's events from GET /v1/runs/{id}/events, until the terminal one."""
    events = []
    with client.stream("GET", f"/v1/runs/{job_id}/events") as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data:"):
                events.append(json.loads(line.removeprefix("data:").strip()))
    return events


def test_a_batch_job_end_to_end_with_a_real_worker(
    client: TestClient, settings, worker: Process, tmp_path, digits, digits_model,
) -> None:
    seed, samples = 5, 20
    job = submit(client, run_id=digits_model["id"], dataset_id=digits["id"], samples=samples, seed=seed, chunk_rows=256)
    assert job["status"] == "queued" and job["rows_total"] == 1797 and job["rows_done"] == 0
    assert job["input"] == {"source": "dataset", "dataset_id": digits["id"], "filename": None, "rows": 1797}
    class_names = digits["class_names"]
    assert job["columns"] == ["row", "target", "predicted_class", *(f"prob_{c}" for c in class_names),
                              "predictive_entropy", "expected_entropy", "mutual_information", "variation_ratio"]
    # The same rows uploaded as a CSV: columns in another order, an id and the target carried.
    order = list(reversed(range(64)))
    uploaded = upload(client, digits_csv(digits["feature_names"], 100, order=order), run_id=digits_model["id"],
                      samples=samples, seed=seed, chunk_rows=64)
    assert uploaded.status_code == 202, uploaded.text
    upload_job = uploaded.json()
    assert upload_job["input"]["source"] == "upload" and upload_job["input"]["rows"] == 100
    assert upload_job["columns"][:3] == ["row", "id", "target"]

    # Progress like a run's: one event per stored chunk, then the terminal status.
    events = sse_events(client, job["id"])
    chunks = [e["data"] for e in events if e["kind"] == "epoch"]
    assert [c["chunk"] for c in chunks] == list(range(8))
    assert [c["rows_done"] for c in chunks] == [min(256 * (i + 1), 1797) for i in range(8)]
    assert all(c["rows_total"] == 1797 and c["epochs_total"] == 1797 for c in chunks)
    assert [e["status"] for e in events if e["kind"] == "status"] == ["queued", "running", "succeeded"]
    finished = client.get(f"/v1/batch-predictions/{job['id']}").json()
    assert finished["status"] == "succeeded" and finished["rows_done"] == 1797 and finished["progress"] == 1.0
    assert finished["worker_device"] == "cpu" and finished["attempts"] == 1

    csv_rows, rows = download(client, job["id"])
    assert list(rows) == job["columns"] and list(csv_rows[0]) == job["columns"]
    assert rows["row"] == list(range(1797)) and len(csv_rows) == 1797
    from sklearn.datasets import load_digits

    assert rows["target"] == [class_names[t] for t in load_digits().target]
    for name in job["columns"][3:]:  # CSV and Parquet carry the same float64 values
        assert [float(r[name]) for r in csv_rows] == rows[name]
    check_classification_invariants(rows, class_names)
    accuracy = np.mean(np.array(rows["predicted_class"]) == np.array(rows["target"]))
    assert accuracy > 0.6  # chance is 0.1

    # The online endpoint's answer: rows 192..255 are block 3, sampled with block_seed(seed, 3), so
    # the same dropout masks; the worker's multi-threaded float32 matmuls may round differently
    # from the API's single thread (the in-process regression test below checks bit equality).
    block = load_digits().data[192:256].tolist()
    online = client.post(f"/v1/runs/{digits_model['id']}/predict",
                         json={"inputs": block, "samples": samples, "seed": block_seed(seed, 3)})
    assert online.status_code == 200, online.text
    predictions = online.json()["predictions"]
    batch_probabilities = np.array([[rows[f"prob_{c}"][192 + i] for c in class_names] for i in range(64)])
    online_probabilities = np.array([p["probabilities"] for p in predictions])
    assert np.allclose(batch_probabilities, online_probabilities, rtol=1e-4, atol=1e-6)
    for name in ("predictive_entropy", "expected_entropy", "mutual_information"):
        assert np.allclose(rows[name][192:256], [p[name] for p in predictions], rtol=1e-4, atol=1e-6)
    other_seed = client.post(f"/v1/runs/{digits_model['id']}/predict",
                             json={"inputs": block, "samples": samples, "seed": block_seed(seed, 4)}).json()["predictions"]
    assert not np.allclose(batch_probabilities, [p["probabilities"] for p in other_seed], rtol=1e-4, atol=1e-6)

    # The uploaded rows: the same numbers (neither the chunk size, the column order nor the
    # rows after them matter: the 100 rows end inside block 1).
    sse_events(client, upload_job["id"])
    _, uploaded_rows = download(client, upload_job["id"])
    assert uploaded_rows["id"] == [f"img-{r}" for r in range(100)]
    assert uploaded_rows["target"] == rows["target"][:100]
    for name in job["columns"][2:]:
        assert uploaded_rows[name] == rows[name][:100], name
    assert "mcdrop.batch_predictions.run" in worker.output()

    # SIGKILL the worker in the middle of a job: another one resumes from the stored chunks.
    body = {"run_id": digits_model["id"], "dataset_id": digits["id"], "samples": 300, "seed": 8}
    job = submit(client, **body, chunk_rows=64)
    deadline = time.monotonic() + 60
    while (progress := client.get(f"/v1/batch-predictions/{job['id']}").json())["rows_done"] < 128:
        assert progress["status"] in ("queued", "running") and time.monotonic() < deadline, progress
        time.sleep(0.02)
    worker.popen.send_signal(signal.SIGKILL)  # no warning, no cleanup, its message unacknowledged
    worker.popen.wait()
    killed_at = client.get(f"/v1/batch-predictions/{job['id']}").json()
    assert killed_at["status"] == "running" and killed_at["rows_done"] < 1797, killed_at
    replacement = start_worker(settings, tmp_path / "replacement.log")
    try:
        events = sse_events(client, job["id"])  # the lease expires, the reconciler hands it on
        straight = submit(client, **body, chunk_rows=1024)
        sse_events(client, straight["id"])
    finally:
        replacement.stop()
    done = client.get(f"/v1/batch-predictions/{job['id']}").json()
    assert done["status"] == "succeeded" and done["attempts"] == 2, done
    stored = [e["data"]["chunk"] for e in events if e["kind"] == "epoch"]
    assert stored == list(range(29))  # each chunk once: those stored before the kill were kept
    assert any("lease expired" in e["data"].get("reason", "") for e in events if e["kind"] == "status")
    assert f"batch prediction {job['id']} resumes after" in replacement.output()
    assert download(client, job["id"])[1] == download(client, straight["id"])[1]


def test_regression_columns_interval_level_and_the_online_endpoint(client: TestClient, settings, diabetes_model) -> None:
    dataset_id = diabetes_model["dataset_id"]
    job = submit(client, run_id=diabetes_model["id"], dataset_id=dataset_id, samples=50, seed=11, interval_level=0.9)
    assert job["interval_level"] == 0.9 and job["task"] == "regression"
    assert job["columns"] == ["row", "target", "mean", "std", "epistemic_std", "aleatoric_std", "lower", "upper"]
    run_in_process(settings, job["id"])
    assert client.get(f"/v1/batch-predictions/{job['id']}").json()["status"] == "succeeded"
    _, rows = download(client, job["id"])
    mean, std, lower, upper = (np.array(rows[k]) for k in ("mean", "std", "lower", "upper"))
    assert len(mean) == 442 and (std > 0).all() and (lower <= mean).all() and (mean <= upper).all()
    z = NormalDist().inv_cdf(0.95)
    assert np.allclose(upper - mean, z * std, rtol=1e-12) and np.allclose(mean - lower, z * std, rtol=1e-12)
    assert np.allclose(np.array(rows["std"]) ** 2,
                       np.array(rows["epistemic_std"]) ** 2 + np.array(rows["aleatoric_std"]) ** 2)
    from sklearn.datasets import load_diabetes

    data = load_diabetes()
    assert np.allclose(rows["target"], data.target)
    online = client.post(f"/v1/runs/{diabetes_model['id']}/predict",
                         json={"inputs": data.data[64:128].astype(np.float32).tolist(), "samples": 50, "seed": block_seed(11, 1)})
    assert online.status_code == 200, online.text
    for i, prediction in enumerate(online.json()["predictions"]):
        assert rows["mean"][64 + i] == prediction["mean"] and rows["std"][64 + i] == prediction["std"]


def test_a_stopped_job_resumes_without_redoing_chunks(client: TestClient, settings, digits, digits_model) -> None:
    body = {"run_id": digits_model["id"], "dataset_id": digits["id"], "samples": 10, "seed": 3}
    interrupted = submit(client, **body, chunk_rows=128)
    calls = []

    def stop_after_three_chunks() -> bool:  # asked before each chunk: the worker is shutting down
        calls.append(1)
        return len(calls) > 3

    run_in_process(settings, interrupted["id"], should_stop=stop_after_three_chunks)
    halfway = client.get(f"/v1/batch-predictions/{interrupted['id']}").json()
    assert halfway["status"] == "queued" and halfway["rows_done"] == 384
    run_in_process(settings, interrupted["id"])
    done = client.get(f"/v1/batch-predictions/{interrupted['id']}").json()
    assert done["status"] == "succeeded" and done["attempts"] == 2 and done["rows_done"] == 1797
    events = client.get(f"/v1/runs/{interrupted['id']}/events").text
    stored = [json.loads(line[5:])["data"]["chunk"] for line in events.splitlines()
              if line.startswith("data:") and '"kind":"epoch"' in line]
    assert stored == list(range(15))  # each chunk once: the first three were not predicted again

    straight = submit(client, **body, chunk_rows=1024)
    run_in_process(settings, straight["id"])
    assert download(client, interrupted["id"])[1] == download(client, straight["id"])[1]


def test_cancel_and_results_before_success(client: TestClient, digits, digits_model) -> None:
    body = {"run_id": digits_model["id"], "dataset_id": digits["id"], "samples": 10}
    key = {"Idempotency-Key": f"batch-{uuid.uuid4()}"}
    first = client.post("/v1/batch-predictions", json=body, headers=key)
    replay = client.post("/v1/batch-predictions", json=body, headers=key)
    assert (first.status_code, replay.status_code) == (202, 200) and replay.json()["id"] == first.json()["id"]
    job = first.json()
    assert isinstance(job["seed"], int)  # chosen by the service and recorded
    assert_problem(client.get(f"/v1/batch-predictions/{job['id']}/results"), 409)
    cancelled = client.post(f"/v1/batch-predictions/{job['id']}/cancel")
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    assert_problem(client.post(f"/v1/batch-predictions/{job['id']}/cancel"), 409)
    assert_problem(client.get(f"/v1/batch-predictions/{job['id']}/results?format=parquet"), 409)
    assert_problem(client.get(f"/v1/batch-predictions/{job['id']}/results?format=xml"), 422, loc=["query", "format"])
    listed = client.get("/v1/batch-predictions", params={"status": "cancelled"}).json()["items"]
    assert job["id"] in [item["id"] for item in listed]
    assert job["id"] not in [item["id"] for item in client.get("/v1/runs").json()["items"]]  # runs list training only
    by_model = client.get("/v1/batch-predictions", params={"model_run_id": str(uuid.uuid4())}).json()["items"]
    assert by_model == []


def test_another_tenant_sees_nothing(client: TestClient, settings, digits, digits_model) -> None:
    job = submit(client, run_id=digits_model["id"], dataset_id=digits["id"], samples=10)
    other = {"Authorization": f"Bearer {make_key(settings, 'batch-other')}"}
    for method, path in [("GET", ""), ("POST", "/cancel"), ("GET", "/results"), ("GET", "/results?format=parquet")]:
        assert_problem(client.request(method, f"/v1/batch-predictions/{job['id']}{path}", headers=other), 404)
    assert_problem(client.get(f"/v1/runs/{job['id']}/events", headers=other), 404)
    assert client.get("/v1/batch-predictions", headers=other).json()["items"] == []
    stolen = client.post("/v1/batch-predictions", headers=other,
                         json={"run_id": digits_model["id"], "dataset_id": digits["id"]})
    assert_problem(stolen, 422, loc=["body", "run_id"])
    assert_problem(upload(client, digits_csv(digits["feature_names"], 3), headers=other, run_id=digits_model["id"]),
                   422, loc=["body", "run_id"])
    client.post(f"/v1/batch-predictions/{job['id']}/cancel")


def test_a_registered_model_by_name_and_version(client: TestClient, digits, digits_model) -> None:
    registered = client.post("/v1/models", json={"name": "batch-digits", "run_id": digits_model["id"]})
    assert registered.status_code == 201, registered.text
    version = registered.json()["version"]
    job = submit(client, model={"name": "batch-digits", "version": version}, dataset_id=digits["id"], samples=5)
    assert job["model"] == {"run_id": digits_model["id"], "name": "batch-digits", "alias": None, "version": version}
    client.post(f"/v1/batch-predictions/{job['id']}/cancel")
    assert_problem(client.post("/v1/batch-predictions", json={"model": {"name": "no-such-model"}, "dataset_id": digits["id"]}),
                   422, loc=["body", "model"])
    form = upload(client, digits_csv(digits["feature_names"], 3), model_name="batch-digits", model_version=version)
    assert form.status_code == 202, form.text
    client.post(f"/v1/batch-predictions/{form.json()['id']}/cancel")
    assert_problem(upload(client, b"a\n1\n", model_name="batch-digits", model_version="x"), 422, loc=["body", "model_version"])


@pytest.mark.parametrize(
    ("change", "status", "loc"),
    [
        ({"run_id": None}, 422, ["body"]),
        ({"model": {"name": "m"}}, 422, ["body"]),
        ({"run_id": str(uuid.UUID(int=5))}, 422, ["body", "run_id"]),
        ({"dataset_id": str(uuid.UUID(int=5))}, 422, ["body", "dataset_id"]),
        ({"dataset_id": "nope"}, 422, ["body", "dataset_id"]),
        ({"samples": 0}, 422, ["body", "samples"]),
        ({"samples": 10_001}, 422, ["body", "samples"]),
        ({"chunk_rows": 100}, 422, ["body", "chunk_rows"]),
        ({"interval_level": 0.9}, 422, ["body", "interval_level"]),
        ({"interval_level": 1.0}, 422, ["body", "interval_level"]),
        ({"seed": -1}, 422, ["body", "seed"]),
        ({"device": "tpu"}, 422, ["body", "device"]),
        ({"callback_url": "ftp://example.org"}, 422, ["body", "callback_url"]),
        ({"bogus": 1}, 422, ["body", "bogus"]),
    ],
)
def test_bad_json_bodies(client: TestClient, digits, digits_model, change: dict, status: int, loc: list) -> None:
    body = {"run_id": digits_model["id"], "dataset_id": digits["id"], **change}
    assert_problem(client.post("/v1/batch-predictions", json=body), status, loc=loc)


def test_models_that_cannot_predict_and_datasets_that_do_not_fit(client: TestClient, digits, digits_model) -> None:
    queued = make_run(client, digits["id"], training={"epochs": 1, "seed": 0})
    assert_problem(client.post("/v1/batch-predictions", json={"run_id": queued["id"], "dataset_id": digits["id"]}), 409)
    client.post(f"/v1/runs/{queued['id']}/cancel")
    iris = make_dataset(client, "iris", name="iris-batch")
    wrong = assert_problem(client.post("/v1/batch-predictions", json={"run_id": digits_model["id"], "dataset_id": iris["id"]}),
                           422, loc=["body", "dataset_id"])
    assert "pixel_0_0" in wrong["detail"]
    not_json = client.post("/v1/batch-predictions", content=b"run_id=1", headers={"content-type": "text/plain"})
    assert_problem(not_json, 422, loc=["header", "content-type"])
    assert_problem(client.post("/v1/batch-predictions", content=b"{", headers={"content-type": "application/json"}), 422)


def test_bad_uploads(client: TestClient, digits, digits_model) -> None:
    names = digits["feature_names"]
    run_id = digits_model["id"]
    good = digits_csv(names, 3).decode().splitlines()
    header, first = good[0].split(","), good[1].split(",")

    def with_header(columns: list[str], *lines: list[str]) -> bytes:
        return "\n".join(",".join(line) for line in [columns, *lines]).encode()

    missing = with_header(header[:-2] + header[-1:], first[:-2] + first[-1:])  # no pixel_7_7
    body = assert_problem(upload(client, missing, run_id=run_id), 422, loc=["body", "file", "header"])
    assert "pixel_7_7" in body["errors"][0]["msg"]
    assert_problem(upload(client, with_header([*header, "zzz"], [*first, "1"]), run_id=run_id), 422,
                   loc=["body", "file", "column", "zzz"])
    bad_cell = [first[0], "oops", *first[2:]]
    assert_problem(upload(client, with_header(header, bad_cell), run_id=run_id), 422,
                   loc=["body", "file", "line", 2, "column", header[1]])
    assert_problem(upload(client, with_header(header, first[:-1]), run_id=run_id), 422, loc=["body", "file", "line", 2])
    assert_problem(upload(client, with_header(header), run_id=run_id), 422, loc=["body", "file"])
    assert_problem(upload(client, b"\xff\xfe", run_id=run_id), 422, loc=["body", "file"])
    assert_problem(upload(client, with_header(header, first), run_id=run_id, id_column="nope"), 422, loc=["body", "id_column"])
    assert_problem(upload(client, with_header(header, first), run_id=run_id, bogus=1), 422, loc=["body", "bogus"])
    assert_problem(upload(client, with_header(header, first), run_id=run_id, samples="many"), 422, loc=["body", "samples"])
    assert_problem(client.post("/v1/batch-predictions", data={"run_id": run_id}, files={"other": ("x", b"1")}), 422,
                   loc=["body", "file"])
    ok = upload(client, with_header(header, first), run_id=run_id, samples=3)
    assert ok.status_code == 202, ok.text
    client.post(f"/v1/batch-predictions/{ok.json()['id']}/cancel")
