"""Which failures are transient infrastructure errors (worth retrying), and a bounded retry."""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from typing import TypeVar

import redis.exceptions
from kombu.exceptions import OperationalError as BrokerOperationalError
from sqlalchemy.exc import DBAPIError, OperationalError

log = logging.getLogger(__name__)

T = TypeVar("T")


class TransientFailure(Exception):
    """Infrastructure stayed unreachable past the retry budget; the job is retried later."""


def is_transient(exc: BaseException) -> bool:
    if isinstance(exc, OperationalError):
        return True
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return True
    return isinstance(exc, (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError,
                            BrokerOperationalError, ConnectionError, TimeoutError))


def backoff_delay(attempt: int, base: float = 0.5, cap: float = 10.0) -> float:
    """Exponential backoff with full jitter (attempt counts from 1)."""
    return random.uniform(0.5, 1.0) * min(cap, base * 2 ** (attempt - 1))


def retry_transient(operation: Callable[[], T], *, budget_s: float, what: str) -> T:
    """Run ``operation``, retrying transient errors with backoff for up to ``budget_s``."""
    deadline = time.monotonic() + budget_s
    attempt = 0
    while True:
        attempt += 1
        try:
            return operation()
        except Exception as exc:
            if not is_transient(exc):
                raise
            if time.monotonic() >= deadline:
                raise TransientFailure(f"{what}: still failing after {budget_s:.0f} s: {exc}") from exc
            delay = backoff_delay(attempt)
            log.warning("%s failed (%s: %s); retrying in %.1f s", what, type(exc).__name__, str(exc)[:200], delay)
            time.sleep(delay)
