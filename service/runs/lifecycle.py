"""The run state machine, in one place.

    queued -> running -> succeeded | failed | cancelled
    queued -> cancelled | failed
    running -> queued          (lease expired, or the worker shut down: trained again)

Every transition is a compare-and-set UPDATE (so concurrent workers, reconcilers and API
replicas cannot both win) and writes a ``run_events`` row in the same transaction. Terminal
transitions also queue the run's webhook delivery in that transaction, so none is lost.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from datetime import timedelta
from typing import Any

from sqlalchemy import ColumnElement, or_, select, update
from sqlalchemy.orm import Session

from service.db import utcnow
from service.jobs import webhooks
from service.runs.models import RunEventRow, RunRow, RunStatus

S = RunStatus
ALLOWED: dict[str, frozenset[str]] = {
    S.QUEUED: frozenset({S.RUNNING, S.CANCELLED, S.FAILED}),
    S.RUNNING: frozenset({S.SUCCEEDED, S.FAILED, S.CANCELLED, S.QUEUED}),
    S.SUCCEEDED: frozenset(),
    S.FAILED: frozenset(),
    S.CANCELLED: frozenset(),
}


class InvalidTransition(ValueError):
    pass


def add_event(session: Session, run_id: uuid.UUID, kind: str, status: str, data: dict[str, Any]) -> RunEventRow:
    event = RunEventRow(run_id=run_id, kind=kind, status=status, data=data, created_at=utcnow())
    session.add(event)
    return event


def transition(
    session: Session,
    run_id: uuid.UUID,
    to: str,
    *,
    expected: Iterable[str],
    owner: str | None = None,
    values: dict[str, Any] | None = None,
    event: dict[str, Any] | None = None,
    where: Iterable[ColumnElement[bool]] = (),
) -> bool:
    """Move the run from one of ``expected`` to ``to``; False (and nothing written) if it was
    not in an expected state or, with ``owner``, no longer held by that lease owner.

    The caller commits (so a transition joins the rest of its unit of work).
    """
    expected = tuple(expected)
    for source in expected:
        if to not in ALLOWED[source]:
            raise InvalidTransition(f"{source} -> {to} is not a run transition")
    now = utcnow()
    fields: dict[str, Any] = {"status": to, "updated_at": now, **(values or {})}
    if to in S.TERMINAL:
        fields.setdefault("finished_at", now)
        fields.update(lease_owner=None, lease_expires_at=None)
    statement = update(RunRow).where(RunRow.id == run_id, RunRow.status.in_(expected))
    if owner is not None:
        statement = statement.where(RunRow.lease_owner == owner)
    for condition in where:
        statement = statement.where(condition)
    if session.execute(statement.values(**fields)).rowcount != 1:
        return False
    data = dict(event or {})
    if len(expected) == 1:
        data.setdefault("previous", expected[0])
    data["status"] = to
    added = add_event(session, run_id, "status", to, data)
    if to in S.TERMINAL:
        session.flush()  # the event's id
        row = session.get(RunRow, run_id, populate_existing=True)
        if row is not None and row.callback_url:
            webhooks.queue_delivery(session, row, added)
    return True


def claim(
    session: Session, run_id: uuid.UUID, *, owner: str, worker: str, device: str, lease_s: float
) -> bool:
    """queued -> running, or take over a running run whose lease expired (its worker is gone).

    At most one caller wins; the winner holds the lease until it expires or is renewed.
    """
    now = utcnow()
    statement = (
        update(RunRow)
        .where(
            RunRow.id == run_id,
            RunRow.cancel_requested.is_(False),
            or_(
                RunRow.status == S.QUEUED,
                (RunRow.status == S.RUNNING) & (RunRow.lease_expires_at < now),
            ),
        )
        .values(
            status=S.RUNNING, lease_owner=owner, lease_expires_at=now + timedelta(seconds=lease_s),
            worker=worker, device=device, started_at=now, updated_at=now, attempts=RunRow.attempts + 1,
        )
    )
    if session.execute(statement).rowcount != 1:
        return False
    add_event(session, run_id, "status", S.RUNNING, {"status": S.RUNNING, "worker": worker, "device": device})
    return True


def renew_lease(session: Session, run_id: uuid.UUID, owner: str, lease_s: float) -> tuple[bool, bool]:
    """Extend the lease; returns (still held, cancel requested)."""
    now = utcnow()
    held = session.execute(
        update(RunRow)
        .where(RunRow.id == run_id, RunRow.lease_owner == owner, RunRow.status == S.RUNNING)
        .values(lease_expires_at=now + timedelta(seconds=lease_s))
    ).rowcount == 1
    cancel = bool(session.scalar(select(RunRow.cancel_requested).where(RunRow.id == run_id)))
    return held, cancel


def expire_leases(session: Session) -> list[uuid.UUID]:
    """running runs whose lease ran out (their worker died) go back to queued."""
    now = utcnow()
    candidates = list(session.scalars(
        select(RunRow.id).where(RunRow.status == S.RUNNING, RunRow.lease_expires_at < now)
    ))
    requeued = []
    for run_id in candidates:
        moved = transition(
            session, run_id, S.QUEUED, expected=[S.RUNNING],
            values={"lease_owner": None, "lease_expires_at": None, "worker": None, "dispatched_at": None},
            event={"reason": "lease expired: the worker stopped heartbeating"},
            where=[RunRow.lease_expires_at < now],  # not renewed in the meantime
        )
        if moved:
            requeued.append(run_id)
    return requeued
