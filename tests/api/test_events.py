"""GET /v1/runs/{run_id}/events (Server-Sent Events) and ``service.watch``.

The stream is served by the API in a subprocess and read by a real HTTP client in another
subprocess, while this process writes the run's events the way workers do (lifecycle
functions, committed) — so what is tested is delivery across processes through the database.
"""

from __future__ import annotations

import io
import json
import logging
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from rich.console import Console
from sqlalchemy.exc import OperationalError

from service.api.app import create_app
from service.api.routes import events as events_routes
from service.config import Settings
from service.db import session_scope
from service.runs import events as run_events
from service.runs.lifecycle import add_event, transition
from service.watch import WatchError, parse_event_stream, watch
from tests.api.test_datasets import assert_problem
from tests.conftest import Process, free_port, settings_env
from tests.factories import TEXTBOOK_TRAINING, make_dataset, make_run

EVENTS_PATH = "/v1/runs/{run_id}/events"

# Serves create_app() with the events router (included here until app.py includes it).
SERVE_WITH_EVENTS = """
import sys, uvicorn
from service.api.app import create_app
from service.api.routes import events
app = create_app()
if not any(getattr(route, "path", "") == "/v1/runs/{run_id}/events" for route in app.routes):
    app.include_router(events.router)
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="info")
"""

# A real HTTP client in its own process: one JSON line per SSE message, then {"closed": true}.
READER = """
import json, sys, httpx
url, last_event_id = sys.argv[1], sys.argv[2]
headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
headers["Authorization"] = "Bearer " + sys.argv[3]
with httpx.stream("GET", url, headers=headers, timeout=httpx.Timeout(5.0, read=30.0)) as response:
    print(json.dumps({"connected": response.status_code, "content_type": response.headers["content-type"]}), flush=True)
    message = {}
    for line in response.iter_lines():
        if line.startswith(":"):
            continue
        if not line:
            if message:
                print(json.dumps(message), flush=True)
            message = {}
            continue
        field, _, value = line.partition(":")
        message[field] = value[1:] if value.startswith(" ") else value
print(json.dumps({"closed": True}), flush=True)
"""


