"""Webhooks: a run's terminal event POSTed, signed, to its ``callback_url``; at least once.

Delivery
--------
A terminal transition adds a ``webhook_deliveries`` row in its own transaction
(:func:`queue_delivery`), so an event is never lost. :func:`deliver_due` then sends the due
ones: it claims a row with a compare-and-set UPDATE that takes a short lease, commits, POSTs
outside any transaction, and records the outcome. Any number of processes may run it at once;
one attempt is sent by one process only. A 2xx answer delivers the event; anything else
(redirects are not followed), a timeout or a network error is a failed attempt, retried after
``webhook_backoff_s * 2**(attempts - 1)`` seconds (at most an hour) times a random factor in
[0.5, 1), until ``webhook_max_attempts`` attempts have failed. A process that dies mid-attempt
leaves the lease to expire and the event is sent again, so receivers must deduplicate on
``Mcdrop-Event-Id`` (the same as the body's ``id``).

Request
-------
``POST <callback_url>`` with the headers::

    Content-Type: application/json
    User-Agent: mcdrop-webhooks
    Mcdrop-Event-Id: evt_123
    Mcdrop-Signature: t=1767225600,v1=5257a869e7ecebeda32affa62cdca3fa51cad7e77a0e56ff536d0ce8e108d8bd

and a body such as::

    {"created_at":"2026-01-01T00:00:00+00:00","id":"evt_123","run":{"dataset_id":"...",
     "epochs_done":10,"epochs_total":10,"error":null,"finished_at":"2026-01-01T00:00:00+00:00",
     "id":"...","status":"succeeded"},"type":"run.succeeded"}

``type`` is ``run.succeeded``, ``run.failed`` or ``run.cancelled``.

Verifying a request (receivers)
-------------------------------
``t`` is the Unix time (seconds) of the attempt and ``v1`` the lowercase hex
HMAC-SHA256, keyed with the shared secret, of ``f"{t}.".encode() + raw_body``: the body's bytes
exactly as received, before any JSON parsing. The key is the secret's text as UTF-8 bytes (the
generated secret, 64 hex characters in ``<data_dir>/webhook_secret``, is used as text, not
hex-decoded). Compare in constant time and reject timestamps more than a few minutes from your
clock (replays)::

    import hashlib, hmac, time

    def verify(secret: bytes, body: bytes, header: str, tolerance_s: int = 300) -> bool:
        fields = [part.split("=", 1) for part in header.split(",")]
        timestamp = int(next(value for key, value in fields if key == "t"))
        expected = hmac.new(secret, f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
        return abs(time.time() - timestamp) <= tolerance_s and any(
            key == "v1" and hmac.compare_digest(value, expected) for key, value in fields
        )

(:func:`verify` below does the same and also turns malformed headers into ``False``.)
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import random
import secrets
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session

from service.config import Settings
from service.db import session_scope, utcnow
from service.jobs.models import WebhookDeliveryRow
from service.jobs.schemas import DeliveryRead
from service.runs.models import RunEventRow, RunRow

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "Mcdrop-Signature"
EVENT_ID_HEADER = "Mcdrop-Event-Id"
USER_AGENT = "mcdrop-webhooks"
SIGNATURE_VERSION = "v1"

PENDING = "pending"
DELIVERED = "delivered"
FAILED = "failed"

MAX_BACKOFF_S = 3600.0
LEASE_MARGIN_S = 10.0  # beyond the request timeout: time to connect, record and commit
MAX_ERROR_CHARS = 500
MAX_BODY_EXCERPT_BYTES = 200
SECRET_FILE = "webhook_secret"


# --- the signing secret -------------------------------------------------------------------

_secrets: dict[Path, bytes] = {}
_secrets_lock = threading.Lock()


def webhook_secret(settings: Settings) -> bytes:
    """The HMAC key: ``settings.webhook_secret``, else ``<data_dir>/webhook_secret``, which the
    first caller on the host creates (32 random bytes as hex, mode 0600); cached per path."""
    if settings.webhook_secret is not None:
        return settings.webhook_secret.get_secret_value().encode("utf-8")
    path = Path(settings.data_dir) / SECRET_FILE
    with _secrets_lock:
        secret = _secrets.get(path)
        if secret is None:
            secret = _secrets[path] = _read_or_create_secret(path)
    return secret


def _read_secret(path: Path) -> bytes:
    secret = path.read_bytes().strip()
    if not secret:
        raise RuntimeError(f"{path} is empty: delete it to have a new webhook secret generated")
    return secret


def _read_or_create_secret(path: Path) -> bytes:
    try:
        return _read_secret(path)
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    secret = secrets.token_hex(32).encode("ascii")
    # Written in full to a file of our own, then published under the final name with link(),
    # which fails if the name exists: readers never see a partly written secret, and of
    # concurrent creators (threads, processes) exactly one wins; the others read its file.
    draft = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}")
    descriptor = os.open(draft, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        try:
            os.write(descriptor, secret + b"\n")
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
        try:
            os.link(draft, path)
        except FileExistsError:
            return _read_secret(path)
    finally:
        draft.unlink(missing_ok=True)
    log.info("generated a webhook signing secret in %s", path)
    return secret


# --- signatures ---------------------------------------------------------------------------


def _digest(secret: bytes, body: bytes, timestamp: int) -> str:
    return hmac.new(secret, f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()


def sign(secret: bytes, body: bytes, timestamp: int) -> str:
    """The ``Mcdrop-Signature`` header value: ``t=<timestamp>,v1=<hex HMAC-SHA256>``."""
    return f"t={timestamp},{SIGNATURE_VERSION}={_digest(secret, body, timestamp)}"


def verify(
    secret: bytes, body: bytes, header_value: str | None, *, tolerance_s: float = 300,
    now: float | None = None,
) -> bool:
    """Whether ``header_value`` signs ``body`` with ``secret`` at a timestamp within
    ``tolerance_s`` of ``now`` (Unix seconds; default the clock). Malformed headers are False."""
    if not header_value:
        return False
    timestamp: int | None = None
    signatures: list[str] = []
    for part in header_value.split(","):
        key, separator, value = part.strip().partition("=")
        if not separator:
            return False
        if key == "t":
            if timestamp is not None or not value.isascii() or not value.isdigit():
                return False
            timestamp = int(value)
        elif key == SIGNATURE_VERSION:
            signatures.append(value)
    if timestamp is None or not signatures:
        return False
    current = time.time() if now is None else now
    if abs(current - timestamp) > tolerance_s:
        return False
    expected = _digest(secret, body, timestamp)
    # Every candidate is compared (several v1 values let a sender rotate secrets).
    matches = [hmac.compare_digest(candidate.encode(), expected.encode()) for candidate in signatures]
    return any(matches)


def canonical_json(payload: dict[str, Any]) -> bytes:
    """The body's bytes: compact, sorted keys, UTF-8 (the bytes the signature covers)."""
    return json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


