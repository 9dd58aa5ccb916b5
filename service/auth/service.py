"""API keys: create (the secret is returned once), authenticate, list, revoke.

A key looks like ``mcd_<43 url-safe characters>`` (256 random bits). Only its SHA-256 is
stored; authentication hashes the presented key and looks the digest up.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import threading
import time
import uuid

from sqlalchemy import select
from sqlalchemy.orm import Session

from service.auth.models import ApiKeyRow
from service.auth.schemas import TENANT_PATTERN, KeyCreated, KeyRead
from service.db import utcnow
from service.errors import InvalidInput, InvalidState, NotFound, Unauthenticated

KEY_PREFIX = "mcd_"
DEFAULT_TENANT = "default"  # every caller's tenant when auth is off
_KEY_SHAPE = re.compile(r"^mcd_[A-Za-z0-9_-]{43}$")


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def validate_tenant(tenant_id: str) -> str:
    if not re.fullmatch(TENANT_PATTERN, tenant_id):
        raise InvalidInput(
            f"tenant {tenant_id!r} is not valid: 1-64 characters of a-z, 0-9, '_' and '-', starting with a letter or digit",
            errors=[{"loc": ["tenant"], "msg": "invalid tenant id", "type": "value_error"}],
        )
    return tenant_id


def create_key(session: Session, tenant_id: str, name: str = "key") -> KeyCreated:
    validate_tenant(tenant_id)
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    row = ApiKeyRow(tenant_id=tenant_id, name=name, prefix=key[:12], secret_hash=hash_key(key))
    session.add(row)
    session.commit()
    return KeyCreated(**KeyRead.model_validate(row).model_dump(), key=key)


def tenant_of_key(session: Session, key: str) -> str:
    """The tenant a live key belongs to, or Unauthenticated."""
    if not _KEY_SHAPE.match(key):
        raise Unauthenticated("the API key is malformed (expected mcd_ followed by 43 characters)")
    row = session.scalar(select(ApiKeyRow).where(ApiKeyRow.secret_hash == hash_key(key)))
    if row is None or row.revoked_at is not None:
        raise Unauthenticated("the API key is unknown or revoked")
    return row.tenant_id


def list_keys(session: Session, tenant_id: str | None = None) -> list[KeyRead]:
    query = select(ApiKeyRow).order_by(ApiKeyRow.created_at, ApiKeyRow.id)
    if tenant_id is not None:
        query = query.where(ApiKeyRow.tenant_id == tenant_id)
    return [KeyRead.model_validate(row) for row in session.scalars(query)]


def revoke_key(session: Session, key_id: uuid.UUID, tenant_id: str | None = None) -> KeyRead:
    """Revoke a key (of ``tenant_id`` when given: another tenant's key is not found)."""
    row = session.get(ApiKeyRow, key_id)
    if row is None or (tenant_id is not None and row.tenant_id != tenant_id):
        raise NotFound("API key", key_id)
    if row.revoked_at is not None:
        raise InvalidState(f"API key {key_id} is already revoked")
    row.revoked_at = utcnow()
    session.commit()
    return KeyRead.model_validate(row)


class KeyCache:
    """Verified keys (by digest) -> tenant, trusted for ``ttl_s``: most requests need no
    database read. A revoked key stops working within ``ttl_s``."""

    def __init__(self, ttl_s: float, max_entries: int = 10_000) -> None:
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self._entries: dict[str, tuple[str, float]] = {}
        self._lock = threading.Lock()

    def get(self, digest: str) -> str | None:
        entry = self._entries.get(digest)
        if entry is None or entry[1] < time.monotonic():
            return None
        return entry[0]

    def put(self, digest: str, tenant_id: str) -> None:
        if self.ttl_s <= 0:
            return
        with self._lock:
            if len(self._entries) >= self.max_entries:
                now = time.monotonic()
                self._entries = {k: v for k, v in self._entries.items() if v[1] >= now}
                if len(self._entries) >= self.max_entries:
                    self._entries.clear()
            self._entries[digest] = (tenant_id, time.monotonic() + self.ttl_s)
