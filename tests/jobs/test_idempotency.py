"""Idempotency-Key semantics against real databases: PostgreSQL, and a SQLite file."""

from __future__ import annotations

import threading
import time
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from service.db import session_scope, utcnow
from service.errors import InvalidInput
from service.jobs import idempotency
from service.jobs.idempotency import IdempotencyInProgress, IdempotencyKeyReused, execute, fingerprint, validate_key
from service.jobs.models import IdempotencyKeyRow
from service.migrate import upgrade

TTL_S = 3600.0


@pytest.fixture(scope="module")
def sqlite_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    path: Path = tmp_path_factory.mktemp("idempotency") / "mcdrop.db"
    url = f"sqlite:///{path}"
    upgrade(url)
    return url


@pytest.fixture(params=["postgresql", "sqlite"])
def url(request: pytest.FixtureRequest) -> str:
    return request.getfixturevalue("postgres_url" if request.param == "postgresql" else "sqlite_url")


def new_key() -> tuple[str, str]:
    """A scope and key that no other test uses."""
    return f"POST /v1/test/{uuid.uuid4().hex[:8]}", f"key-{uuid.uuid4()}"


class Create:
    """A create() that counts its calls, can be slow, and answers with a fresh id each time."""

    def __init__(self, *, sleep_s: float = 0.0, status: int = 201, error: Exception | None = None) -> None:
        self.calls = 0
        self.sleep_s = sleep_s
        self.status = status
        self.error = error
        self._lock = threading.Lock()

    def __call__(self) -> tuple[int, dict[str, Any]]:
        with self._lock:
            self.calls += 1
        time.sleep(self.sleep_s)
        if self.error is not None:
            raise self.error
        return self.status, {"id": uuid.uuid4().hex, "nested": {"values": [1, 2.5, None]}}


def read_row(url: str, scope: str, key: str) -> IdempotencyKeyRow | None:
    with session_scope(url) as session:
        return session.scalars(
            select(IdempotencyKeyRow).where(IdempotencyKeyRow.scope == scope, IdempotencyKeyRow.key == key)
        ).one_or_none()


def insert_in_progress(url: str, scope: str, key: str, fingerprint_: str, *, locked_for_s: float) -> None:
    now = utcnow()
    with session_scope(url) as session:
        session.add(IdempotencyKeyRow(
            scope=scope, key=key, fingerprint=fingerprint_, status="in_progress", created_at=now,
            expires_at=now + timedelta(seconds=TTL_S), locked_until=now + timedelta(seconds=locked_for_s),
        ))


def test_fingerprint_is_sha256_over_length_prefixed_parts() -> None:
    assert len(fingerprint(b"body")) == 64
    assert fingerprint(b"ab", b"c") != fingerprint(b"a", b"bc")
    assert fingerprint(b"body") == fingerprint(b"body")
    assert fingerprint(b"body") != fingerprint(b"body", b"")


@pytest.mark.parametrize("key", ["", "k" * 256, "k" * 300, "a\nb", "a\x00b", "tab\t", "sp ace", "clé"])
def test_validate_key_rejects(key: str) -> None:
    with pytest.raises(InvalidInput) as caught:
        validate_key(key)
    assert caught.value.errors[0]["loc"] == ["header", "Idempotency-Key"]


def test_validate_key_accepts_visible_ascii() -> None:
    for key in ["a", "k" * 255, str(uuid.uuid4()), "!~{}:/=+"]:
        assert validate_key(key) == key


def test_sequential_repeat_replays_the_first_response(url: str) -> None:
    scope, key = new_key()
    create = Create()
    first = execute(url, scope=scope, key=key, fingerprint=fingerprint(b"{}"), ttl_s=TTL_S, create=create)
    second = execute(url, scope=scope, key=key, fingerprint=fingerprint(b"{}"), ttl_s=TTL_S, create=create)
    assert first[2] is False and second[2] is True
    assert first[:2] == second[:2] and first[0] == 201
    assert create.calls == 1
    row = read_row(url, scope, key)
    assert row is not None and row.status == "completed" and row.response_body == first[1]
    # the same key in another scope is another key
    other = execute(url, scope=scope + "/other", key=key, fingerprint=fingerprint(b"{}"), ttl_s=TTL_S, create=create)
    assert other[2] is False and create.calls == 2


def test_same_key_with_another_body_is_refused(url: str) -> None:
    scope, key = new_key()
    create = Create()
    execute(url, scope=scope, key=key, fingerprint=fingerprint(b"a"), ttl_s=TTL_S, create=create)
    with pytest.raises(IdempotencyKeyReused) as caught:
        execute(url, scope=scope, key=key, fingerprint=fingerprint(b"b"), ttl_s=TTL_S, create=create)
    assert isinstance(caught.value, InvalidInput)
    assert caught.value.errors[0]["loc"] == ["header", "Idempotency-Key"]
    assert create.calls == 1