# --- queueing -----------------------------------------------------------------------------


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def queue_delivery(session: Session, run: RunRow, event: RunEventRow) -> WebhookDeliveryRow:
    """Add (without committing) a pending delivery of ``event`` to ``run.callback_url``; the
    caller's transaction makes it durable together with the transition it reports."""
    if not run.callback_url:
        raise ValueError(f"run {run.id} has no callback_url")
    if event.id is None:
        session.flush()  # the event id names the delivery
    now = utcnow()
    event_id = f"evt_{event.id}"
    payload = {
        "id": event_id,
        "type": f"run.{event.status}",
        "created_at": _iso(event.created_at or now),
        "run": {
            "id": str(run.id),
            "status": run.status,
            "dataset_id": str(run.dataset_id),
            "epochs_done": run.epochs_done,
            "epochs_total": run.epochs_total,
            "error": run.error,
            "finished_at": _iso(run.finished_at),
        },
    }
    delivery = WebhookDeliveryRow(
        run_id=run.id, event_id=event_id, url=run.callback_url, payload=payload, status=PENDING,
        attempts=0, next_attempt_at=now, created_at=now,
    )
    session.add(delivery)
    return delivery


def _to_read(row: WebhookDeliveryRow) -> DeliveryRead:
    return DeliveryRead(
        id=row.id, event_id=row.event_id, url=row.url, event_type=str(row.payload.get("type", "")),
        status=row.status, attempts=row.attempts, last_status_code=row.last_status_code,
        last_error=row.last_error, next_attempt_at=row.next_attempt_at, created_at=row.created_at,
        delivered_at=row.delivered_at,
    )


def list_deliveries(session: Session, run_id: uuid.UUID) -> list[DeliveryRead]:
    rows = session.scalars(
        select(WebhookDeliveryRow).where(WebhookDeliveryRow.run_id == run_id).order_by(WebhookDeliveryRow.id)
    )
    return [_to_read(row) for row in rows]


# --- delivering ---------------------------------------------------------------------------


def retry_delay_s(attempts: int, backoff_s: float, rng: random.Random | None = None) -> float:
    """Seconds before the next attempt after ``attempts`` failed ones: exponential, capped at an
    hour, times a random factor in [0.5, 1) so that many failing receivers spread out."""
    exponential = min(MAX_BACKOFF_S, backoff_s * 2.0 ** max(attempts - 1, 0))
    return exponential * (rng or random).uniform(0.5, 1.0)


@dataclass(frozen=True)
class _Claim:
    id: int
    event_id: str
    url: str
    payload: dict[str, Any]
    attempts: int  # including this one
    lease_until: datetime


