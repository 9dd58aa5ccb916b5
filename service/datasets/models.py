"""ORM rows for datasets. The table holds the data itself so any worker can train on it."""

from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import JSON, Integer, LargeBinary, String, Uuid
from sqlalchemy.orm import Mapped, mapped_column

from service.db import Base, UTCDateTime, utcnow


class DatasetRow(Base):
    __tablename__ = "datasets"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    tenant_id: Mapped[str] = mapped_column(String(64), index=True, default="default")
    name: Mapped[str] = mapped_column(String(200))
    task: Mapped[str] = mapped_column(String(20))
    source: Mapped[str] = mapped_column(String(40))  # "builtin:digits" or "csv"
    n_rows: Mapped[int] = mapped_column(Integer)
    n_features: Mapped[int] = mapped_column(Integer)
    n_classes: Mapped[int | None] = mapped_column(Integer, nullable=True)
    feature_names: Mapped[list[str]] = mapped_column(JSON)
    class_names: Mapped[list[str] | None] = mapped_column(JSON, nullable=True)
    target_name: Mapped[str] = mapped_column(String(200))
    size_bytes: Mapped[int] = mapped_column(Integer)
    # safetensors blob with "features" [N, D] float32 and "target" [N] (int64 or float32);
    # deferred so listing datasets never reads the data.
    data: Mapped[bytes] = mapped_column(LargeBinary, deferred=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)
