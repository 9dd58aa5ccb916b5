"""All of a tenant's run events in one stream: what a dashboard's runs table follows.

A single run's events become visible in id order (see ``service.runs.events``), but events of
*different* runs do not: on PostgreSQL two workers' transactions take ids from one sequence
and may commit in the other order, so a reader that has seen id N can later find a new event
with an id below N. The feed therefore re-reads a short window below its newest id
(``LATE_COMMIT_WINDOW_S``) and remembers which ids in that window it has already delivered:
an event whose transaction commits up to that long after it took its id is still delivered,
exactly once. (SQLite serialises writers, so there every commit is in id order anyway.)
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any, Literal

import anyio
import anyio.to_thread
from sqlalchemy import Select, func, select
from sqlalchemy.orm import Session

from service.db import get_sessionmaker, utcnow
from service.runs.events import RunEventRead
from service.runs.models import RunEventRow, RunRow

JobKind = Literal["train", "sweep", "predict"]  # predict: batch prediction jobs

LATE_COMMIT_WINDOW_S = 10.0


def _scoped(statement: Select[Any], tenant_id: str, kind: JobKind | None) -> Select[Any]:
    """``statement`` over run_events, limited to the events of the tenant's runs (of ``kind``)."""
    statement = (statement.select_from(RunEventRow).join(RunRow, RunRow.id == RunEventRow.run_id)
                 .where(RunRow.tenant_id == tenant_id))
    return statement.where(RunRow.kind == kind) if kind is not None else statement


def starting_point(
    session: Session, tenant_id: str, *, kind: JobKind | None = None, window_s: float = LATE_COMMIT_WINDOW_S,
) -> tuple[int, int, set[int]]:
    """Where a feed that starts "now" begins: ``(newest id, floor, ids already there above floor)``.

    ``floor`` is the newest id of the events created more than ``window_s`` ago; the ids
    between it and the newest are taken as seen, so a late commit in that range is still new.
    """
    newest = session.scalar(_scoped(select(func.max(RunEventRow.id)), tenant_id, kind)) or 0
    floor = session.scalar(_scoped(select(func.max(RunEventRow.id)), tenant_id, kind).where(
        RunEventRow.created_at < utcnow() - timedelta(seconds=window_s))) or 0
    recent = set(session.scalars(_scoped(select(RunEventRow.id), tenant_id, kind).where(RunEventRow.id > floor)))
    return newest, floor, recent


class Feed:
    """A live feed of one tenant's events: ``await start(after_id)``, then ``async for ... in events()``.

    Each event is yielded once, including one whose transaction commits up to ``window_s``
    after it took its id. Database errors propagate; no session is held while waiting.
    """

    def __init__(
        self, url: str, tenant_id: str, *, kind: JobKind | None = None, poll_interval_s: float = 0.5,
        limit: int = 500, window_s: float = LATE_COMMIT_WINDOW_S,
    ) -> None:
        self.url, self.tenant_id, self.kind = url, tenant_id, kind
        self.poll_interval_s, self.limit, self.window_s = poll_interval_s, limit, window_s
        self.newest = 0  # the highest id delivered (or skipped as older than the start)
        self.floor = 0  # no id at or below this one is looked at again
        self._seen: set[int] = set()  # ids above ``floor`` already delivered
        self._marks: deque[tuple[float, int]] = deque()  # (when, newest then)

    async def start(self, after_id: int | None = None) -> int:
        """Begin after ``after_id`` (a client resuming), or None: with the next new event.
        Returns the id the feed starts after."""
        if after_id is not None:
            self.newest = self.floor = after_id
            return after_id

        def begin() -> tuple[int, int, set[int]]:
            with get_sessionmaker(self.url)() as session:
                return starting_point(session, self.tenant_id, kind=self.kind, window_s=self.window_s)

        self.newest, self.floor, self._seen = await anyio.to_thread.run_sync(begin)
        return self.newest

    def _read(self) -> list[RunEventRead]:
        """Events committed late below ``newest`` (not yet seen), then new ones above it."""
        with get_sessionmaker(self.url)() as session:
            query = _scoped(select(RunEventRow), self.tenant_id, self.kind)
            window = set(session.scalars(_scoped(select(RunEventRow.id), self.tenant_id, self.kind).where(
                RunEventRow.id > self.floor, RunEventRow.id <= self.newest)))
            late = sorted(window - self._seen)
            rows = list(session.scalars(query.where(RunEventRow.id.in_(late)).order_by(RunEventRow.id))) if late else []
            rows += session.scalars(
                query.where(RunEventRow.id > self.newest).order_by(RunEventRow.id).limit(self.limit)
            )
        return [RunEventRead.model_validate(row) for row in rows]

    def _advance(self) -> None:
        now = time.monotonic()
        self._marks.append((now, self.newest))
        while self._marks and self._marks[0][0] < now - self.window_s:
            self.floor = max(self.floor, self._marks.popleft()[1])
        self._seen = {i for i in self._seen if i > self.floor}

    async def events(self, stop: anyio.Event | None = None) -> AsyncIterator[RunEventRead]:
        """The events after the start, live, until ``stop`` is set (checked between polls)."""
        while stop is None or not stop.is_set():
            events = await anyio.to_thread.run_sync(self._read)
            fresh = 0
            for event in events:
                fresh += event.id > self.newest
                self._seen.add(event.id)
                self.newest = max(self.newest, event.id)
                yield event
            self._advance()
            if fresh == self.limit:
                continue  # more history waiting
            if stop is None:
                await anyio.sleep(self.poll_interval_s)
                continue
            with anyio.move_on_after(self.poll_interval_s):
                await stop.wait()
