"""Queries and writes on batch prediction rows. State changes go through service.runs.lifecycle."""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from service.batch_predictions.models import BatchPredictionChunkRow, BatchPredictionRow
from service.db import utcnow
from service.runs import lifecycle
from service.runs import repository as runs_repository
from service.runs.models import RunRow, RunStatus

LeaseLost = runs_repository.LeaseLost


def get(session: Session, run_id: uuid.UUID) -> BatchPredictionRow | None:
    return session.get(BatchPredictionRow, run_id)


def many(session: Session, run_ids: list[uuid.UUID]) -> dict[uuid.UUID, BatchPredictionRow]:
    if not run_ids:
        return {}
    return {row.run_id: row for row in session.scalars(select(BatchPredictionRow).where(BatchPredictionRow.run_id.in_(run_ids)))}


def finished_chunks(session: Session, run_id: uuid.UUID) -> dict[int, int]:
    """chunk index -> rows, of the chunks already stored."""
    return dict(session.execute(
        select(BatchPredictionChunkRow.chunk, BatchPredictionChunkRow.rows).where(BatchPredictionChunkRow.run_id == run_id)
    ).tuples().all())


def chunk_data(session: Session, run_id: uuid.UUID, chunk: int) -> bytes | None:
    return session.scalar(select(BatchPredictionChunkRow.data).where(
        BatchPredictionChunkRow.run_id == run_id, BatchPredictionChunkRow.chunk == chunk))


def record_chunk(
    session: Session, run_id: uuid.UUID, owner: str, *, chunk: int, rows: int, data: bytes, chunks_total: int,
) -> bool:
    """One transaction: the chunk's outputs, the job's progress (epochs_done = rows done) and an
    ``epoch`` event — fenced by the lease owner, so a worker that lost its lease writes nothing
    (and no chunk is stored twice). Returns whether cancellation has been requested."""
    held = session.execute(
        update(RunRow)
        .where(RunRow.id == run_id, RunRow.lease_owner == owner, RunRow.status == RunStatus.RUNNING)
        .values(updated_at=utcnow())
    ).rowcount == 1  # also locks the job's row, so its events get ids in commit order
    if not held:
        session.rollback()
        raise LeaseLost(f"batch prediction {run_id}: lease lost before chunk {chunk} was stored")
    stored = session.scalar(select(BatchPredictionChunkRow.id).where(
        BatchPredictionChunkRow.run_id == run_id, BatchPredictionChunkRow.chunk == chunk))
    if stored is None:  # else: a retry after a commit whose answer was lost (the same outputs)
        session.add(BatchPredictionChunkRow(run_id=run_id, chunk=chunk, rows=rows, data=data, size_bytes=len(data)))
        session.flush()
    rows_done = int(session.scalar(
        select(func.coalesce(func.sum(BatchPredictionChunkRow.rows), 0)).where(BatchPredictionChunkRow.run_id == run_id)
    ))
    session.execute(update(RunRow).where(RunRow.id == run_id).values(epochs_done=rows_done))
    row = session.get(RunRow, run_id, populate_existing=True)
    assert row is not None
    lifecycle.add_event(session, run_id, "epoch", RunStatus.RUNNING, {
        "epoch": rows_done, "epochs_total": row.epochs_total,  # what progress bars read (mcdrop watch)
        "rows_done": rows_done, "rows_total": row.epochs_total, "chunk": chunk, "chunks_total": chunks_total,
    })
    cancel = bool(row.cancel_requested)
    session.commit()
    return cancel


def succeed(session: Session, run_id: uuid.UUID, owner: str, results: dict[str, Any]) -> None:
    """Mark the job succeeded with a summary of its results (fenced by the lease owner)."""
    runs_repository.succeed(session, run_id, owner, results=results)
