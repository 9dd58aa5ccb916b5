"""A run's event history (``run_events``), read in id order: the source of its SSE stream.

Reading "the events after id N" is enough to follow a run from any process, because every
writer of a run's events first UPDATEs the run's row in the same transaction (``transition``,
``claim``, ``record_epoch``): the row lock serialises them, so a run's event ids become visible
in increasing order and a reader that has seen id N never misses a later commit with a
smaller id.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any, Literal

import anyio
import anyio.to_thread
from pydantic import BaseModel, ConfigDict
from sqlalchemy import select
from sqlalchemy.orm import Session

from service.db import get_sessionmaker
from service.runs.models import RunEventRow, RunRow, RunStatus

EventKind = Literal["status", "epoch"]


class RunEventRead(BaseModel):
    """One state change (``kind="status"``) or one finished epoch (``kind="epoch"``);
    ``status`` is the run's status after the event."""

    model_config = ConfigDict(from_attributes=True)

    id: int
    run_id: uuid.UUID
    kind: EventKind
    status: str
    data: dict[str, Any]
    created_at: datetime

    @property
    def is_terminal(self) -> bool:
        return self.status in RunStatus.TERMINAL


def events_after(session: Session, run_id: uuid.UUID, after_id: int, limit: int = 500) -> list[RunEventRead]:
    """The run's events with an id greater than ``after_id``, oldest first, at most ``limit``."""
    rows = session.scalars(
        select(RunEventRow)
        .where(RunEventRow.run_id == run_id, RunEventRow.id > after_id)
        .order_by(RunEventRow.id)
        .limit(limit)
    )
    return [RunEventRead.model_validate(row) for row in rows]


def run_status(session: Session, run_id: uuid.UUID) -> str | None:
    """The run's current status, or None when there is no such run."""
    return session.scalar(select(RunRow.status).where(RunRow.id == run_id))


def poll(url: str, run_id: uuid.UUID, after_id: int, limit: int = 500) -> tuple[str | None, list[RunEventRead]]:
    """One short session: the run's status (None: no such run), then its events after ``after_id``.

    The status is read first: when it is terminal, the terminal event (committed with it) is
    among the events read after it.
    """
    with get_sessionmaker(url)() as session:
        status = run_status(session, run_id)
        return status, events_after(session, run_id, after_id, limit) if status is not None else []


async def follow(
    url: str, run_id: uuid.UUID, after_id: int = 0, *, poll_interval_s: float = 0.25, limit: int = 500,
    stop: anyio.Event | None = None,
) -> AsyncIterator[RunEventRead]:
    """The run's events after ``after_id``, history first, then live as they are committed by
    any process; ends after a terminal event, at once if the run is already terminal (or gone),
    or when ``stop`` is set (checked between polls).

    Polls the database with a short session in a worker thread; no session is held while
    waiting. Database errors propagate (the caller ends its stream; clients resume from the
    last id they saw).
    """
    cursor = after_id
    while True:
        status, events = await anyio.to_thread.run_sync(poll, url, run_id, cursor, limit)
        for event in events:
            yield event
            cursor = event.id
            if event.is_terminal:
                return
        if len(events) == limit:
            continue  # more history waiting
        if status is None or status in RunStatus.TERMINAL:
            return
        if stop is None:
            await anyio.sleep(poll_interval_s)
            continue
        with anyio.move_on_after(poll_interval_s):
            await stop.wait()
        if stop.is_set():
            return
