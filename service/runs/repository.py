"""Queries and writes on run rows. State changes go through service.runs.lifecycle."""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy import delete, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from service.db import utcnow
from service.runs import lifecycle
from service.runs.models import (
    RunCheckpointRow,
    RunMetricRow,
    RunResultRow,
    RunRow,
    RunStatus,
    RunWeightsRow,
)


class LeaseLost(Exception):
    """The worker's lease on the run is gone (expired and taken over, or the run was ended)."""


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


def checkpoint(session: Session, run_id: uuid.UUID) -> RunCheckpointRow | None:
    return session.get(RunCheckpointRow, run_id)


def record_epoch(
    session: Session, run_id: uuid.UUID, owner: str, values: dict[str, Any] | None, checkpoint_blob: bytes,
    *, epoch: int | None = None, event: dict[str, Any] | None = None,
) -> bool:
    """One transaction: the epoch's metrics (a run) or progress (a sweep), its event, the
    checkpoint and epochs_done — fenced by the lease owner, so a worker that lost its lease
    writes nothing.

    Returns whether cancellation has been requested.
    """
    if values is not None:
        return record_epochs(session, run_id, owner, [values], checkpoint_blob)
    assert epoch is not None
    row = _hold(session, run_id, owner, epoch)
    lifecycle.add_event(session, run_id, "epoch", RunStatus.RUNNING,
                        {"epoch": epoch, **(event or {}), "epochs_total": row.epochs_total})
    _put_checkpoint(session, run_id, epoch, checkpoint_blob)
    cancel = bool(row.cancel_requested)
    session.commit()
    return cancel


def record_epochs(
    session: Session, run_id: uuid.UUID, owner: str, epochs: list[dict[str, Any]], checkpoint_blob: bytes | None,
) -> bool:
    """One transaction for a training run's finished epochs (in order, at least one): a metrics
    row and an ``epoch`` event each, epochs_done = the last one, and with ``checkpoint_blob`` the
    checkpoint taken after it — fenced by the lease owner, so a worker that lost its lease writes
    nothing.

    The worker calls it at most every ``checkpoint_interval_s`` with the epochs since the last
    call, so the metrics rows are the epochs up to the checkpoint, and a run resumed from it
    writes the next epochs' rows. Without a checkpoint (for a run about to end cancelled or
    failed) the rows may go past it; rows of these epochs already there (from such a write,
    had the run been resumed all the same) are replaced, never duplicated.

    Returns whether cancellation has been requested.
    """
    assert epochs, "at least one epoch"
    last = epochs[-1]["epoch"]
    row = _hold(session, run_id, owner, last)
    session.execute(delete(RunMetricRow).where(RunMetricRow.run_id == run_id, RunMetricRow.epoch >= epochs[0]["epoch"]))
    session.add_all([RunMetricRow(run_id=run_id, **values) for values in epochs])
    for values in epochs:
        lifecycle.add_event(session, run_id, "epoch", RunStatus.RUNNING, {**values, "epochs_total": row.epochs_total})
    if checkpoint_blob is not None:
        _put_checkpoint(session, run_id, last, checkpoint_blob)
    cancel = bool(row.cancel_requested)
    session.commit()
    return cancel


def _hold(session: Session, run_id: uuid.UUID, owner: str, epoch: int) -> RunRow:
    """Set epochs_done if ``owner`` still holds the running run (which also locks its row, so
    its events get ids in commit order); the run row. Raises LeaseLost (rolled back) if not."""
    held = session.execute(
        update(RunRow)
        .where(RunRow.id == run_id, RunRow.lease_owner == owner, RunRow.status == RunStatus.RUNNING)
        .values(epochs_done=epoch, updated_at=utcnow())
    ).rowcount == 1
    if not held:
        session.rollback()
        raise LeaseLost(f"run {run_id}: lease lost before epoch {epoch} was recorded")
    row = session.get(RunRow, run_id)
    assert row is not None
    return row


def _put_checkpoint(session: Session, run_id: uuid.UUID, epoch: int, blob: bytes) -> None:
    values = {"run_id": run_id, "epoch": epoch, "state": blob, "size_bytes": len(blob), "updated_at": utcnow()}
    insert = pg_insert if session.bind.dialect.name == "postgresql" else sqlite_insert  # type: ignore[union-attr]
    statement = insert(RunCheckpointRow).values(**values)
    session.execute(statement.on_conflict_do_update(
        index_elements=[RunCheckpointRow.run_id],
        set_={key: statement.excluded[key] for key in ("epoch", "state", "size_bytes", "updated_at")},
    ))


def succeed(
    session: Session, run_id: uuid.UUID, owner: str, *, network: dict[str, Any] | None = None,
    preprocessing: dict[str, Any] | None = None, weights: bytes | None = None,
    results: dict[str, Any] | None = None,
) -> None:
    """Store the weights and results and mark the run succeeded in one transaction (fenced by
    the lease owner)."""
    if weights is not None:
        assert network is not None and preprocessing is not None
        session.add(RunWeightsRow(
            run_id=run_id, network=network, preprocessing=preprocessing, weights=weights,
            size_bytes=len(weights),
        ))
    if results is not None:
        session.add(RunResultRow(run_id=run_id, data=results))
    if not lifecycle.transition(session, run_id, RunStatus.SUCCEEDED, expected=[RunStatus.RUNNING],
                                owner=owner, values={"error": None}):
        session.rollback()
        raise LeaseLost(f"run {run_id}: lease lost before its weights were stored")
    session.execute(RunCheckpointRow.__table__.delete().where(RunCheckpointRow.run_id == run_id))
    session.commit()


def weights(session: Session, run_id: uuid.UUID) -> RunWeightsRow | None:
    return session.get(RunWeightsRow, run_id)


def results(session: Session, run_id: uuid.UUID) -> RunResultRow | None:
    return session.get(RunResultRow, run_id)
