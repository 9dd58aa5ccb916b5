"""Pydantic schemas for API keys, named by role."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

TENANT_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,63}$"
TenantId = Annotated[str, StringConstraints(pattern=TENANT_PATTERN)]
KeyName = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=200)]


class KeyCreate(BaseModel):
    """A new key for the caller's own tenant."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"name": "dashboard"}]})

    name: KeyName = "key"


class KeyRead(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID
    tenant_id: str
    name: str
    prefix: str = Field(description="the key's first characters, to tell keys apart; not secret")
    created_at: datetime
    revoked_at: datetime | None


class KeyCreated(KeyRead):
    key: str = Field(description="the secret: shown once, stored only as a hash; send it as `Authorization: Bearer <key>`")


class KeyList(BaseModel):
    items: list[KeyRead]
