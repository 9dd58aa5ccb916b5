"""With a real Celery worker (PostgreSQL + Redis) logging JSON: the request id of the POST that
queued a run is on every worker log line of that run; the API's own lines carry it too; epoch
durations and served-uncertainty histograms appear in /metrics with the right numbers."""

from __future__ import annotations

import io
import json
import logging
import math
import sys
import uuid
from pathlib import Path

from fastapi.testclient import TestClient
from sqlalchemy import func, select

from service.config import Settings
from service.db import get_sessionmaker
from service.observability.logging import ContextFilter, JsonFormatter
from service.observability.uncertainty import UNCERTAINTY_BUCKETS
from service.runs.models import RunMetricRow
from tests.conftest import Process, settings_env, wait_for_run
from tests.factories import TEXTBOOK_TRAINING, make_dataset
from tests.observability.scraping import scrape, value

IRIS = [[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3], [5.9, 3.0, 4.2, 1.5], [30.0, -4.0, 12.0, 9.0]]  # the last: no flower


def api_log_lines(client: TestClient, path: str, request_id: str) -> list[dict]:
    """JSON log lines the API writes while serving ``path`` (SQL statements, logged by
    SQLAlchemy at INFO, are lines of the request like any other)."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(ContextFilter())
    # Only this request's lines: the apps' background threads (reconciler, alias refresher) run
    # their own SQL meanwhile, with no request id.
    handler.addFilter(lambda record: not record.threadName.startswith(("mcdrop-reconciler", "mcdrop-alias-refresher")))
    handler.setFormatter(JsonFormatter())
    engine_logger = logging.getLogger("sqlalchemy.engine.Engine")
    previous = engine_logger.level
    logging.getLogger().addHandler(handler)
    engine_logger.setLevel(logging.INFO)
    try:
        assert client.get(path, headers={"X-Request-ID": request_id}).status_code == 200
    finally:
        engine_logger.setLevel(previous)
        logging.getLogger().removeHandler(handler)
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_request_id_in_worker_logs_and_training_and_serving_metrics(
    client: TestClient, settings: Settings, tmp_path: Path,
) -> None:
    worker = Process([sys.executable, "-m", "service.cli", "worker"],
                     {**settings_env(settings), "MCDROP_LOG_FORMAT": "json"}, tmp_path / "worker.log")
    try:
        worker.wait_for_output(" ready.", timeout=90)
        dataset = make_dataset(client, "iris")
        with get_sessionmaker(settings.sqlalchemy_url)() as session:
            last_row_before = session.scalar(select(func.max(RunMetricRow.id))) or 0
        before = scrape(client)

        request_id = f"submit-{uuid.uuid4().hex[:12]}"
        submitted = client.post("/v1/runs", headers={"X-Request-ID": request_id}, json={
            "dataset_id": dataset["id"], "priority": 9, "model": {"hidden_layers": [16], "dropout": 0.2},
            "training": {**TEXTBOOK_TRAINING, "epochs": 4, "batch_size": 16},
        })
        assert submitted.status_code == 202, submitted.text
        assert submitted.headers["x-request-id"] == request_id
        run_id = submitted.json()["id"]
        assert wait_for_run(client, run_id)["status"] == "succeeded"

        predicted = client.post(f"/v1/runs/{run_id}/predict", json={"inputs": IRIS, "samples": 50})
        assert predicted.status_code == 200, predicted.text
        predictions = predicted.json()["predictions"]
        after = scrape(client)
        with get_sessionmaker(settings.sqlalchemy_url)() as session:
            new_rows = session.execute(
                select(RunMetricRow.run_id, RunMetricRow.duration_s).where(RunMetricRow.id > last_row_before)
            ).all()
        api_lines = api_log_lines(client, f"/v1/runs/{run_id}", "read-it-back")
    finally:
        worker.stop()

    # -- the worker's log: JSON lines; the run's lines carry the request id of its POST
    # Every line is a JSON object, except the notice Celery prints itself (not through logging).
    celery_notice = "worker: Warm shutdown (MainProcess)"
    lines = [json.loads(line) for line in worker.output().splitlines() if line.strip() and line != celery_notice]
    assert all({"ts", "level", "logger", "msg", "request_id", "run_id"} <= line.keys() for line in lines)
    of_run = [line for line in lines if line["run_id"] == run_id]
    assert {line["request_id"] for line in of_run} == {request_id}
    messages = [line["msg"] for line in of_run]
    assert any(msg.startswith(f"training run {run_id} on") for msg in messages), messages
    assert f"run {run_id} succeeded" in messages
    assert all(line["request_id"] != request_id for line in lines if line["run_id"] != run_id)

    # -- the API's lines of a request carry its request id and the run of its path
    assert api_lines and all(line["request_id"] == "read-it-back" and line["run_id"] == run_id for line in api_lines)

    # -- epoch durations: every epoch row written since, once; this run's 4 among them
    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert sum(1 for row_run, _ in new_rows if str(row_run) == run_id) == 4
    assert delta("mcdrop_training_epoch_duration_seconds_count") == len(new_rows)
    assert math.isclose(delta("mcdrop_training_epoch_duration_seconds_sum"), sum(d for _, d in new_rows), rel_tol=1e-9)

    # -- served uncertainty of this run: exactly the values returned, in the right buckets
    for metric, field in [("mcdrop_served_predictive_entropy_nats", "predictive_entropy"),
                          ("mcdrop_served_mutual_information_nats", "mutual_information")]:
        served = [p[field] for p in predictions]
        assert value(after, f"{metric}_count", run_id=run_id) == len(IRIS)
        assert math.isclose(value(after, f"{metric}_sum", run_id=run_id), sum(served), rel_tol=1e-9)
        for bound in UNCERTAINTY_BUCKETS:
            assert value(after, f"{metric}_bucket", run_id=run_id, le=str(float(bound))) == sum(v <= bound for v in served)
