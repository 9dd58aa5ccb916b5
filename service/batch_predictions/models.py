"""ORM rows of batch prediction jobs. The job itself is a ``runs`` row of kind ``predict`` (so it
has the run lifecycle: leases, reconciler, events, cancellation); these tables hold what only a
batch prediction has: its model and input, and the outputs of its finished chunks."""

from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import JSON, ForeignKey, Integer, LargeBinary, String, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from service.db import Base, UTCDateTime, utcnow


class BatchPredictionRow(Base):
    __tablename__ = "batch_predictions"

    run_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True)
    # The succeeded training run whose network predicts, and how the caller named it.
    model_run_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("runs.id"), index=True)
    model_name: Mapped[str | None] = mapped_column(String(128), nullable=True)
    model_alias: Mapped[str | None] = mapped_column(String(64), nullable=True)
    model_version: Mapped[int | None] = mapped_column(Integer, nullable=True)
    input_source: Mapped[str] = mapped_column(String(20))  # "dataset" | "upload"
    input_dataset_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("datasets.id"), nullable=True)
    input_filename: Mapped[str | None] = mapped_column(String(255), nullable=True)
    # dataset input: the dataset's column of each model feature, in the model's order
    feature_order: Mapped[list[int] | None] = mapped_column(JSON, nullable=True)
    n_rows: Mapped[int] = mapped_column(Integer)
    chunk_rows: Mapped[int] = mapped_column(Integer)
    columns: Mapped[list[str]] = mapped_column(JSON)  # the results' columns, in order
    # upload input: Arrow IPC stream with "features" (fixed-size list of float32, model order)
    # and the optional "id" and "target" columns; deferred so reads never load it.
    input_size_bytes: Mapped[int] = mapped_column(Integer, default=0)
    input_data: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True, deferred=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class BatchPredictionChunkRow(Base):
    """The outputs of one finished chunk (Arrow IPC stream, the results' columns): written in the
    same transaction as the job's progress, so a resumed job never predicts a chunk twice."""

    __tablename__ = "batch_prediction_chunks"
    __table_args__ = (UniqueConstraint("run_id", "chunk"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), index=True)
    chunk: Mapped[int] = mapped_column(Integer)
    rows: Mapped[int] = mapped_column(Integer)
    size_bytes: Mapped[int] = mapped_column(Integer)
    data: Mapped[bytes] = mapped_column(LargeBinary, deferred=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
