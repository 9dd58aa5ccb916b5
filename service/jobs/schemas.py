"""Pydantic schemas for jobs' rows that leave the domain layer: webhook deliveries."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel

DeliveryStatus = Literal["pending", "delivered", "failed"]


class DeliveryRead(BaseModel):
    """One webhook event for a run and how its delivery went (the payload is not repeated)."""

    id: int
    event_id: str
    url: str
    event_type: str
    status: DeliveryStatus
    attempts: int
    last_status_code: int | None
    last_error: str | None
    next_attempt_at: datetime
    created_at: datetime
    delivered_at: datetime | None


class DeliveryList(BaseModel):
    items: list[DeliveryRead]
