"""What other services rely on: Idempotency-Key, priorities, per-device queues, /v1/queue,
and signed webhooks on terminal states (real PostgreSQL, Redis and worker processes)."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from fastapi.testclient import TestClient

from service.jobs import webhooks
from tests.api.test_datasets import assert_problem
from tests.conftest import Process, start_worker, wait_for_run
from tests.factories import make_dataset

QUICK = {"epochs": 2, "batch_size": 64, "seed": 3}


@pytest.fixture(scope="module")
def iris(client: TestClient) -> dict:
    return make_dataset(client, "iris")


def run_body(dataset_id: str, **overrides) -> dict:
    return {"dataset_id": dataset_id, "model": {"hidden_layers": [16], "dropout": 0.2}, "training": QUICK, **overrides}


def test_idempotent_run_creation_sequential(client: TestClient, iris) -> None:
    headers = {"Idempotency-Key": "order-42-train"}
    first = client.post("/v1/runs", json=run_body(iris["id"]), headers=headers)
    again = client.post("/v1/runs", json=run_body(iris["id"]), headers=headers)
    assert first.status_code == 202 and again.status_code == 200
    assert again.json() == first.json()
    other = client.post("/v1/runs", json=run_body(iris["id"], priority=5), headers=headers)
    body = assert_problem(other, 422, loc=["header", "Idempotency-Key"])
    assert "different" in body["detail"] or "another" in body["detail"]
    fresh = client.post("/v1/runs", json=run_body(iris["id"]), headers={"Idempotency-Key": "order-43-train"})
    assert fresh.status_code == 202 and fresh.json()["id"] != first.json()["id"]
    assert_problem(client.post("/v1/runs", json=run_body(iris["id"]), headers={"Idempotency-Key": "x" * 300}), 422,
                   loc=["header", "Idempotency-Key"])


def test_idempotent_run_creation_concurrent(client: TestClient, iris) -> None:
    headers = {"Idempotency-Key": "burst-7"}
    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda _: client.post("/v1/runs", json=run_body(iris["id"]), headers=headers), range(8)))
    assert sorted(r.status_code for r in responses) == [200] * 7 + [202]
    assert len({r.json()["id"] for r in responses}) == 1
    created = [r for r in client.get("/v1/runs?limit=1000").json()["items"] if r["id"] == responses[0].json()["id"]]
    assert len(created) == 1


def test_idempotent_dataset_creation(client: TestClient) -> None:
    headers = {"Idempotency-Key": "ds-1"}
    first = client.post("/v1/datasets", json={"name": "wine", "builtin": "wine"}, headers=headers)
    again = client.post("/v1/datasets", json={"name": "wine", "builtin": "wine"}, headers=headers)
    assert (first.status_code, again.status_code) == (201, 200) and first.json() == again.json()
    csv = b"a,y\n1,0\n2,1\n3,0\n"
    upload = lambda: client.post("/v1/datasets", data={"name": "up", "target": "y", "task": "classification"},  # noqa: E731
                                 files={"file": ("d.csv", csv, "text/csv")}, headers={"Idempotency-Key": "ds-2"})
    one, two = upload(), upload()
    assert (one.status_code, two.status_code) == (201, 200) and one.json()["id"] == two.json()["id"]


def test_priority_cuda_queue_and_queue_overview(client: TestClient, settings, iris, tmp_path) -> None:
    low = client.post("/v1/runs", json=run_body(iris["id"], priority=0)).json()
    high = client.post("/v1/runs", json=run_body(iris["id"], priority=9)).json()
    gpu_only = client.post("/v1/runs", json=run_body(iris["id"], device="cuda")).json()
    overview = client.get("/v1/queue").json()
    depth = {q["queue"]: q for q in overview["queues"]}
    assert depth["cpu"]["queued"] >= 2 and depth["cuda"]["queued"] >= 1
    worker = start_worker(settings, tmp_path / "worker.log")
    try:
        done = [wait_for_run(client, run["id"]) for run in (low, high)]
        seen = client.get("/v1/queue").json()["workers"]
    finally:
        worker.stop()
    assert all(run["status"] == "succeeded" for run in done)
    assert done[1]["started_at"] < done[0]["started_at"], "priority 9 should start before priority 0"
    assert any(w["queues"] == ["cpu"] and w["device"] == "cpu" for w in seen)
    # no CUDA worker here: the cuda run waits for one
    assert client.get(f"/v1/runs/{gpu_only['id']}").json()["status"] == "queued"
    assert client.post(f"/v1/runs/{gpu_only['id']}/cancel").status_code == 200


def test_callback_url_must_be_http(client: TestClient, iris) -> None:
    for url in ("ftp://example.com/x", "file:///etc/passwd", "javascript:alert(1)", "not a url"):
        assert_problem(client.post("/v1/runs", json=run_body(iris["id"], callback_url=url)), 422,
                       loc=["body", "callback_url"])


class Receiver:
    """A local webhook receiver that fails the first ``failures`` requests."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.received: list[tuple[dict, dict]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers["Content-Length"]))
                outer.received.append((dict(self.headers), {"raw": body}))
                code = 500 if len(outer.received) <= outer.failures else 204
                self.send_response(code)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/mcdrop"


def test_signed_webhook_retried_until_delivered(client: TestClient, settings, iris, worker: Process) -> None:
    receiver = Receiver(failures=1)
    try:
        run = client.post("/v1/runs", json=run_body(iris["id"], callback_url=receiver.url)).json()
        assert wait_for_run(client, run["id"])["status"] == "succeeded"
        deadline = time.monotonic() + 30
        while len(receiver.received) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        receiver.server.shutdown()
    assert len(receiver.received) == 2, "one failed attempt, then a retry"
    secret = webhooks.webhook_secret(settings)
    for headers, body in receiver.received:
        assert webhooks.verify(secret, body["raw"], headers[webhooks.SIGNATURE_HEADER])
    payload = json.loads(receiver.received[1][1]["raw"])
    assert payload["type"] == "run.succeeded" and payload["run"]["id"] == run["id"]
    assert receiver.received[0][0]["Mcdrop-Event-Id"] == receiver.received[1][0]["Mcdrop-Event-Id"]
    deadline = time.monotonic() + 10
    while (deliveries := client.get(f"/v1/runs/{run['id']}/deliveries").json()["items"])[0]["status"] != "delivered":
        assert time.monotonic() < deadline, deliveries
        time.sleep(0.1)
    assert deliveries[0]["attempts"] == 2 and deliveries[0]["event_type"] == "run.succeeded"
    tampered = receiver.received[1][1]["raw"].replace(b"succeeded", b"failed")
    assert not webhooks.verify(secret, tampered, receiver.received[1][0][webhooks.SIGNATURE_HEADER])
