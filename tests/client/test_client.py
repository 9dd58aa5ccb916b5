"""The typed client against the real app (in process, PostgreSQL and Redis): every resource,
pagination through all pages, idempotent creation, and typed errors."""

from __future__ import annotations

import json
import socket
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from service.client import ApiError, ConnectionFailed, McdropClient
from service.datasets.schemas import DatasetRead
from service.jobs.workers_registry import QueueRead
from service.runs.schemas import ClassificationOutput, PredictResponse, RunCreate, RunRead
from tests.factories import make_dataset

DIGIT_ZERO = [0, 0, 5, 13, 9, 1, 0, 0, 0, 0, 13, 15, 10, 15, 5, 0, 0, 3, 15, 2, 0, 11, 8, 0, 0, 4, 12, 0,
              0, 8, 8, 0, 0, 5, 8, 0, 0, 9, 8, 0, 0, 4, 11, 0, 1, 12, 7, 0, 0, 2, 14, 5, 10, 12, 0, 0,
              0, 0, 6, 13, 10, 0, 0, 0]


def test_health_and_readiness(mcdrop: McdropClient) -> None:
    assert mcdrop.health() == {"status": "ok"}
    ready = mcdrop.ready()
    assert ready["status"] == "ready" and ready["checks"] == {"database": "ok", "broker": "ok"}


def test_datasets_builtin_and_csv_uploads(mcdrop: McdropClient, tmp_path: Path) -> None:
    iris = mcdrop.create_dataset("iris for the client", builtin="iris")
    assert isinstance(iris, DatasetRead) and (iris.task, iris.n_rows, iris.n_features, iris.n_classes) == (
        "classification", 150, 4, 3)
    assert mcdrop.get_dataset(iris.id) == iris

    rows = "x1,x2,y\n" + "\n".join(f"{i},{i * 0.5},{2 * i + 1}" for i in range(12))
    path = tmp_path / "line.csv"
    path.write_text(rows)
    from_path = mcdrop.upload_dataset("line", path, target="y", task="regression")
    from_bytes = mcdrop.upload_dataset("line bytes", rows.encode(), target="y", task="regression")
    with path.open("rb") as handle:
        from_handle = mcdrop.upload_dataset("line handle", handle, target="y", task="regression")
    for dataset in (from_path, from_bytes, from_handle):
        assert (dataset.task, dataset.n_rows, dataset.feature_names, dataset.target_name) == (
            "regression", 12, ["x1", "x2"], "y")

    regression = {d.id for d in mcdrop.iter_datasets(task="regression", page_size=1)}
    assert {from_path.id, from_bytes.id, from_handle.id} <= regression
    assert iris.id not in regression


def test_idempotency_key_returns_the_first_object(mcdrop: McdropClient, digits: DatasetRead, cancel_later) -> None:
    key = f"client-{uuid.uuid4()}"
    first = mcdrop.create_run({"dataset_id": digits.id, "training": {"epochs": 1}}, idempotency_key=key)
    cancel_later.append(first.id)
    again = mcdrop.create_run({"dataset_id": digits.id, "training": {"epochs": 1}}, idempotency_key=key)
    assert again.id == first.id
    with pytest.raises(ApiError) as refused:  # the same key with another body
        mcdrop.create_run({"dataset_id": digits.id, "training": {"epochs": 2}}, idempotency_key=key)
    assert refused.value.status == 422 and refused.value.errors[0]["loc"] == ["header", "Idempotency-Key"]

    dataset_key = f"client-{uuid.uuid4()}"
    wine = mcdrop.create_dataset("wine", builtin="wine", idempotency_key=dataset_key)
    assert mcdrop.create_dataset("wine", builtin="wine", idempotency_key=dataset_key).id == wine.id