@dataclass(frozen=True)
class _Outcome:
    status_code: int | None
    error: str | None

    @property
    def delivered(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300


def _due(now: datetime) -> tuple[Any, ...]:
    row = WebhookDeliveryRow
    return (
        row.status == PENDING,
        row.next_attempt_at <= now,
        or_(row.lease_until.is_(None), row.lease_until < now),
    )


def _claim(settings: Settings, delivery_id: int, seen_attempts: int, now: datetime) -> _Claim | None:
    """Take the attempt: compare-and-set on (still due, attempts unchanged). None if another
    process took it first, or if no attempt is left (then it is marked failed)."""
    row = WebhookDeliveryRow
    lease_until = now + timedelta(seconds=settings.webhook_timeout_s + LEASE_MARGIN_S)
    with session_scope(settings.sqlalchemy_url) as session:
        guard = (row.id == delivery_id, row.attempts == seen_attempts, *_due(now))
        if seen_attempts >= settings.webhook_max_attempts:
            # Its last attempt was claimed by a process that stopped before recording it.
            session.execute(update(row).where(*guard).values(
                status=FAILED, lease_until=None,
                last_error=(f"gave up after {seen_attempts} attempts (the last one was interrupted)"),
            ))
            return None
        claimed = session.execute(
            update(row).where(*guard)
            .values(attempts=seen_attempts + 1, lease_until=lease_until)
            .returning(row.event_id, row.url, row.payload)
        ).one_or_none()
    if claimed is None:
        return None
    return _Claim(delivery_id, claimed.event_id, claimed.url, claimed.payload, seen_attempts + 1, lease_until)


def _post(client: httpx.Client, claim: _Claim, secret: bytes) -> _Outcome:
    body = canonical_json(claim.payload)
    headers = {
        "Content-Type": "application/json",
        "User-Agent": USER_AGENT,
        EVENT_ID_HEADER: claim.event_id,
        SIGNATURE_HEADER: sign(secret, body, int(time.time())),
    }
    try:
        with client.stream("POST", claim.url, content=body, headers=headers, follow_redirects=False) as response:
            if 200 <= response.status_code < 300:
                return _Outcome(response.status_code, None)
            excerpt = b""
            for chunk in response.iter_bytes():
                excerpt += chunk
                if len(excerpt) >= MAX_BODY_EXCERPT_BYTES:
                    break
        text = excerpt[:MAX_BODY_EXCERPT_BYTES].decode("utf-8", errors="replace").strip()
        reason = f"HTTP {response.status_code} {response.reason_phrase}".rstrip()
        return _Outcome(response.status_code, f"{reason}: {text}" if text else reason)
    except Exception as exc:  # a network error, a timeout, a URL httpx refuses: a failed attempt
        return _Outcome(None, f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)


def _record(settings: Settings, claim: _Claim, outcome: _Outcome, now: datetime) -> None:
    row = WebhookDeliveryRow
    values: dict[str, Any] = {"lease_until": None, "last_status_code": outcome.status_code}
    if outcome.delivered:
        values.update(status=DELIVERED, delivered_at=now, last_error=None)
    else:
        values["last_error"] = (outcome.error or "failed")[:MAX_ERROR_CHARS]
        if claim.attempts >= settings.webhook_max_attempts:
            values["status"] = FAILED
        else:
            delay = retry_delay_s(claim.attempts, settings.webhook_backoff_s)
            values["next_attempt_at"] = now + timedelta(seconds=delay)
    with session_scope(settings.sqlalchemy_url) as session:
        # Fenced by the claim: only the holder of this attempt's lease records its outcome.
        recorded = session.execute(
            update(row).where(
                row.id == claim.id, row.status == PENDING, row.attempts == claim.attempts,
                row.lease_until == claim.lease_until,
            ).values(**values)
        ).rowcount == 1
    if not recorded:
        log.warning("webhook %s: the lease ran out before attempt %d was recorded", claim.event_id, claim.attempts)
    elif outcome.delivered:
        log.info("webhook %s delivered to %s (attempt %d)", claim.event_id, claim.url, claim.attempts)
    else:
        log.warning(
            "webhook %s to %s: attempt %d failed (%s)%s", claim.event_id, claim.url, claim.attempts,
            values["last_error"], "; giving up" if values.get("status") == FAILED else "",
        )


def deliver_due(
    settings: Settings, *, limit: int = 20, now: datetime | None = None,
    client: httpx.Client | None = None,
) -> int:
    """Send up to ``limit`` due deliveries, one at a time, and return how many attempts were made.

    Safe to run in several processes at once. One delivery's failure (even an unexpected one)
    is logged and never raised; only failing to list the due deliveries or to read the signing
    secret raises. ``now`` fixes
    the clock for scheduling (tests); signatures always carry the real time.
    """
    clock: Callable[[], datetime] = (lambda: now) if now is not None else utcnow
    row = WebhookDeliveryRow
    with session_scope(settings.sqlalchemy_url) as session:
        due = session.execute(
            select(row.id, row.attempts).where(*_due(clock()))
            .order_by(row.next_attempt_at, row.id).limit(limit)
        ).all()
    if not due:
        return 0
    owned = client is None
    http = client or httpx.Client(timeout=httpx.Timeout(settings.webhook_timeout_s), follow_redirects=False)
    attempts = 0
    try:
        secret = webhook_secret(settings)
        for delivery_id, seen_attempts in due:
            try:
                claim = _claim(settings, delivery_id, seen_attempts, clock())
                if claim is None:
                    continue
                attempts += 1
                outcome = _post(http, claim, secret)
                _record(settings, claim, outcome, clock())
            except Exception:
                log.exception("webhook delivery %s: unexpected error", delivery_id)
    finally:
        if owned:
            http.close()
    return attempts
