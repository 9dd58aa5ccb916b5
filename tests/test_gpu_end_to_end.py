"""The service on a CUDA machine, started the way `make run` starts it (`mcdrop up`: SQLite, the
filesystem broker, the API and one worker as real processes): a run that asks for CUDA trains on
the GPU, and so does one that leaves the device to the service; the model answers online
predictions (the API samples on the CPU), and a batch job asked to run on CUDA predicts on the
worker's GPU. Skipped where torch sees no CUDA device (CI here)."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from tests.api.test_batch_predictions import check_classification_invariants, download
from tests.conftest import wait_for_run
from tests.factories import TEXTBOOK_MODEL, TEXTBOOK_TRAINING
from tests.test_end_to_end import DIGIT_ZERO, _start_embedded

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def wait_for_job(http: httpx.Client, job_id: str, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while (body := http.get(f"/v1/batch-predictions/{job_id}").json())["status"] not in ("succeeded", "failed"):
        assert time.monotonic() < deadline, f"batch job {job_id} still {body['status']} after {timeout}s"
        time.sleep(0.2)
    return body


def test_training_and_batch_prediction_on_the_gpu_through_the_service(tmp_path: Path) -> None:
    process, base, _ = _start_embedded(tmp_path)
    try:
        # The worker (solo pool) created its CUDA context before taking runs, not in the first one.
        assert "worker warmed up on cuda" in process.output()
        with httpx.Client(base_url=base, timeout=30) as http:
            dataset = http.post("/v1/datasets", json={"name": "digits", "builtin": "digits"}).json()
            run = http.post("/v1/runs", json={"dataset_id": dataset["id"], "model": TEXTBOOK_MODEL,
                                              "training": TEXTBOOK_TRAINING, "device": "cuda"})
            assert run.status_code == 202, run.text
            finished = wait_for_run(http, run.json()["id"])
            assert finished["status"] == "succeeded", finished
            assert finished["device"] == "cuda"
            assert finished["epochs_done"] == 10 and finished["latest_metrics"]["val_accuracy"] > 0.9

            auto = http.post("/v1/runs", json={"dataset_id": dataset["id"], "model": TEXTBOOK_MODEL,
                                               "training": {**TEXTBOOK_TRAINING, "epochs": 2}})  # device "auto"
            assert auto.status_code == 202, auto.text
            auto_finished = wait_for_run(http, auto.json()["id"])
            assert auto_finished["status"] == "succeeded" and auto_finished["device"] == "cuda", auto_finished

            prediction = http.post(f"/v1/runs/{finished['id']}/predict",
                                   json={"inputs": [DIGIT_ZERO], "samples": 100, "seed": 7})
            assert prediction.status_code == 200, prediction.text
            assert prediction.json()["predictions"][0]["label"] == "0"

            job = http.post("/v1/batch-predictions", json={
                "run_id": finished["id"], "dataset_id": dataset["id"], "samples": 50, "seed": 3, "device": "cuda",
            })
            assert job.status_code == 202, job.text
            done = wait_for_job(http, job.json()["id"])
            assert done["status"] == "succeeded" and done["worker_device"] == "cuda", done
            _, rows = download(http, done["id"])  # type: ignore[arg-type]
            class_names = dataset["class_names"]
            check_classification_invariants(rows, class_names)
            accuracy = np.mean(np.array(rows["predicted_class"]) == np.array(rows["target"]))
            assert accuracy > 0.9
    finally:
        code = process.stop(signal.SIGTERM, timeout=40)
    assert code == 0, process.output()[-3000:]