def test_runs_are_listed_page_by_page_and_iterated_across_pages(mcdrop: McdropClient, client: TestClient,
                                                                  cancel_later) -> None:
    dataset = make_dataset(client, "iris", name="iris for pages")
    started = datetime.now(UTC) - timedelta(seconds=1)
    created = []
    for seed in range(5):
        spec = RunCreate(dataset_id=dataset["id"], training={"epochs": 1, "seed": seed})
        run = mcdrop.create_run(spec)
        cancel_later.append(run.id)
        assert isinstance(run, RunRead) and run.status == "queued" and run.spec["training"]["seed"] == seed
        created.append(run.id)

    first = mcdrop.list_runs(dataset_id=dataset["id"], limit=2)
    assert [run.id for run in first.items] == created[::-1][:2] and first.next_cursor
    second = mcdrop.list_runs(dataset_id=dataset["id"], limit=2, cursor=first.next_cursor)
    assert [run.id for run in second.items] == created[::-1][2:4]

    assert [run.id for run in mcdrop.iter_runs(dataset_id=dataset["id"], page_size=2)] == created[::-1]
    oldest_first = mcdrop.iter_runs(dataset_id=dataset["id"], page_size=3, sort="created_at")
    assert [run.id for run in oldest_first] == created
    assert [run.id for run in mcdrop.iter_runs(dataset_id=dataset["id"], status="queued",
                                                created_after=started)] == created[::-1]
    assert list(mcdrop.iter_runs(dataset_id=dataset["id"], status="succeeded")) == []
    assert list(mcdrop.iter_runs(dataset_id=dataset["id"], created_before=started)) == []


def test_cancel_and_wait(mcdrop: McdropClient, digits: DatasetRead, cancel_later) -> None:
    run = mcdrop.create_run({"dataset_id": digits.id, "training": {"epochs": 1}})
    cancel_later.append(run.id)
    with pytest.raises(TimeoutError, match="still queued"):
        mcdrop.wait_for_run(run.id, timeout=0.3, poll_s=0.1)
    cancelled = mcdrop.cancel_run(run.id)
    assert cancelled.status == "cancelled"
    assert mcdrop.wait_for_run(run.id, timeout=5).status == "cancelled"
    with pytest.raises(ApiError) as again:
        mcdrop.cancel_run(run.id)
    assert again.value.status == 409 and again.value.body["status"] == 409


def test_predict_metrics_evaluation_and_events_of_a_trained_run(mcdrop: McdropClient, trained: RunRead) -> None:
    assert trained.status == "succeeded" and mcdrop.wait_for_run(trained.id, timeout=1) == trained
    prediction = mcdrop.predict(trained.id, [DIGIT_ZERO, [16.0] * 64], samples=50, seed=7)
    assert isinstance(prediction, PredictResponse) and prediction.samples == 50 and prediction.seed == 7
    assert len(prediction.predictions) == 2 and isinstance(prediction.predictions[0], ClassificationOutput)
    zero = prediction.predictions[0]
    assert zero.predictive_entropy >= zero.mutual_information >= 0
    assert abs(sum(zero.probabilities) - 1) < 1e-5
    assert mcdrop.predict(trained.id, [DIGIT_ZERO, [16.0] * 64], samples=50, seed=7) == prediction

    metrics = mcdrop.get_run_metrics(trained.id)
    assert metrics.run_id == trained.id and [m.epoch for m in metrics.items] == [1, 2, 3]
    evaluation = mcdrop.get_run_evaluation(trained.id)
    assert 0 <= evaluation["mc"]["accuracy"] <= 1 and "deterministic" in evaluation
    assert mcdrop.list_run_deliveries(trained.id).items == []  # no callback_url

    events = list(mcdrop.iter_run_events(trained.id))
    assert [e.status for e in events if e.kind == "status"] == ["queued", "running", "succeeded"]
    assert [e.data["epoch"] for e in events if e.kind == "epoch"] == [1, 2, 3]
    later = list(mcdrop.iter_run_events(trained.id, after=events[2].id))
    assert [e.id for e in later] == [e.id for e in events[3:]]


