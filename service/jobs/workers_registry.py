"""Workers as seen through their heartbeats, and queue depths, for GET /v1/queue."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta

from pydantic import BaseModel
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from service.db import utcnow
from service.jobs.models import WorkerRow
from service.runs.models import RunRow, RunStatus


def heartbeat(
    session: Session, *, name: str, hostname: str, pid: int, queues: list[str], device: str,
    current_run_id: uuid.UUID | None,
) -> None:
    now = utcnow()
    row = session.get(WorkerRow, name)
    if row is None:
        session.add(WorkerRow(name=name, hostname=hostname, pid=pid, queues=queues, device=device,
                              current_run_id=current_run_id, started_at=now, last_seen_at=now))
    else:
        row.queues, row.device, row.current_run_id, row.last_seen_at = queues, device, current_run_id, now
    session.commit()


class QueueDepth(BaseModel):
    queue: str
    queued: int
    running: int


class WorkerRead(BaseModel):
    name: str
    hostname: str
    pid: int
    queues: list[str]
    device: str
    current_run_id: uuid.UUID | None
    started_at: datetime
    last_seen_at: datetime
    seconds_since_seen: float


class QueueRead(BaseModel):
    queues: list[QueueDepth]
    workers: list[WorkerRead]


def overview(session: Session, seen_within_s: float, tenant_id: str) -> QueueRead:
    """Depth per queue from our own tables (the source of truth), and recently seen workers.

    Depths count every tenant's jobs (the queues are shared); a worker's current run id is
    shown only to the tenant that owns the run."""
    counts: dict[str, dict[str, int]] = {}
    rows = session.execute(
        select(RunRow.queue, RunRow.status, func.count())
        .where(RunRow.status.in_([RunStatus.QUEUED, RunStatus.RUNNING]))
        .group_by(RunRow.queue, RunRow.status)
    )
    for queue, status, count in rows:
        counts.setdefault(queue, {"queued": 0, "running": 0})[status] = count
    for queue in ("cpu", "cuda"):
        counts.setdefault(queue, {"queued": 0, "running": 0})
    now = utcnow()
    busy = [w for w in session.scalars(select(WorkerRow.current_run_id).where(WorkerRow.current_run_id.is_not(None)))]
    own = set(session.scalars(select(RunRow.id).where(RunRow.id.in_(busy), RunRow.tenant_id == tenant_id))) if busy else set()
    workers = session.scalars(
        select(WorkerRow).where(WorkerRow.last_seen_at >= now - timedelta(seconds=seen_within_s))
        .order_by(WorkerRow.name)
    )
    return QueueRead(
        queues=[QueueDepth(queue=q, **c) for q, c in sorted(counts.items())],
        workers=[
            WorkerRead(
                name=w.name, hostname=w.hostname, pid=w.pid, queues=w.queues, device=w.device,
                current_run_id=w.current_run_id if w.current_run_id in own else None, started_at=w.started_at, last_seen_at=w.last_seen_at,
                seconds_since_seen=(now - w.last_seen_at).total_seconds(),
            )
            for w in workers
        ],
    )
