"""ORM rows for API keys. A key's secret is never stored: only its SHA-256."""

from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import String, Uuid
from sqlalchemy.orm import Mapped, mapped_column

from service.db import Base, UTCDateTime, utcnow


class ApiKeyRow(Base):
    __tablename__ = "api_keys"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    tenant_id: Mapped[str] = mapped_column(String(64), index=True)
    name: Mapped[str] = mapped_column(String(200))
    # The first characters of the key (not secret): lets a person tell keys apart in lists.
    prefix: Mapped[str] = mapped_column(String(16))
    # SHA-256 of the whole key. Keys are 256-bit random strings, so a fast hash is enough
    # (no dictionary to attack, unlike passwords); the digest is the lookup index.
    secret_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
