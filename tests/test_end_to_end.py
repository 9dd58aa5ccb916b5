"""The whole path with real processes: HTTP -> database row -> Celery -> worker trains ->
weights in the database -> MC dropout prediction.

1. PostgreSQL + Redis + a real Celery worker process (the API in-process).
2. Embedded mode started the way `make run` starts it (`mcdrop up`): SQLite + the filesystem
   broker, API and worker as real processes; then stopped by SIGTERM and by killing the parent.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from service import tuning
from tests.conftest import Process, free_port, wait_for_run, wait_until_ready
from tests.factories import TEXTBOOK_MODEL, TEXTBOOK_TRAINING

DIGIT_ZERO = [0, 0, 5, 13, 9, 1, 0, 0, 0, 0, 13, 15, 10, 15, 5, 0, 0, 3, 15, 2, 0, 11, 8, 0, 0, 4, 12, 0,
              0, 8, 8, 0, 0, 5, 8, 0, 0, 9, 8, 0, 0, 4, 11, 0, 1, 12, 7, 0, 0, 2, 14, 5, 10, 12, 0, 0,
              0, 0, 6, 13, 10, 0, 0, 0]


def train_and_predict(client: TestClient | httpx.Client) -> dict:
    dataset = client.post("/v1/datasets", json={"name": "digits", "builtin": "digits"})
    assert dataset.status_code == 201, dataset.text
    run = client.post("/v1/runs", json={
        "dataset_id": dataset.json()["id"], "model": TEXTBOOK_MODEL, "training": TEXTBOOK_TRAINING,
    })
    assert run.status_code == 202, run.text
    assert run.json()["status"] == "queued"
    finished = wait_for_run(client, run.json()["id"])
    assert finished["status"] == "succeeded", finished
    assert finished["epochs_done"] == 10 and finished["latest_metrics"]["val_accuracy"] > 0.9
    prediction = client.post(
        f"/v1/runs/{finished['id']}/predict", json={"inputs": [DIGIT_ZERO], "samples": 100, "seed": 7}
    )
    assert prediction.status_code == 200, prediction.text
    body = prediction.json()
    assert body["predictions"][0]["label"] == "0"
    assert body["predictions"][0]["predictive_entropy"] >= body["predictions"][0]["mutual_information"] >= 0
    return finished


def test_redis_postgres_and_a_real_worker(client: TestClient, worker: Process) -> None:
    finished = train_and_predict(client)
    assert "mcdrop.runs.train" in worker.output() and f"run {finished['id']} succeeded" in worker.output()


def _processes_with_env(marker: str) -> list[int]:
    """PIDs of live processes whose environment contains ``marker`` (our data dir)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if marker.encode() in (entry / "environ").read_bytes():
                status = (entry / "status").read_text()
                if "State:\tZ" not in status:
                    found.append(int(entry.name))
        except OSError:
            continue
    return found


def _wait_gone(marker: str, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while (left := _processes_with_env(marker)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


def _start_embedded(
    tmp_path: Path, *, data_dir: str | None = None, log_name: str = "up.log", extra_env: dict[str, str] | None = None,
) -> tuple[Process, str, str]:
    data_dir = data_dir or str(tmp_path / "embedded-data")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MCDROP_")}
    # Auth off unless a test asks for it (the embedded server on loopback is where that is allowed).
    env.update({"MCDROP_DATA_DIR": data_dir, "MCDROP_PORT": str(port), "PYTHONUNBUFFERED": "1", "MCDROP_AUTH": "off",
                **(extra_env or {})})
    process = Process([sys.executable, "-m", "service.cli", "up"], env, tmp_path / log_name)
    base = f"http://127.0.0.1:{port}"
    wait_until_ready(base, process)
    process.wait_for_output(" ready.", timeout=90)  # the worker
    return process, base, data_dir


def test_embedded_mode_as_make_run_starts_it(tmp_path: Path) -> None:
    """`make run`: auth on (the default), a key made with `mcdrop keys create`, then the walkthrough."""
    process, base, data_dir = _start_embedded(tmp_path, extra_env={"MCDROP_AUTH": "on"})
    try:
        assert "no API keys yet" in process.output()
        # the worker beside the API leaves it a core for torch's threads
        threads = tuning.worker_torch_threads(0, 1, tuning.usable_cores(), beside_api=True)
        assert f"worker: 1 process, {threads} torch thread{'' if threads == 1 else 's'} each" in process.output()
        assert "beside the API" in process.output()
        unauthenticated = httpx.get(f"{base}/v1/runs", timeout=10)
        assert unauthenticated.status_code == 401 and unauthenticated.headers["www-authenticate"].startswith("Bearer")
        env = {k: v for k, v in os.environ.items() if not k.startswith("MCDROP_")}
        made = subprocess.run(
            [sys.executable, "-m", "service.cli", "keys", "create", "--tenant", "demo"],
            env={**env, "MCDROP_DATA_DIR": data_dir}, capture_output=True, text=True, timeout=60, check=True,
        )
        key = made.stdout.strip()
        assert key.startswith("mcd_") and key not in made.stderr
        with httpx.Client(base_url=base, timeout=30, headers={"Authorization": f"Bearer {key}"}) as http:
            train_and_predict(http)
        assert (Path(data_dir) / "mcdrop.sqlite3").exists()
        assert (Path(data_dir) / "broker").is_dir()
    finally:
        code = process.stop(signal.SIGTERM, timeout=40)
    assert code == 0, process.output()[-3000:]
    assert _wait_gone(data_dir, 10) == [], "processes left behind after SIGTERM"


def test_embedded_mode_leaves_nothing_behind_when_the_parent_is_killed(tmp_path: Path) -> None:
    process, _, data_dir = _start_embedded(tmp_path)
    assert "auth is OFF" in process.output()  # said at start-up
    assert len(_processes_with_env(data_dir)) >= 2  # the API and the worker
    process.popen.send_signal(signal.SIGKILL)
    process.popen.wait()
    left = _wait_gone(data_dir, 40)
    process.stop()
    assert left == [], f"processes left behind after the parent was killed: {left}"