@pytest.fixture(scope="module")
def server(settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The API in its own process; ``mcdrop serve`` once app.py includes the events router."""
    port = free_port()
    included = any(getattr(route, "path", "") == EVENTS_PATH for route in create_app(settings).routes)
    args = (
        [sys.executable, "-m", "service.cli", "serve", "--host", "127.0.0.1", "--port", str(port)] if included
        else [sys.executable, "-c", SERVE_WITH_EVENTS, str(port)]
    )
    process = Process(args, settings_env(settings), tmp_path_factory.mktemp("events") / "api.log")
    try:
        process.wait_for_output("Uvicorn running on", timeout=60)  # printed once the port is bound
        yield f"http://127.0.0.1:{port}"
    finally:
        process.stop()


@pytest.fixture(scope="module")
def dataset(client: TestClient) -> dict:
    return make_dataset(client, "iris")


def new_run(client: TestClient, dataset: dict) -> uuid.UUID:
    run = make_run(client, dataset["id"], training={**TEXTBOOK_TRAINING, "epochs": 3})
    assert run["status"] == "queued"
    return uuid.UUID(run["id"])


def epoch_data(epoch: int) -> dict[str, Any]:
    return {
        "epoch": epoch, "epochs_total": 3, "train_loss": 1.0 / epoch, "val_loss": 1.1 / epoch,
        "train_accuracy": 0.5 + 0.1 * epoch, "val_accuracy": 0.45 + 0.1 * epoch,
        "train_rmse": None, "val_rmse": None, "duration_s": 0.01,
    }


def start_running(settings: Settings, run_id: uuid.UUID) -> None:
    with session_scope(settings.sqlalchemy_url) as session:
        assert transition(session, run_id, "running", expected=["queued"], event={"worker": "test"})


def finish_epoch(settings: Settings, run_id: uuid.UUID, epoch: int) -> None:
    with session_scope(settings.sqlalchemy_url) as session:
        add_event(session, run_id, "epoch", "running", epoch_data(epoch))


def succeed(settings: Settings, run_id: uuid.UUID) -> None:
    with session_scope(settings.sqlalchemy_url) as session:
        assert transition(session, run_id, "succeeded", expected=["running"])


def train_quickly(settings: Settings, run_id: uuid.UUID) -> None:
    """What a worker writes for a 3-epoch run that succeeds."""
    start_running(settings, run_id)
    for epoch in (1, 2, 3):
        finish_epoch(settings, run_id, epoch)
    succeed(settings, run_id)


def start_reader(settings: Settings, url: str, log_path: Path, api_key: str, last_event_id: str = "") -> Process:
    reader = Process([sys.executable, "-c", READER, url, last_event_id, api_key], settings_env(settings), log_path)
    reader.wait_for_output('"connected"', timeout=20)
    return reader


def lines_of(reader: Process) -> list[dict[str, Any]]:
    lines = []
    for line in reader.output().splitlines():
        try:
            lines.append(json.loads(line))
        except ValueError:
            continue
    return lines


def messages_of(reader: Process) -> list[dict[str, Any]]:
    return [line for line in lines_of(reader) if "event" in line]


def wait_for_messages(reader: Process, count: int, timeout: float = 10) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while len(messages := messages_of(reader)) < count:
        assert time.monotonic() < deadline, f"{len(messages)} of {count} messages:\n{reader.output()}"
        time.sleep(0.05)
    return messages


def read_to_end(reader: Process, timeout: float = 10) -> list[dict[str, Any]]:
    """The stream must close by itself: the reader then exits."""
    assert reader.popen.wait(timeout=timeout) == 0, reader.output()
    reader.stop()
    lines = lines_of(reader)
    assert lines[0]["connected"] == 200 and lines[0]["content_type"].startswith("text/event-stream")
    assert lines[-1] == {"closed": True}, reader.output()
    return messages_of(reader)


def assert_well_formed(messages: list[dict[str, Any]], run_id: uuid.UUID) -> list[dict[str, Any]]:
    """Every message's id and event name match its data; ids increase. Returns the data."""
    events = [json.loads(message["data"]) for message in messages]
    for message, event in zip(messages, events, strict=True):
        assert message["id"] == str(event["id"]) and message["event"] == event["kind"]
        assert event["run_id"] == str(run_id)
        run_events.RunEventRead.model_validate(event)
    ids = [event["id"] for event in events]
    assert ids == sorted(set(ids)), ids
    return events


def test_a_reader_in_another_process_gets_live_events_in_order_then_resumes(
    server: str, client: TestClient, settings: Settings, dataset: dict, tmp_path: Path, api_key: str,
) -> None:
    run_id = new_run(client, dataset)
    url = server + EVENTS_PATH.format(run_id=run_id)
    reader = start_reader(settings, url, tmp_path / "reader.log", api_key)
    try:
        wait_for_messages(reader, 1)  # the history: queued
        start_running(settings, run_id)
        wait_for_messages(reader, 2)  # live, while connected
        for epoch in (1, 2, 3):
            finish_epoch(settings, run_id, epoch)
        succeed(settings, run_id)
        events = assert_well_formed(read_to_end(reader), run_id)
    finally:
        reader.stop()
    assert [(event["kind"], event["status"]) for event in events] == [
        ("status", "queued"), ("status", "running"),
        ("epoch", "running"), ("epoch", "running"), ("epoch", "running"), ("status", "succeeded"),
    ]
    assert [event["data"].get("epoch") for event in events[2:5]] == [1, 2, 3]
    assert events[1]["data"] == {"status": "running", "previous": "queued", "worker": "test"}
    assert events[2]["data"] == epoch_data(1)

    # Resume after the 2nd event: exactly the later ones, then the (terminal) stream closes.
    resumed = start_reader(settings, url, tmp_path / "resumed.log", api_key, last_event_id=str(events[1]["id"]))
    try:
        later = assert_well_formed(read_to_end(resumed), run_id)
    finally:
        resumed.stop()
    assert later == events[2:]


def test_a_terminal_run_replays_its_history_and_closes(
    server: str, client: TestClient, settings: Settings, dataset: dict, auth_headers: dict[str, str],
) -> None:
    run_id = new_run(client, dataset)
    train_quickly(settings, run_id)
    url = server + EVENTS_PATH.format(run_id=run_id)
    with httpx.Client(timeout=10, headers=auth_headers) as http:
        everything = http.get(url)
        assert everything.status_code == 200 and everything.headers["cache-control"] == "no-store"
        events = [json.loads(message.data) for message in parse_event_stream(iter(everything.text.splitlines()))]
        assert [event["status"] for event in events] == ["queued", "running", "running", "running", "running", "succeeded"]

        after = http.get(url, params={"after": events[3]["id"]})
        assert [json.loads(m.data)["id"] for m in parse_event_stream(iter(after.text.splitlines()))] == [
            events[4]["id"], events[5]["id"]
        ]
        # Last-Event-ID wins over ?after= (it is what a reconnecting client saw last).
        header = http.get(url, params={"after": 0}, headers={"Last-Event-ID": str(events[4]["id"])})
        assert [m.id for m in parse_event_stream(iter(header.text.splitlines()))] == [str(events[5]["id"])]

        nothing_left = http.get(url, headers={"Last-Event-ID": str(events[-1]["id"])})
        assert nothing_left.status_code == 200 and not list(parse_event_stream(iter(nothing_left.text.splitlines())))


def test_unknown_run_is_404_and_bad_ids_are_422(
    server: str, client: TestClient, dataset: dict, auth_headers: dict[str, str],
) -> None:
    with httpx.Client(base_url=server, timeout=10, headers=auth_headers) as http:
        assert_problem(http.get(EVENTS_PATH.format(run_id=uuid.uuid4())), 404)
        assert_problem(http.get(EVENTS_PATH.format(run_id="not-a-uuid")), 422, loc=["path", "run_id"])
        run_path = EVENTS_PATH.format(run_id=new_run(client, dataset))
        for bad in ("abc", "-1", "1.5", "99999999999999999999"):
            body = assert_problem(http.get(run_path, headers={"Last-Event-ID": bad}), 422, loc=["header", "Last-Event-ID"])
            assert "Last-Event-ID" in body["detail"]
        assert_problem(http.get(run_path, params={"after": "-3"}), 422, loc=["query", "after"])


def test_watch_follows_a_live_run_to_succeeded(
    server: str, client: TestClient, settings: Settings, dataset: dict, auth_headers: dict[str, str],
) -> None:
    run_id = new_run(client, dataset)
    output = io.StringIO()
    result: dict[str, Any] = {}

    def follow() -> None:
        try:
            result["status"] = watch(server, str(run_id), console=Console(file=output, width=160), headers=auth_headers)
        except BaseException as exc:  # reported by the assertion below
            result["error"] = exc

    thread = threading.Thread(target=follow)
    thread.start()
    time.sleep(0.3)
    train_quickly(settings, run_id)
    thread.join(timeout=15)
    assert not thread.is_alive()
    assert result == {"status": "succeeded"}, result
    assert "succeeded" in output.getvalue() and "val_accuracy" in output.getvalue()

    with pytest.raises(WatchError, match="404"):
        watch(server, str(uuid.uuid4()), console=Console(file=io.StringIO()), headers=auth_headers)


def sse(event_id: int, kind: str, status: str, data: dict[str, Any]) -> bytes:
    payload = {"id": event_id, "run_id": str(uuid.UUID(int=1)), "kind": kind, "status": status,
               "data": data, "created_at": "2024-01-01T00:00:00Z"}
    return f"id: {event_id}\r\nevent: {kind}\r\ndata: {json.dumps(payload)}\r\n\r\n".encode()


def test_watch_reconnects_with_last_event_id_after_a_dropped_connection() -> None:
    seen: list[str | None] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers.get("Last-Event-ID"))
        if len(seen) == 1:  # history, then the connection ends before the run does
            body = [sse(1, "status", "running", {"status": "running"}), b": ping\r\n\r\n",
                    sse(2, "epoch", "running", {**epoch_data(1)})]
            return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=iter(body))
        if len(seen) == 2:
            raise httpx.ConnectError("connection refused", request=request)
        return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=iter([
            sse(3, "epoch", "running", epoch_data(2)), sse(4, "status", "failed", {"status": "failed", "error": "boom"}),
        ]))

    output = io.StringIO()
    status = watch("http://api", "run", console=Console(file=output), backoff_s=0.01,
                   transport=httpx.MockTransport(handler))
    assert status == "failed" and seen == [None, "2", "2"]
    assert "boom" in output.getvalue()

    with pytest.raises(WatchError, match="gave up after 2 retries"):
        watch("http://api", "run", console=Console(file=io.StringIO()), retries=2, backoff_s=0.01,
              transport=httpx.MockTransport(lambda request: httpx.Response(503, json={"detail": "down"})))


