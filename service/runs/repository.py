"""Queries and state transitions on run rows. Transitions are compare-and-set updates."""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from service.db import utcnow
from service.runs.models import RunMetricRow, RunRow, RunStatus, RunWeightsRow


def get(session: Session, run_id: uuid.UUID) -> RunRow | None:
    return session.get(RunRow, run_id)


def latest_metrics(session: Session, run_ids: list[uuid.UUID]) -> dict[uuid.UUID, RunMetricRow]:
    """The newest epoch's metrics of each run, in one query."""
    if not run_ids:
        return {}
    rows = session.scalars(
        select(RunMetricRow)
        .where(RunMetricRow.run_id.in_(run_ids))
        .order_by(RunMetricRow.run_id, RunMetricRow.epoch.desc())
    )
    latest: dict[uuid.UUID, RunMetricRow] = {}
    for row in rows:
        latest.setdefault(row.run_id, row)
    return latest


def metrics(session: Session, run_id: uuid.UUID) -> list[RunMetricRow]:
    return list(session.scalars(
        select(RunMetricRow).where(RunMetricRow.run_id == run_id).order_by(RunMetricRow.epoch)
    ))


def claim(session: Session, run_id: uuid.UUID, *, worker: str, device: str) -> bool:
    """queued -> running, if and only if it is still queued (at most one worker wins)."""
    now = utcnow()
    result = session.execute(
        update(RunRow)
        .where(RunRow.id == run_id, RunRow.status == RunStatus.QUEUED)
        .values(status=RunStatus.RUNNING, worker=worker, device=device, started_at=now, updated_at=now)
    )
    session.commit()
    return result.rowcount == 1


def record_epoch(session: Session, run_id: uuid.UUID, values: dict[str, Any]) -> None:
    session.add(RunMetricRow(run_id=run_id, **values))
    session.execute(
        update(RunRow).where(RunRow.id == run_id).values(epochs_done=values["epoch"], updated_at=utcnow())
    )
    session.commit()


def succeed(
    session: Session, run_id: uuid.UUID, *, network: dict[str, Any], preprocessing: dict[str, Any],
    weights: bytes,
) -> None:
    """Store the weights and mark the run succeeded in one transaction."""
    session.add(RunWeightsRow(
        run_id=run_id, network=network, preprocessing=preprocessing, weights=weights,
        size_bytes=len(weights),
    ))
    now = utcnow()
    session.execute(
        update(RunRow)
        .where(RunRow.id == run_id, RunRow.status == RunStatus.RUNNING)
        .values(status=RunStatus.SUCCEEDED, finished_at=now, updated_at=now, error=None)
    )
    session.commit()


def fail(session: Session, run_id: uuid.UUID, error: str) -> None:
    now = utcnow()
    session.execute(
        update(RunRow)
        .where(RunRow.id == run_id, RunRow.status.in_([RunStatus.QUEUED, RunStatus.RUNNING]))
        .values(status=RunStatus.FAILED, error=error[:4000], finished_at=now, updated_at=now)
    )
    session.commit()


def weights(session: Session, run_id: uuid.UUID) -> RunWeightsRow | None:
    return session.get(RunWeightsRow, run_id)


def requeue(session: Session, run_id: uuid.UUID) -> None:
    """running -> queued (the worker is stopping); completed epochs' metrics are removed so the
    history matches the restarted training."""
    session.execute(
        update(RunRow)
        .where(RunRow.id == run_id, RunRow.status == RunStatus.RUNNING)
        .values(status=RunStatus.QUEUED, worker=None, epochs_done=0, updated_at=utcnow())
    )
    session.execute(RunMetricRow.__table__.delete().where(RunMetricRow.run_id == run_id))
    session.commit()
