"""``Idempotency-Key`` for POSTs that create things: the first request with a key runs, a repeat
with the same key and body gets the stored response again, and a repeat with another body is
refused.

The unique constraint on (scope, key) picks the one request that runs ``create``; the others
read its row and wait for the stored response. Every step is a short transaction of its own
(never the caller's session), so the row that says "in progress" is visible to the duplicates
at once, on PostgreSQL and on SQLite. A row carries a lock (``locked_until``): when the process
that held it died, a later request takes the row over once the lock has run out. The lock's
value is also the holder's token: completing or releasing the row is a compare-and-set on it,
so a holder whose lock was taken over cannot overwrite the new holder's row.

The API layer decides the scope (e.g. "POST /v1/runs") and what goes into the fingerprint
(the body, and anything else that makes two requests different).
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete, select, update
from sqlalchemy.exc import IntegrityError

from service.db import session_scope, utcnow
from service.errors import Conflict, InvalidInput
from service.jobs.models import IdempotencyKeyRow

log = logging.getLogger(__name__)

HEADER = "Idempotency-Key"
MAX_KEY_LENGTH = 255
POLL_INTERVAL_S = 0.05
IN_PROGRESS = "in_progress"
COMPLETED = "completed"

_LOC = ["header", HEADER]


def fingerprint(*parts: bytes) -> str:
    """sha256 (hex) over the parts, each prefixed with its length so that no two lists collide."""
    digest = hashlib.sha256()
    for part in parts:
        digest.update(len(part).to_bytes(8, "big"))
        digest.update(part)
    return digest.hexdigest()


def validate_key(key: str) -> str:
    """The key if it has 1 to 255 visible ASCII characters (``!`` to ``~``), else InvalidInput."""
    if not 1 <= len(key) <= MAX_KEY_LENGTH:
        raise InvalidInput(
            f"the {HEADER} header must have 1 to {MAX_KEY_LENGTH} characters",
            errors=[{"loc": _LOC, "msg": f"got {len(key)} characters", "type": "string_length"}],
        )
    if not all("!" <= char <= "~" for char in key):
        raise InvalidInput(
            f"the {HEADER} header may hold visible ASCII characters only (no spaces or control characters)",
            errors=[{"loc": _LOC, "msg": "not visible ASCII", "type": "string_pattern"}],
        )
    return key


class IdempotencyKeyReused(InvalidInput):
    """The key was already used for a request with another body."""

    def __init__(self, key: str) -> None:
        super().__init__(
            f"the {HEADER} {key!r} was already used for a different request; "
            "use a new key for a new request",
            errors=[{"loc": _LOC, "msg": "key reused with a different request body", "type": "idempotency_key_reused"}],
        )
        self.key = key


class IdempotencyInProgress(Conflict):
    """The first request with this key is still being processed; the client should retry later."""

    def __init__(self, key: str, retry_after_s: int = 1) -> None:
        super().__init__(
            f"the request with {HEADER} {key!r} is still being processed; retry later",
            errors=[{"loc": _LOC, "msg": "original request in progress", "type": "idempotency_key_in_progress"}],
        )
        self.key = key
        self.retry_after_s = retry_after_s


def execute(
    url: str,
    *,
    scope: str,
    key: str,
    fingerprint: str,
    ttl_s: float,
    create: Callable[[], tuple[int, dict[str, Any]]],
    wait_s: float = 10.0,
    lock_s: float = 60.0,
) -> tuple[int, dict[str, Any], bool]:
    """Run ``create`` once per (scope, key); returns (status, body, replayed).

    Raises IdempotencyKeyReused when the key's row has another fingerprint, and
    IdempotencyInProgress when the first request is still running after ``wait_s``. Only 2xx
    responses are stored; when ``create`` raises or answers otherwise, the key is freed so the
    client can retry with it.
    """
    validate_key(key)
    deadline = time.monotonic() + wait_s
    while True:
        try:
            row_id, token = _insert(url, scope, key, fingerprint, ttl_s, lock_s)
        except IntegrityError as exc:  # the unique (scope, key) constraint: another request has it
            conflict = exc
        else:
            return _run(url, row_id, token, create)
        while True:
            row = _read(url, scope, key)
            if row is None:  # released or purged since the insert failed: try again
                if time.monotonic() > deadline:  # not the key's row that failed the insert
                    raise conflict
                break
            now = utcnow()
            if row.expires_at <= now:
                _delete_expired(url, row.id, row.expires_at)
                break
            if row.fingerprint != fingerprint:
                raise IdempotencyKeyReused(key)
            if row.status == COMPLETED:
                return row.response_status or 200, row.response_body or {}, True
            if row.locked_until is None or row.locked_until <= now:
                token = _take_over(url, row.id, row.locked_until, now + timedelta(seconds=lock_s))
                if token is not None:
                    log.warning("idempotency key %s %r: took over a stale lock", scope, key)
                    return _run(url, row.id, token, create)
                continue
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise IdempotencyInProgress(key)
            time.sleep(min(POLL_INTERVAL_S, remaining))


def purge_expired(url: str, now: datetime | None = None) -> int:
    """Delete the keys whose time is up; returns how many."""
    now = now or utcnow()
    with session_scope(url) as session:
        result = session.execute(delete(IdempotencyKeyRow).where(IdempotencyKeyRow.expires_at <= now))
        return result.rowcount  # type: ignore[attr-defined,no-any-return]


def _insert(url: str, scope: str, key: str, fingerprint: str, ttl_s: float, lock_s: float) -> tuple[int, datetime]:
    now = utcnow()
    token = now + timedelta(seconds=lock_s)
    with session_scope(url) as session:
        row = IdempotencyKeyRow(
            scope=scope,
            key=key,
            fingerprint=fingerprint,
            status=IN_PROGRESS,
            created_at=now,
            expires_at=now + timedelta(seconds=ttl_s),
            locked_until=token,
        )
        session.add(row)
        session.flush()
        return row.id, token


def _read(url: str, scope: str, key: str) -> IdempotencyKeyRow | None:
    with session_scope(url) as session:
        return session.scalars(
            select(IdempotencyKeyRow).where(IdempotencyKeyRow.scope == scope, IdempotencyKeyRow.key == key)
        ).one_or_none()


def _delete_expired(url: str, row_id: int, expires_at: datetime) -> None:
    with session_scope(url) as session:
        session.execute(
            delete(IdempotencyKeyRow).where(IdempotencyKeyRow.id == row_id, IdempotencyKeyRow.expires_at == expires_at)
        )


def _take_over(url: str, row_id: int, locked_until: datetime | None, token: datetime) -> datetime | None:
    """Compare-and-set the stale lock to ours; the token when we won, None when someone else did."""
    was = IdempotencyKeyRow.locked_until.is_(None) if locked_until is None else IdempotencyKeyRow.locked_until == locked_until
    with session_scope(url) as session:
        result = session.execute(
            update(IdempotencyKeyRow)
            .where(IdempotencyKeyRow.id == row_id, IdempotencyKeyRow.status == IN_PROGRESS, was)
            .values(locked_until=token)
        )
        return token if result.rowcount == 1 else None  # type: ignore[attr-defined]


def _held(row_id: int, token: datetime) -> Any:
    return (
        (IdempotencyKeyRow.id == row_id)
        & (IdempotencyKeyRow.status == IN_PROGRESS)
        & (IdempotencyKeyRow.locked_until == token)
    )


def _run(
    url: str, row_id: int, token: datetime, create: Callable[[], tuple[int, dict[str, Any]]]
) -> tuple[int, dict[str, Any], bool]:
    try:
        status, body = create()
    except BaseException:
        _release(url, row_id, token)
        raise
    if not 200 <= status < 300:
        _release(url, row_id, token)
        return status, body, False
    with session_scope(url) as session:
        result = session.execute(
            update(IdempotencyKeyRow)
            .where(_held(row_id, token))
            .values(status=COMPLETED, response_status=status, response_body=body, locked_until=None)
        )
        if result.rowcount != 1:  # type: ignore[attr-defined]
            log.warning("idempotency key row %s: lock lost before the response was stored", row_id)
    return status, body, False


def _release(url: str, row_id: int, token: datetime) -> None:
    """Free the key after a failed create; a failure here must not hide the create's error."""
    try:
        with session_scope(url) as session:
            session.execute(delete(IdempotencyKeyRow).where(_held(row_id, token)))
    except Exception:
        log.exception("idempotency key row %s: could not release it", row_id)
