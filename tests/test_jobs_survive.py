"""Jobs that survive (real PostgreSQL, Redis and Celery worker processes): killed workers,
a flushed broker, a database outage, cancellation, and a killed embedded worker."""

from __future__ import annotations

import random
import shutil
import signal
import subprocess
import time
import uuid
from pathlib import Path

import httpx
import pytest
import redis
from fastapi.testclient import TestClient
from sqlalchemy import select

from service.db import session_scope
from service.runs.models import RunEventRow, RunWeightsRow
from tests.conftest import Process, start_worker, wait_for_run
from tests.factories import make_dataset

# Big enough to be killed mid-way (~0.1-0.4 s an epoch here, recorded about once a second),
# small enough for the suite.
SLOW_MODEL = {"hidden_layers": [256, 256], "dropout": 0.5}
SLOW_TRAINING = {"epochs": 40, "batch_size": 16, "seed": 1234, "validation_fraction": 0.2}


@pytest.fixture(scope="module")
def digits(client: TestClient) -> dict:
    return make_dataset(client, "digits")


def submit(client: TestClient, dataset_id: str, **overrides) -> dict:
    body = {"dataset_id": dataset_id, "model": SLOW_MODEL, "training": SLOW_TRAINING, **overrides}
    response = client.post("/v1/runs", json=body)
    assert response.status_code == 202, response.text
    return response.json()


