"""Webhooks: signatures, the signing secret, and delivery to a real local HTTP receiver through
real PostgreSQL (a database of this module's own, so other tests' deliveries never interfere)."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import psycopg
import pytest
from pydantic import SecretStr
from sqlalchemy import delete

from service.config import Settings
from service.datasets.schemas import DatasetCreate
from service.datasets.service import create_builtin
from service.db import get_engine, get_sessionmaker, session_scope, utcnow
from service.jobs import webhooks
from service.jobs.models import WebhookDeliveryRow
from service.migrate import upgrade
from service.runs import lifecycle
from service.runs.models import RunRow
from tests.conftest import PG_ADMIN_URL, REPO, create_database, free_port

SECRET = b"whsec_test"
BODY = b'{"id":"evt_1","type":"run.succeeded"}'


# --- signatures ---------------------------------------------------------------------------


def test_sign_and_verify_round_trip() -> None:
    header = webhooks.sign(SECRET, BODY, 1_700_000_000)
    assert header.startswith("t=1700000000,v1=") and len(header.split("v1=")[1]) == 64
    assert webhooks.verify(SECRET, BODY, header, now=1_700_000_000)
    assert webhooks.verify(SECRET, BODY, header, now=1_700_000_299)
    assert webhooks.verify(SECRET, BODY, webhooks.sign(SECRET, BODY, int(time.time())))
    # a second v1 (a sender rotating its secret) is accepted when either one matches
    assert webhooks.verify(SECRET, BODY, f"{header},v1={'0' * 64}", now=1_700_000_000)


@pytest.mark.parametrize(
    "secret, body, header, now",
    [
        (SECRET, BODY + b" ", None, 1_700_000_000),  # tampered body
        (b"another secret", BODY, None, 1_700_000_000),  # wrong secret
        (SECRET, BODY, None, 1_700_000_301),  # stale
        (SECRET, BODY, None, 1_699_999_699),  # from the future
        (SECRET, BODY, "", 1_700_000_000),
        (SECRET, BODY, "garbage", 1_700_000_000),
        (SECRET, BODY, "t=1700000000", 1_700_000_000),  # no signature
        (SECRET, BODY, "v1=" + "0" * 64, 1_700_000_000),  # no timestamp
        (SECRET, BODY, "t=soon,v1=" + "0" * 64, 1_700_000_000),
        (SECRET, BODY, "t=1700000000,t=1700000000,v1=" + "0" * 64, 1_700_000_000),
        (SECRET, BODY, "t=1700000000,v1=" + "0" * 64, 1_700_000_000),  # wrong digest
    ],
)
def test_verify_rejects(secret: bytes, body: bytes, header: str | None, now: int) -> None:
    signed = webhooks.sign(SECRET, BODY, 1_700_000_000)
    assert not webhooks.verify(secret, body, signed if header is None else header, now=now)


# --- the signing secret -------------------------------------------------------------------


def _secret_in_subprocess(data_dir: Path) -> subprocess.Popen[str]:
    code = (
        "import sys; from service.config import Settings; from service.jobs.webhooks import webhook_secret; "
        "print(webhook_secret(Settings(data_dir=sys.argv[1])).decode())"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("MCDROP_")}
    return subprocess.Popen(
        [sys.executable, "-c", code, str(data_dir)], cwd=REPO, env=env, stdout=subprocess.PIPE, text=True
    )


def test_generated_secret_is_private_and_shared_by_processes(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "first")
    secret = webhooks.webhook_secret(settings)
    path = tmp_path / "first" / "webhook_secret"
    assert len(secret) == 64 and int(secret, 16) >= 0
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_bytes().strip() == secret
    assert webhooks.webhook_secret(settings) == secret
    assert webhooks._read_or_create_secret(path) == secret  # a fresh read, past the cache
    reader = _secret_in_subprocess(tmp_path / "first")
    assert reader.communicate(timeout=30)[0].strip() == secret.decode()

    # Processes racing to create it agree on one secret, and no drafts are left behind.
    racers = [_secret_in_subprocess(tmp_path / "raced") for _ in range(4)]
    values = {racer.communicate(timeout=30)[0].strip() for racer in racers}
    assert all(racer.returncode == 0 for racer in racers)
    assert values == {(tmp_path / "raced" / "webhook_secret").read_text().strip()}
    assert os.listdir(tmp_path / "raced") == ["webhook_secret"]


def test_configured_secret_wins(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, webhook_secret=SecretStr("configured"))
    assert webhooks.webhook_secret(settings) == b"configured"
    assert not (tmp_path / "webhook_secret").exists()


# --- delivery -----------------------------------------------------------------------------


@dataclass
class Received:
    headers: dict[str, str]
    body: bytes
    verified: bool

    @property
    def payload(self) -> dict[str, Any]:
        return json.loads(self.body)


class Receiver:
    """A real HTTP server on 127.0.0.1 that verifies signatures and answers ``responses`` in
    turn (the last one repeats)."""

    def __init__(self, secret: bytes) -> None:
        self.secret = secret
        self.responses: list[int] = [200]
        self.delay_s = 0.0
        self.received: list[Received] = []
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                verified = webhooks.verify(receiver.secret, body, self.headers.get(webhooks.SIGNATURE_HEADER))
                with receiver._lock:
                    receiver.received.append(Received(dict(self.headers), body, verified))
                    status = receiver.responses.pop(0) if len(receiver.responses) > 1 else receiver.responses[0]
                time.sleep(receiver.delay_s)
                self.send_response(status)
                if 300 <= status < 400:
                    self.send_header("Location", "/elsewhere")
                self.send_header("Content-Length", "4")
                self.end_headers()
                self.wfile.write(b"nope" if status >= 300 else b"ok\r\n")

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/mcdrop"
        self._thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)

    def __enter__(self) -> Receiver:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def database_url(postgres_url: str) -> Iterator[str]:
    name = create_database()
    url = f"{postgres_url.rsplit('/', 1)[0]}/{name}"
    upgrade(url)
    yield url
    get_engine(url).dispose()
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as connection:
        connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="module")
def dataset_id(database_url: str) -> uuid.UUID:
    with get_sessionmaker(database_url)() as session:
        return create_builtin(session, DatasetCreate(name="iris", builtin="iris"), "default").id


@pytest.fixture
def hook_settings(settings: Settings, database_url: str, tmp_path: Path) -> Iterator[Settings]:
    yield settings.model_copy(update={
        "database_url": database_url, "data_dir": tmp_path, "webhook_secret": None,
        "webhook_timeout_s": 2.0, "webhook_max_attempts": 3, "webhook_backoff_s": 0.5,
    })
    with session_scope(database_url) as session:
        session.execute(delete(WebhookDeliveryRow))


@pytest.fixture
def receiver(hook_settings: Settings) -> Iterator[Receiver]:
    with Receiver(webhooks.webhook_secret(hook_settings)) as server:
        yield server


def finished_run(settings: Settings, dataset_id: uuid.UUID, url: str, status: str = "succeeded") -> uuid.UUID:
    """A run taken to ``status`` through the lifecycle, which queues its webhook."""
    with session_scope(settings.sqlalchemy_url) as session:
        run = RunRow(dataset_id=dataset_id, spec={"task": "classification"}, epochs_total=1, callback_url=url)
        session.add(run)
        session.flush()
        assert lifecycle.transition(session, run.id, "running", expected=["queued"])
        values = {"epochs_done": 1} if status == "succeeded" else {"error": "diverged: loss is NaN"}
        assert lifecycle.transition(session, run.id, status, expected=["running"], values=values)
        return run.id


def deliveries(settings: Settings, run_id: uuid.UUID) -> list[webhooks.DeliveryRead]:
    with get_sessionmaker(settings.sqlalchemy_url)() as session:
        return webhooks.list_deliveries(session, run_id)


def test_terminal_event_is_delivered_signed(hook_settings: Settings, dataset_id, receiver: Receiver) -> None:
    run_id = finished_run(hook_settings, dataset_id, receiver.url)
    [queued] = deliveries(hook_settings, run_id)
    assert queued.status == "pending" and queued.attempts == 0 and queued.event_type == "run.succeeded"

    assert webhooks.deliver_due(hook_settings) == 1
    [request] = receiver.received
    assert request.verified
    assert request.headers["Content-Type"] == "application/json"
    assert request.headers["User-Agent"] == "mcdrop-webhooks"
    assert request.headers["Mcdrop-Event-Id"] == queued.event_id
    assert request.body == webhooks.canonical_json(request.payload)
    payload = request.payload
    assert payload["id"] == queued.event_id and payload["id"].startswith("evt_")
    assert payload["type"] == "run.succeeded"
    assert datetime.fromisoformat(payload["created_at"]).tzinfo is not None
    run = payload["run"]
    assert run["id"] == str(run_id) and run["dataset_id"] == str(dataset_id)
    assert run["status"] == "succeeded" and run["epochs_done"] == 1 and run["epochs_total"] == 1
    assert run["error"] is None and datetime.fromisoformat(run["finished_at"]).tzinfo is not None

    [delivered] = deliveries(hook_settings, run_id)
    assert delivered.status == "delivered" and delivered.attempts == 1
    assert delivered.last_status_code == 200 and delivered.delivered_at is not None
    assert webhooks.deliver_due(hook_settings) == 0  # nothing left to send
    assert len(receiver.received) == 1


def test_failed_attempt_is_retried_after_backoff(hook_settings: Settings, dataset_id, receiver: Receiver) -> None:
    receiver.responses = [500, 200]
    run_id = finished_run(hook_settings, dataset_id, receiver.url, status="failed")
    now = utcnow()
    assert webhooks.deliver_due(hook_settings, now=now) == 1
    [first] = deliveries(hook_settings, run_id)
    assert first.status == "pending" and first.attempts == 1
    assert first.last_status_code == 500 and first.last_error.startswith("HTTP 500")
    backoff = hook_settings.webhook_backoff_s
    assert now + timedelta(seconds=0.5 * backoff) <= first.next_attempt_at <= now + timedelta(seconds=backoff)
    assert webhooks.deliver_due(hook_settings, now=now) == 0  # not due yet

    assert webhooks.deliver_due(hook_settings, now=first.next_attempt_at) == 1
    [second] = deliveries(hook_settings, run_id)
    assert second.status == "delivered" and second.attempts == 2 and second.last_status_code == 200
    assert [r.headers["Mcdrop-Event-Id"] for r in receiver.received] == [first.event_id] * 2
    assert all(r.verified for r in receiver.received)
    assert receiver.received[0].payload["type"] == "run.failed"
    assert receiver.received[0].payload["run"]["error"] == "diverged: loss is NaN"


def test_gives_up_after_the_last_attempt(hook_settings: Settings, dataset_id, receiver: Receiver) -> None:
    receiver.responses = [302, 503]  # a redirect is not followed: it is a failed attempt
    run_id = finished_run(hook_settings, dataset_id, receiver.url)
    now = utcnow()
    for attempt in range(1, hook_settings.webhook_max_attempts + 1):
        assert webhooks.deliver_due(hook_settings, now=now) == 1
        [delivery] = deliveries(hook_settings, run_id)
        assert delivery.attempts == attempt
        now = delivery.next_attempt_at
    assert delivery.status == "failed" and delivery.last_status_code == 503
    assert len(receiver.received) == hook_settings.webhook_max_attempts
    assert all(r.headers["Host"].startswith("127.0.0.1") for r in receiver.received)
    assert webhooks.deliver_due(hook_settings, now=now + timedelta(days=1)) == 0


def test_connection_refused_is_a_failed_attempt(hook_settings: Settings, dataset_id) -> None:
    run_id = finished_run(hook_settings, dataset_id, f"http://127.0.0.1:{free_port()}/hooks")
    assert webhooks.deliver_due(hook_settings) == 1
    [delivery] = deliveries(hook_settings, run_id)
    assert delivery.status == "pending" and delivery.attempts == 1
    assert delivery.last_status_code is None and delivery.last_error.startswith("ConnectError")


def test_concurrent_deliverers_send_each_event_once(hook_settings: Settings, dataset_id, receiver: Receiver) -> None:
    receiver.delay_s = 0.1
    run_ids = [finished_run(hook_settings, dataset_id, receiver.url) for _ in range(4)]
    start = threading.Barrier(4)
    attempts: list[int] = []

    def deliver() -> None:
        start.wait()
        attempts.append(webhooks.deliver_due(hook_settings))

    threads = [threading.Thread(target=deliver) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert sum(attempts) == len(run_ids)
    event_ids = [r.headers["Mcdrop-Event-Id"] for r in receiver.received]
    assert len(event_ids) == len(set(event_ids)) == len(run_ids)
    for run_id in run_ids:
        [delivery] = deliveries(hook_settings, run_id)
        assert delivery.status == "delivered" and delivery.attempts == 1


def test_a_slow_receiver_never_holds_up_a_workers_lease(hook_settings: Settings, dataset_id, receiver: Receiver) -> None:
    """A worker's reconciler waits out a receiver's full timeout in a thread of its own: the
    lease on the run the worker is training is renewed all the while (a lapsed lease under a
    live worker hands the run out again)."""
    from workers.daemon import WorkerDaemon

    settings = hook_settings.model_copy(update={"webhook_timeout_s": 2 * hook_settings.lease_s})
    receiver.delay_s = settings.webhook_timeout_s + 1.0  # every attempt outlasts the lease
    finished_run(settings, dataset_id, receiver.url)  # a due delivery for the reconciler
    with session_scope(settings.sqlalchemy_url) as session:
        run = RunRow(dataset_id=dataset_id, spec={"task": "classification"}, epochs_total=1)
        session.add(run)
        session.flush()
        run_id = run.id
    daemon = WorkerDaemon(settings, ["cpu"], "cpu")
    attempt = daemon.track(run_id)
    with session_scope(settings.sqlalchemy_url) as session:
        assert lifecycle.claim(session, run_id, owner=attempt.owner, worker=daemon.name, device="cpu",
                               lease_s=settings.lease_s)
    attempt.claimed.set()
    daemon.start()
    try:
        deadline = time.monotonic() + 2.5 * settings.lease_s
        while time.monotonic() < deadline:
            with session_scope(settings.sqlalchemy_url) as session:
                row = session.get(RunRow, run_id)
                assert row is not None and row.status == "running" and row.lease_owner == attempt.owner
                assert row.lease_expires_at > utcnow(), "the lease lapsed under a live worker"
            time.sleep(0.1)
        assert receiver.received, "the reconciler was waiting on the receiver meanwhile"
        assert not attempt.lost.is_set()
    finally:
        daemon.untrack(attempt)
        daemon.stop()