def test_a_database_outage_ends_the_stream_cleanly(
    client: TestClient, settings: Settings, dataset: dict, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture, auth_headers: dict[str, str],
) -> None:
    run_id = new_run(client, dataset)  # queued: the stream would wait for more
    real_poll = run_events.poll
    calls = []

    def poll_then_fail(*args: Any, **kwargs: Any) -> Any:
        calls.append(args)
        if len(calls) == 1:
            return real_poll(*args, **kwargs)
        raise OperationalError("SELECT", {}, Exception("connection refused\nmore detail"))

    monkeypatch.setattr(run_events, "poll", poll_then_fail)
    app = create_app(settings)
    app.include_router(events_routes.router)
    with caplog.at_level(logging.WARNING), TestClient(app, headers=auth_headers) as test_client:
        with test_client.stream("GET", EVENTS_PATH.format(run_id=run_id)) as response:
            assert response.status_code == 200
            text = response.read().decode()
    messages = list(parse_event_stream(iter(text.splitlines())))
    assert [json.loads(message.data)["status"] for message in messages] == ["queued"]
    assert "retry: 2000" in text and "reconnect with Last-Event-ID" in text
    warnings = [record for record in caplog.records if record.name == events_routes.__name__]
    assert [record.levelno for record in warnings] == [logging.WARNING]
    assert "database unavailable (connection refused)" in warnings[0].getMessage()
    assert not any(record.exc_info for record in caplog.records)