def test_errors_are_typed_with_the_problem_details(mcdrop: McdropClient, client: TestClient, digits: DatasetRead,
                                                   trained: RunRead, cancel_later) -> None:
    missing = uuid.uuid4()
    with pytest.raises(ApiError) as not_found:
        mcdrop.get_run(missing)
    assert not_found.value.status == 404 and str(missing) in not_found.value.detail
    assert str(not_found.value).startswith("HTTP 404: ")

    with pytest.raises(ApiError) as bad_width:
        mcdrop.predict(trained.id, [[1.0, 2.0]])
    assert bad_width.value.status == 422 and bad_width.value.errors and bad_width.value.body["status"] == 422

    with pytest.raises(ApiError) as bad_spec:
        mcdrop.create_run({"dataset_id": digits.id, "model": {"dropout": 1.5}})
    assert bad_spec.value.status == 422
    assert ["body", "model", "dropout"] in [error["loc"] for error in bad_spec.value.errors]
    assert "model.dropout" in str(bad_spec.value)

    queued = mcdrop.create_run({"dataset_id": digits.id, "training": {"epochs": 1}})
    cancel_later.append(queued.id)
    with pytest.raises(ApiError) as not_trained:
        mcdrop.predict(queued.id, [DIGIT_ZERO])
    assert not_trained.value.status == 409

    with McdropClient(api_key="mcd_not-a-key", transport=client) as stranger, pytest.raises(ApiError) as refused:
        stranger.list_runs()
    assert refused.value.status == 401 and refused.value.headers["www-authenticate"].startswith("Bearer")

    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with McdropClient(f"http://127.0.0.1:{port}", timeout=2) as nowhere, pytest.raises(ConnectionFailed):
        nowhere.health()


def test_keys_of_the_callers_tenant(mcdrop: McdropClient, client: TestClient) -> None:
    created = mcdrop.create_key("client test")
    assert created.key.startswith("mcd_") and created.tenant_id == "default"
    assert created.id in [key.id for key in mcdrop.list_keys().items]
    with McdropClient(api_key=created.key, transport=client) as other:
        assert other.list_keys().items  # the new key works
    revoked = mcdrop.revoke_key(created.id)
    assert revoked.revoked_at is not None
    with pytest.raises(ApiError) as twice:
        mcdrop.revoke_key(created.id)
    assert twice.value.status == 409


def test_sweeps_and_the_queue(mcdrop: McdropClient, client: TestClient, cancel_later) -> None:
    diabetes = make_dataset(client, "diabetes", name="diabetes for a sweep")
    sweep = mcdrop.create_sweep({
        "dataset_id": diabetes["id"], "training": {"epochs": 2, "batch_size": 64},
        "grid": {"dropout": [0.05, 0.1]}, "splits": {"folds": 2}, "metric": "rmse", "retrain_best": False,
    })
    cancel_later.append(sweep.id)
    assert sweep.status == "queued" and sweep.n_configurations == 2 and sweep.n_splits == 2
    assert mcdrop.get_sweep(sweep.id).id == sweep.id
    assert sweep.id in [s.id for s in mcdrop.iter_sweeps(dataset_id=diabetes["id"], page_size=1)]
    assert mcdrop.list_sweeps(status="queued", dataset_id=diabetes["id"]).items[0].id == sweep.id

    queue = mcdrop.get_queue()
    assert isinstance(queue, QueueRead) and {depth.queue for depth in queue.queues} >= {"cpu", "cuda"}
    assert sum(depth.queued for depth in queue.queues) >= 1

    assert mcdrop.cancel_sweep(sweep.id).status == "cancelled"


def test_requests_on_the_wire() -> None:
    """Headers, query parameters and error bodies, seen through a mock transport."""
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if request.url.path == "/v1/runs" and request.method == "GET":
            return httpx.Response(200, json={"items": [], "next_cursor": None})
        if request.url.path == "/v1/datasets":
            return httpx.Response(502, text="<html>bad gateway</html>")
        return httpx.Response(404, json={"error": "model mnist not found"})  # a KServe V2-shaped error

    after = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    dataset_id = uuid.uuid4()
    with McdropClient("http://api.test/", api_key="mcd_secret", transport=httpx.MockTransport(handler)) as api:
        assert list(api.iter_runs(status="queued", dataset_id=dataset_id, created_after=after, page_size=7)) == []
        with pytest.raises(ApiError) as gateway:
            api.create_dataset("d", builtin="iris", idempotency_key="k-1")
        with pytest.raises(ApiError) as v2:
            api.get_run("x")
    listing, creation = seen[0], seen[1]
    assert listing.url.host == "api.test" and listing.headers["authorization"] == "Bearer mcd_secret"
    assert dict(listing.url.params) == {"status": "queued", "dataset_id": str(dataset_id),
                                        "created_after": after.isoformat(), "limit": "7"}
    assert creation.headers["idempotency-key"] == "k-1"
    assert json.loads(creation.content) == {"name": "d", "builtin": "iris"}
    assert gateway.value.status == 502 and gateway.value.detail == "<html>bad gateway</html>"
    assert v2.value.status == 404 and v2.value.detail == "model mnist not found"
