"""GET /v1/runs/{run_id}/events: a run's history, then its live events, as Server-Sent Events.

Each message is ``id: <event id>``, ``event: status|epoch``, ``data: <RunEventRead JSON>``.
A client resumes with the ``Last-Event-ID`` header (what EventSource sends when it
reconnects) or ``?after=<id>``; the stream closes after a terminal status event.

GET /v1/events: the same messages for every run of the caller's tenant, live (it never closes
by itself), after a first ``event: ready`` whose id is where the feed starts: a client that
lists the runs *after* it has seen ``ready`` misses nothing (what the dashboard does).
"""

from __future__ import annotations

import json
import logging
import re
import uuid
from collections.abc import AsyncIterator
from typing import Annotated

import anyio
from fastapi import APIRouter, Header, Query
from sqlalchemy.exc import DBAPIError, OperationalError, SQLAlchemyError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sse_starlette import EventSourceResponse, ServerSentEvent

from service.api.deps import CurrentTenant, SettingsDep
from service.db import get_sessionmaker
from service.errors import InvalidInput
from service.runs import event_feed
from service.runs import events as run_events
from service.runs import service as runs

log = logging.getLogger(__name__)

router = APIRouter(tags=["runs"])

POLL_INTERVAL_S = 0.25
PING_INTERVAL_S = 15
SHUTDOWN_GRACE_S = 2.0  # under uvicorn's graceful shutdown timeout (10 s in ``mcdrop serve``)
RECONNECT_AFTER_MS = 2000  # the SSE ``retry:`` hint sent before a stream ends early
MAX_EVENT_ID = 2**63 - 1  # run_events.id is a BIGINT
_EVENT_ID = re.compile(r"[0-9]{1,19}")

STREAM_RESPONSES: dict[int | str, dict] = {
    200: {
        "description": "`text/event-stream`: `id`, `event` (status or epoch), `data` (the event as JSON)",
        "content": {"text/event-stream": {}},
    },
    404: {"description": "no such run"},
    422: {"description": "Last-Event-ID or after is not an event id"},
}


def _last_seen_id(last_event_id: str | None, after: int | None) -> int:
    """Last-Event-ID wins over ``after``: it is what a reconnecting client saw last."""
    if last_event_id is None or not last_event_id.strip():
        return after or 0
    value = last_event_id.strip()
    if not _EVENT_ID.fullmatch(value) or int(value) > MAX_EVENT_ID:
        raise InvalidInput(
            "Last-Event-ID must be the id of an event of this stream (a non-negative integer)",
            errors=[{
                "loc": ["header", "Last-Event-ID"], "msg": "not an event id", "type": "int_parsing",
                "input": last_event_id[:200],
            }],
        )
    return int(value)


def _database_outage(exc: SQLAlchemyError) -> bool:
    return isinstance(exc, (OperationalError, PoolTimeoutError)) or (
        isinstance(exc, DBAPIError) and exc.connection_invalidated
    )


async def _messages(
    url: str, run_id: uuid.UUID, after_id: int, shutdown: anyio.Event,
) -> AsyncIterator[ServerSentEvent]:
    try:
        async for event in run_events.follow(url, run_id, after_id, poll_interval_s=POLL_INTERVAL_S, stop=shutdown):
            yield ServerSentEvent(event.model_dump_json(), event=event.kind, id=str(event.id))
        if shutdown.is_set():
            yield ServerSentEvent(comment="server shutting down; reconnect with Last-Event-ID", retry=RECONNECT_AFTER_MS)
    except SQLAlchemyError as exc:
        # End the stream cleanly: the client reconnects with the last id it saw.
        if _database_outage(exc):
            reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
            log.warning("event stream of run %s ended: database unavailable (%s)", run_id, reason)
        else:
            log.exception("event stream of run %s ended by a database error", run_id)
        yield ServerSentEvent(comment="database unavailable; reconnect with Last-Event-ID", retry=RECONNECT_AFTER_MS)


