"""ORM rows for training runs, their per-epoch metrics and their trained weights."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Float,
    ForeignKey,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
    Uuid,
)
from sqlalchemy.orm import Mapped, mapped_column

from service.db import Base, UTCDateTime, utcnow


class RunStatus:
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    TERMINAL = frozenset({SUCCEEDED, FAILED, CANCELLED})
    ALL = (QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED)


class RunRow(Base):
    __tablename__ = "runs"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    tenant_id: Mapped[str] = mapped_column(String(64), index=True, default="default")
    dataset_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("datasets.id"), index=True)
    kind: Mapped[str] = mapped_column(String(20), default="train", index=True)  # "train" | "sweep"
    status: Mapped[str] = mapped_column(String(20), index=True, default=RunStatus.QUEUED)
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    epochs_total: Mapped[int] = mapped_column(Integer)
    epochs_done: Mapped[int] = mapped_column(Integer, default=0)
    device: Mapped[str | None] = mapped_column(String(20), nullable=True)  # where it trained
    worker: Mapped[str | None] = mapped_column(String(200), nullable=True)
    queue: Mapped[str] = mapped_column(String(40), default="cpu")
    priority: Mapped[int] = mapped_column(Integer, default=0)  # 0..9, higher is more urgent
    callback_url: Mapped[str | None] = mapped_column(String(2000), nullable=True)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    # Lease: the worker training the run renews it (heartbeat); an expired lease lets the
    # reconciler hand the run to another worker. Every write of a worker is fenced by owner.
    lease_owner: Mapped[str | None] = mapped_column(String(200), nullable=True)
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True, index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    dispatched_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    dispatch_count: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    updated_at: Mapped[datetime] = mapped_column(
        UTCDateTime, default=utcnow, onupdate=utcnow
    )


class RunMetricRow(Base):
    __tablename__ = "run_metrics"
    __table_args__ = (UniqueConstraint("run_id", "epoch"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), index=True)
    epoch: Mapped[int] = mapped_column(Integer)
    train_loss: Mapped[float] = mapped_column(Float)
    val_loss: Mapped[float | None] = mapped_column(Float, nullable=True)
    train_accuracy: Mapped[float | None] = mapped_column(Float, nullable=True)
    val_accuracy: Mapped[float | None] = mapped_column(Float, nullable=True)
    train_rmse: Mapped[float | None] = mapped_column(Float, nullable=True)
    val_rmse: Mapped[float | None] = mapped_column(Float, nullable=True)
    duration_s: Mapped[float] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class RunWeightsRow(Base):
    """The trained network: safetensors weights plus everything needed to serve it.

    Kept in the database so an API replica that shares only the database can serve any run.
    """

    __tablename__ = "run_weights"

    run_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True
    )
    format: Mapped[str] = mapped_column(String(20), default="safetensors")
    network: Mapped[dict[str, Any]] = mapped_column(JSON)  # NetworkSpec.to_dict()
    # input/target standardisers, tau, class names: what predict needs besides the weights
    preprocessing: Mapped[dict[str, Any]] = mapped_column(JSON)
    size_bytes: Mapped[int] = mapped_column(Integer)
    weights: Mapped[bytes] = mapped_column(LargeBinary, deferred=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class RunEventRow(Base):
    """Every state change and every finished epoch, in order: the run's history and the
    source of its Server-Sent Events stream (any API replica can stream what any worker wrote)."""

    __tablename__ = "run_events"

    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    run_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), index=True)
    kind: Mapped[str] = mapped_column(String(20))  # "status" or "epoch"
    status: Mapped[str] = mapped_column(String(20))  # the run's status after the event
    data: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class RunCheckpointRow(Base):
    """The latest end-of-epoch training state: weights, optimiser state, RNG states, epoch.

    Serialised with torch.save and read back with ``torch.load(weights_only=True)``.
    """

    __tablename__ = "run_checkpoints"

    run_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True
    )
    epoch: Mapped[int] = mapped_column(Integer)
    size_bytes: Mapped[int] = mapped_column(Integer)
    state: Mapped[bytes] = mapped_column(LargeBinary, deferred=True)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)


class RunResultRow(Base):
    """What a finished job produced besides weights: a run's held-out evaluation (MC dropout
    beside the deterministic net), or a sweep's ranking and test results."""

    __tablename__ = "run_results"

    run_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True
    )
    data: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