def test_failed_create_frees_the_key(url: str) -> None:
    scope, key = new_key()
    failing = Create(error=RuntimeError("boom"))
    with pytest.raises(RuntimeError, match="boom"):
        execute(url, scope=scope, key=key, fingerprint=fingerprint(b"x"), ttl_s=TTL_S, create=failing)
    assert read_row(url, scope, key) is None
    create = Create()
    status, _, replayed = execute(url, scope=scope, key=key, fingerprint=fingerprint(b"x"), ttl_s=TTL_S, create=create)
    assert (status, replayed, create.calls) == (201, False, 1)


def test_non_2xx_responses_are_not_stored(url: str) -> None:
    scope, key = new_key()
    create = Create(status=409)
    assert execute(url, scope=scope, key=key, fingerprint=fingerprint(b"x"), ttl_s=TTL_S, create=create)[0] == 409
    assert read_row(url, scope, key) is None
    execute(url, scope=scope, key=key, fingerprint=fingerprint(b"x"), ttl_s=TTL_S, create=create)
    assert create.calls == 2


def test_expired_key_runs_again_and_is_purged(url: str) -> None:
    scope, key = new_key()
    create = Create()
    first = execute(url, scope=scope, key=key, fingerprint=fingerprint(b"a"), ttl_s=0.05, create=create)
    time.sleep(0.1)
    # an expired key is free again, even for another body
    second = execute(url, scope=scope, key=key, fingerprint=fingerprint(b"b"), ttl_s=0.05, create=create)
    assert create.calls == 2 and second[2] is False and second[1] != first[1]
    time.sleep(0.1)
    # purged here, or already by a reconciler of the same database (it purges on every pass)
    idempotency.purge_expired(url)
    assert read_row(url, scope, key) is None


def test_concurrent_duplicates_run_create_once(url: str) -> None:
    scope, key = new_key()
    create = Create(sleep_s=0.3)
    barrier = threading.Barrier(8)
    results: list[tuple[int, dict[str, Any], bool]] = []
    errors: list[BaseException] = []

    def request() -> None:
        barrier.wait()
        try:
            results.append(execute(url, scope=scope, key=key, fingerprint=fingerprint(b"same"), ttl_s=TTL_S, create=create))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=request) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=20)
    assert not errors, errors
    assert create.calls == 1
    assert len(results) == 8
    assert len({repr(body) for _, body, _ in results}) == 1
    assert sorted(replayed for _, _, replayed in results) == [False] + [True] * 7


def test_stale_lock_is_taken_over(url: str) -> None:
    scope, key = new_key()
    insert_in_progress(url, scope, key, fingerprint(b"x"), locked_for_s=-1)  # its process died
    create = Create()
    status, body, replayed = execute(url, scope=scope, key=key, fingerprint=fingerprint(b"x"), ttl_s=TTL_S, create=create)
    assert (status, replayed, create.calls) == (201, False, 1)
    row = read_row(url, scope, key)
    assert row is not None and row.status == "completed" and row.response_body == body


def test_in_progress_past_wait_is_a_conflict(url: str) -> None:
    scope, key = new_key()
    insert_in_progress(url, scope, key, fingerprint(b"x"), locked_for_s=60)
    create = Create()
    started = time.monotonic()
    with pytest.raises(IdempotencyInProgress) as caught:
        execute(url, scope=scope, key=key, fingerprint=fingerprint(b"x"), ttl_s=TTL_S, create=create, wait_s=0.2)
    assert time.monotonic() - started >= 0.2
    assert create.calls == 0
    assert caught.value.errors[0]["loc"] == ["header", "Idempotency-Key"]
    # another body is refused at once, without waiting
    with pytest.raises(IdempotencyKeyReused):
        execute(url, scope=scope, key=key, fingerprint=fingerprint(b"y"), ttl_s=TTL_S, create=create, wait_s=5)


def test_waiter_replays_when_the_first_request_completes(url: str) -> None:
    scope, key = new_key()
    first_create = Create(sleep_s=0.3)
    first: list[tuple[int, dict[str, Any], bool]] = []
    thread = threading.Thread(target=lambda: first.append(
        execute(url, scope=scope, key=key, fingerprint=fingerprint(b"x"), ttl_s=TTL_S, create=first_create)
    ))
    thread.start()
    while read_row(url, scope, key) is None:
        time.sleep(0.01)
    second_create = Create()
    second = execute(url, scope=scope, key=key, fingerprint=fingerprint(b"x"), ttl_s=TTL_S, create=second_create)
    thread.join(timeout=10)
    assert second_create.calls == 0 and second[2] is True
    assert first[0][:2] == second[:2]