def wait_for_epochs(client: TestClient, run_id: str, at_least: int, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        body = client.get(f"/v1/runs/{run_id}").json()
        if body["epochs_done"] >= at_least or body["status"] not in ("queued", "running"):
            return body
        assert time.monotonic() < deadline, f"run {run_id} did not reach epoch {at_least}: {body}"
        time.sleep(0.05)


def stored_weights(settings, run_id: str) -> bytes:
    with session_scope(settings.sqlalchemy_url) as session:
        row = session.scalar(select(RunWeightsRow).where(RunWeightsRow.run_id == uuid.UUID(run_id)))
        assert row is not None
        return row.weights


def status_events(settings, run_id: str) -> list[tuple[str, dict]]:
    with session_scope(settings.sqlalchemy_url) as session:
        rows = session.scalars(select(RunEventRow).where(RunEventRow.run_id == uuid.UUID(run_id), RunEventRow.kind == "status")
                               .order_by(RunEventRow.id))
        return [(row.status, row.data) for row in rows]


def test_sigkilled_workers_resume_bit_identical(client: TestClient, settings, digits, tmp_path: Path) -> None:
    worker = start_worker(settings, tmp_path / "worker-0.log")
    try:
        reference = submit(client, digits["id"])
        reference = wait_for_run(client, reference["id"], timeout=180)
        assert reference["status"] == "succeeded" and reference["attempts"] == 1

        run = submit(client, digits["id"])
        rng = random.Random(7)
        kill_at = sorted(rng.sample(range(2, SLOW_TRAINING["epochs"] - 2), 2))
        for i, epoch in enumerate(kill_at, start=1):
            # Epochs are recorded in batches (about one a second): kill only once the current
            # worker (claim number i) has recorded epochs of its own up to `epoch`.
            deadline = time.monotonic() + 120
            while (reached := client.get(f"/v1/runs/{run['id']}").json())["attempts"] < i or reached["epochs_done"] < epoch:
                assert time.monotonic() < deadline and reached["status"] in ("queued", "running"), reached
                time.sleep(0.02)
            assert reached["status"] == "running", reached
            worker.popen.send_signal(signal.SIGKILL)  # no warning, no cleanup, message unacked
            worker.stop()
            worker = start_worker(settings, tmp_path / f"worker-{i}.log")
        finished = wait_for_run(client, run["id"], timeout=180)
    finally:
        worker.stop()
    assert finished["status"] == "succeeded", finished
    assert finished["attempts"] >= 3  # claimed again after each kill
    history = client.get(f"/v1/runs/{run['id']}/metrics").json()["items"]
    assert [m["epoch"] for m in history] == list(range(1, SLOW_TRAINING["epochs"] + 1))
    reference_history = client.get(f"/v1/runs/{reference['id']}/metrics").json()["items"]
    assert [m["train_loss"] for m in history] == [m["train_loss"] for m in reference_history]
    assert stored_weights(settings, run["id"]) == stored_weights(settings, reference["id"])
    reasons = [data.get("reason", "") for status, data in status_events(settings, run["id"]) if status == "queued"]
    assert sum("lease expired" in reason for reason in reasons) == len(kill_at)


def test_flushed_broker_loses_no_run(client: TestClient, settings, digits, tmp_path: Path) -> None:
    quick = {"epochs": 3, "batch_size": 64, "seed": 5}
    worker = start_worker(settings, tmp_path / "worker.log")
    try:
        running = submit(client, digits["id"])
        wait_for_epochs(client, running["id"], 1)
        queued = [submit(client, digits["id"], training=quick) for _ in range(3)]
        redis.Redis.from_url(settings.broker_url).flushdb()  # every queued message is gone
        results = [wait_for_run(client, run["id"], timeout=180) for run in [running, *queued]]
    finally:
        worker.stop()
    assert [r["status"] for r in results] == ["succeeded"] * 4


@pytest.mark.skipif(shutil.which("pg_ctlcluster") is None, reason="needs pg_ctlcluster to stop PostgreSQL")
def test_postgres_outage_gives_503_and_the_run_finishes(client: TestClient, settings, digits, tmp_path: Path) -> None:
    version = sorted(p.name for p in Path("/etc/postgresql").iterdir())[0]
    worker = start_worker(settings, tmp_path / "worker.log")
    try:
        run = submit(client, digits["id"])
        wait_for_epochs(client, run["id"], 3)
        subprocess.run(["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", "stop", "-m", "fast"], check=True)
        try:
            time.sleep(1.0)
            for path in (f"/v1/runs/{run['id']}", "/v1/runs", "/readyz", f"/v1/runs/{run['id']}/metrics"):
                response = client.get(path)
                assert response.status_code == 503, (path, response.status_code, response.text)
                assert response.headers["content-type"].startswith("application/problem+json")
            time.sleep(3.0)
        finally:
            subprocess.run(["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", "start"], check=True)
        finished = wait_for_run(client, run["id"], timeout=180)
    finally:
        worker.stop()
    assert finished["status"] == "succeeded", finished
    history = client.get(f"/v1/runs/{run['id']}/metrics").json()["items"]
    assert [m["epoch"] for m in history] == list(range(1, SLOW_TRAINING["epochs"] + 1))


def test_cancel_queued_and_running_runs(client: TestClient, settings, digits, tmp_path: Path) -> None:
    queued = submit(client, digits["id"])
    response = client.post(f"/v1/runs/{queued['id']}/cancel")
    assert response.status_code == 200 and response.json()["status"] == "cancelled"
    again = client.post(f"/v1/runs/{queued['id']}/cancel")
    assert again.status_code == 409 and again.headers["content-type"].startswith("application/problem+json")

    worker = start_worker(settings, tmp_path / "worker.log")
    try:
        running = submit(client, digits["id"])
        wait_for_epochs(client, running["id"], 2)
        response = client.post(f"/v1/runs/{running['id']}/cancel")
        assert response.status_code == 202 and response.json()["cancel_requested"] is True
        finished = wait_for_run_status(client, running["id"], "cancelled")
    finally:
        worker.stop()
    assert 2 <= finished["epochs_done"] < SLOW_TRAINING["epochs"]
    history = client.get(f"/v1/runs/{running['id']}/metrics").json()["items"]
    assert len(history) == finished["epochs_done"]  # the metrics so far are kept
    assert client.post(f"/v1/runs/{running['id']}/predict", json={"inputs": [[0.0] * 64]}).status_code == 409
    assert client.get(f"/v1/runs/{queued['id']}").json()["status"] == "cancelled"  # never trained


def wait_for_run_status(client: TestClient, run_id: str, status: str, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while (body := client.get(f"/v1/runs/{run_id}").json())["status"] != status:
        assert body["status"] not in ("succeeded", "failed", "cancelled") or body["status"] == status, body
        assert time.monotonic() < deadline, body
        time.sleep(0.1)
    return body


def test_diverging_training_fails_without_retry(client: TestClient, settings, digits, worker: Process) -> None:
    run = submit(client, digits["id"], training={"epochs": 3, "learning_rate": 10.0, "optimizer": "sgd",
                                                 "momentum": 0.99, "seed": 0, "batch_size": 8})
    finished = wait_for_run(client, run["id"])
    assert finished["status"] == "failed" and "NaN or infinite" in finished["error"]
    assert finished["attempts"] == 1


def test_embedded_worker_killed_mid_run_finishes_after_restart(tmp_path: Path) -> None:
    from tests.test_end_to_end import _processes_with_env, _start_embedded, _wait_gone

    fast = {"MCDROP_LEASE_S": "3", "MCDROP_RECONCILE_INTERVAL_S": "1", "MCDROP_HEARTBEAT_INTERVAL_S": "0.5"}
    long_training = {**SLOW_TRAINING, "epochs": 100}  # still running after the first kill and resume
    process, base, data_dir = _start_embedded(tmp_path, extra_env=fast)
    try:
        with httpx.Client(base_url=base, timeout=30) as http:
            dataset = http.post("/v1/datasets", json={"name": "digits", "builtin": "digits"}).json()
            run = http.post("/v1/runs", json={"dataset_id": dataset["id"], "model": SLOW_MODEL, "training": long_training}).json()
            killed_at = wait_for_epochs(http, run["id"], 3)["epochs_done"]
            # 1. the worker alone is killed: `mcdrop up` starts another, which resumes the run
            workers = [pid for pid in _processes_with_env(data_dir) if pid != process.popen.pid]
            assert len(workers) == 1
            subprocess.run(["kill", "-9", str(workers[0])], check=True)
            # (epochs are recorded in batches, about one a second: wait for the new worker's own)
            deadline = time.monotonic() + 90
            while (reached := http.get(f"/v1/runs/{run['id']}").json())["attempts"] < 2 or reached["epochs_done"] <= killed_at:
                assert time.monotonic() < deadline and reached["status"] in ("queued", "running"), reached
                time.sleep(0.1)
        # 2. everything is killed mid-run (the worker follows its parent), then started again
        process.popen.send_signal(signal.SIGKILL)
        process.popen.wait()
        assert _wait_gone(data_dir, 30) == []
    finally:
        process.stop(signal.SIGTERM, timeout=40)
    restarted, base, _ = _start_embedded(tmp_path, data_dir=data_dir, log_name="up-2.log", extra_env=fast)
    try:
        with httpx.Client(base_url=base, timeout=30) as http:
            finished = wait_for_run(http, run["id"], timeout=180)
            history = http.get(f"/v1/runs/{run['id']}/metrics").json()["items"]
    finally:
        restarted.stop(signal.SIGTERM, timeout=40)
    assert finished["status"] == "succeeded", finished
    assert finished["attempts"] >= 3
    assert [m["epoch"] for m in history] == list(range(1, long_training["epochs"] + 1))


def test_sigkilled_worker_mid_sweep_resumes(client: TestClient, settings, tmp_path: Path) -> None:
    from tests.api.test_sweeps import sweep_body

    dataset = make_dataset(client, "diabetes", name="diabetes-survive")
    body = sweep_body(dataset["id"], training={"epochs": 400, "batch_size": 32, "seed": 0, "validation_fraction": 0.2})
    worker = start_worker(settings, tmp_path / "worker-0.log")
    try:
        sweep = client.post("/v1/sweeps", json=body).json()
        deadline = time.monotonic() + 120
        while client.get(f"/v1/sweeps/{sweep['id']}").json()["epochs_done"] < 100:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        worker.popen.send_signal(signal.SIGKILL)
        worker.stop()
        worker = start_worker(settings, tmp_path / "worker-1.log")
        done = wait_for_run(client, sweep["id"], timeout=300)
    finally:
        worker.stop()
    assert done["status"] == "succeeded", done
    assert done["attempts"] == 2
    assert "resumes in its search phase" in worker.output() or "resumes in its final phase" in worker.output()
    final = client.get(f"/v1/sweeps/{sweep['id']}").json()
    assert final["results"]["test"]["rmse"]["mean"] is not None
