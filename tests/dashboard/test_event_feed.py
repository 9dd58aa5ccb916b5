"""GET /v1/events and ``service.runs.event_feed``: one tenant's events of all its runs, live,
each once, also when transactions commit out of id order (two workers at once on PostgreSQL)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import anyio
import pytest
from fastapi.testclient import TestClient

from service.config import Settings
from service.db import get_sessionmaker
from service.runs import event_feed
from service.runs.events import RunEventRead
from service.runs.lifecycle import add_event
from tests.conftest import make_key
from tests.factories import make_dataset


def _cancelled_run(client: TestClient, dataset_id: str, headers: dict[str, str] | None = None) -> uuid.UUID:
    """A run that no worker will train (cancelled while queued), to hang events on."""
    body = {"dataset_id": dataset_id, "training": {"epochs": 1}}
    run = client.post("/v1/runs", json=body, headers=headers or {})
    assert run.status_code == 202, run.text
    cancelled = client.post(f"/v1/runs/{run.json()['id']}/cancel", headers=headers or {})
    assert cancelled.status_code == 200, cancelled.text
    return uuid.UUID(run.json()["id"])


async def _next(events: AsyncIterator[RunEventRead], timeout: float) -> RunEventRead | None:
    """The next event, or None if none comes within ``timeout`` seconds."""
    with anyio.move_on_after(timeout):
        return await events.__anext__()
    return None


def test_feed_delivers_late_commits_once_and_only_the_tenants_runs(client: TestClient, settings: Settings) -> None:
    url = settings.sqlalchemy_url
    tenant = f"feed-{uuid.uuid4().hex[:8]}"
    mine = {"Authorization": f"Bearer {make_key(settings, tenant)}"}
    dataset = client.post("/v1/datasets", json={"name": "iris", "builtin": "iris"}, headers=mine).json()
    first, second = _cancelled_run(client, dataset["id"], mine), _cancelled_run(client, dataset["id"], mine)
    stranger = _cancelled_run(client, make_dataset(client, "iris")["id"])  # tenant "default"

    async def scenario() -> tuple[int, int, list[RunEventRead]]:
        feed = event_feed.Feed(url, tenant, poll_interval_s=0.05)
        start = await feed.start()
        delivered: list[RunEventRead] = []
        stop = anyio.Event()

        async def consume() -> None:  # as the SSE response does: polling all the time
            async for event in feed.events(stop=stop):
                delivered.append(event)

        async def wait_for(count: int) -> None:
            with anyio.fail_after(5):
                while len(delivered) < count:
                    await anyio.sleep(0.02)

        async with anyio.create_task_group() as tasks:
            tasks.start_soon(consume)
            with get_sessionmaker(url)() as early, get_sessionmaker(url)() as late:
                # ``early`` takes its id first but commits last, as a slow worker's transaction would.
                taken_first = add_event(early, first, "epoch", "running", {"epoch": 1})
                early.flush()
                add_event(late, second, "epoch", "running", {"epoch": 2})
                late.commit()
                with get_sessionmaker(url)() as other:
                    add_event(other, stranger, "epoch", "running", {"epoch": 3})
                    other.commit()
                await wait_for(1)
                await anyio.sleep(0.5)  # many polls go by before the slow transaction commits
                early.commit()
                await wait_for(2)
            await anyio.sleep(0.5)  # more polls: nothing twice, nothing of another tenant
            stop.set()
        return start, taken_first.id, delivered

    start, early_id, delivered = anyio.run(scenario)
    assert [(event.run_id, event.data["epoch"]) for event in delivered] == [(second, 2), (first, 1)]
    assert start < early_id == delivered[1].id < delivered[0].id


def test_feed_resumes_after_an_id_and_filters_by_kind(client: TestClient, settings: Settings) -> None:
    url = settings.sqlalchemy_url
    tenant = f"feed-{uuid.uuid4().hex[:8]}"
    mine = {"Authorization": f"Bearer {make_key(settings, tenant)}"}
    dataset = client.post("/v1/datasets", json={"name": "iris", "builtin": "iris"}, headers=mine).json()
    _cancelled_run(client, dataset["id"], mine)

    async def scenario() -> tuple[list[str], list[str]]:
        trains = event_feed.Feed(url, tenant, kind="train", poll_interval_s=0.05)
        await trains.start(after_id=0)  # a resuming client: the run's whole history
        events = trains.events()
        history = []
        while (event := await _next(events, 1)) is not None:
            history.append(event.status)
        await events.aclose()
        sweeps = event_feed.Feed(url, tenant, kind="sweep", poll_interval_s=0.05)
        await sweeps.start(after_id=0)
        events = sweeps.events()
        none = [e.status for e in [await _next(events, 0.3)] if e is not None]
        await events.aclose()
        return history, none

    history, sweep_events = anyio.run(scenario)
    assert history == ["queued", "cancelled"], history
    assert sweep_events == []


@pytest.mark.parametrize(("query", "headers", "status"), [
    ("?kind=everything", {}, 422),
    ("?after=-1", {}, 422),
    ("", {"Last-Event-ID": "not-an-id"}, 422),
])
def test_bad_requests_to_the_feed_are_422_problems(
    client: TestClient, query: str, headers: dict[str, str], status: int,
) -> None:
    response = client.get(f"/v1/events{query}", headers=headers)
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")


def test_the_feed_needs_an_api_key(settings: Settings) -> None:
    from service.api.app import create_app

    response = TestClient(create_app(settings)).get("/v1/events")
    assert response.status_code == 401
    assert response.headers["www-authenticate"].startswith("Bearer")