@router.get("/v1/runs/{run_id}/events", response_class=EventSourceResponse, responses=STREAM_RESPONSES)
def stream_run_events(
    run_id: uuid.UUID,
    settings: SettingsDep,
    tenant: CurrentTenant,
    last_event_id: Annotated[str | None, Header(alias="Last-Event-ID")] = None,
    after: Annotated[int | None, Query(ge=0, le=MAX_EVENT_ID, description="resume after this event id")] = None,
) -> EventSourceResponse:
    """The run's events in order (history, then live), closing after the terminal one."""
    after_id = _last_seen_id(last_event_id, after)
    # Its own short session (not SessionDep's, which would stay open while the response streams).
    with get_sessionmaker(settings.sqlalchemy_url)() as session:
        runs.get_row(session, run_id, tenant)  # NotFound: 404 (also another tenant's run)
    # On server shutdown sse-starlette sets ``shutdown``: the stream ends cleanly (within the
    # grace period) instead of being cut, and the client resumes elsewhere with Last-Event-ID.
    shutdown = anyio.Event()
    return EventSourceResponse(
        _messages(settings.sqlalchemy_url, run_id, after_id, shutdown), ping=PING_INTERVAL_S,
        shutdown_event=shutdown, shutdown_grace_period=SHUTDOWN_GRACE_S,
    )


FEED_POLL_INTERVAL_S = 0.5


async def _feed_messages(
    feed: event_feed.Feed, after_id: int | None, shutdown: anyio.Event,
) -> AsyncIterator[ServerSentEvent]:
    try:
        start = await feed.start(after_id)
        yield ServerSentEvent(json.dumps({"after": start}), event="ready", id=str(start))
        async for event in feed.events(stop=shutdown):
            yield ServerSentEvent(event.model_dump_json(), event=event.kind, id=str(event.id))
        yield ServerSentEvent(comment="server shutting down; reconnect with Last-Event-ID", retry=RECONNECT_AFTER_MS)
    except SQLAlchemyError as exc:
        if _database_outage(exc):
            reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
            log.warning("event feed of tenant %s ended: database unavailable (%s)", feed.tenant_id, reason)
        else:
            log.exception("event feed of tenant %s ended by a database error", feed.tenant_id)
        yield ServerSentEvent(comment="database unavailable; reconnect with Last-Event-ID", retry=RECONNECT_AFTER_MS)


@router.get(
    "/v1/events", response_class=EventSourceResponse,
    responses={
        200: {
            "description": "`text/event-stream`: first `event: ready` (`data: {\"after\": id}`), then `id`, "
                           "`event` (status or epoch) and `data` (the event as JSON) for every run of the caller",
            "content": {"text/event-stream": {}},
        },
        422: {"description": "Last-Event-ID or after is not an event id, or an unknown kind"},
    },
)
def stream_tenant_events(
    settings: SettingsDep,
    tenant: CurrentTenant,
    kind: Annotated[event_feed.JobKind | None, Query(description="only training runs, or only sweeps")] = None,
    last_event_id: Annotated[str | None, Header(alias="Last-Event-ID")] = None,
    after: Annotated[int | None, Query(ge=0, le=MAX_EVENT_ID, description="resume after this event id")] = None,
) -> EventSourceResponse:
    """Every status change and finished epoch of the caller's runs, live; without `after` or
    Last-Event-ID it starts with the next new event. Events that commit out of id order
    (several workers at once) are still delivered, once each."""
    resuming = (last_event_id is not None and last_event_id.strip() != "") or after is not None
    after_id = _last_seen_id(last_event_id, after) if resuming else None
    feed = event_feed.Feed(settings.sqlalchemy_url, tenant, kind=kind, poll_interval_s=FEED_POLL_INTERVAL_S)
    shutdown = anyio.Event()
    return EventSourceResponse(
        _feed_messages(feed, after_id, shutdown), ping=PING_INTERVAL_S,
        shutdown_event=shutdown, shutdown_grace_period=SHUTDOWN_GRACE_S,
    )
