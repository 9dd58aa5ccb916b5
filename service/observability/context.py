"""The request id and run id of the code running now, for log lines and outgoing messages.

Contextvars: each request (an asyncio task; threadpool calls copy the context) and each Celery
task sees its own values. The API sets the request id per request (``request_id`` module);
the run id of an API request is read lazily from the routed path parameters, so a log line in
``/v1/runs/{run_id}/...`` carries it without any per-request cost. Workers set both for the
duration of a task (``log_context``).
"""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Iterator, MutableMapping
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

REQUEST_ID_HEADER = "X-Request-ID"
# Taken from a caller only if it is short and made of safe characters (it ends up in log
# lines, response headers and broker messages); anything else is replaced by a fresh id.
_VALID_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,128}")

request_id_var: ContextVar[str | None] = ContextVar("mcdrop_request_id", default=None)
run_id_var: ContextVar[str | None] = ContextVar("mcdrop_run_id", default=None)
# The ASGI scope of the request being served: its "path_params" appear once it is routed.
http_scope_var: ContextVar[MutableMapping[str, Any] | None] = ContextVar("mcdrop_http_scope", default=None)


def valid_request_id(value: object) -> str | None:
    """``value`` if it is an acceptable request id (<= 128 of ``[A-Za-z0-9._-]``), else None."""
    if isinstance(value, str) and _VALID_REQUEST_ID.fullmatch(value):
        return value
    return None


def new_request_id() -> str:
    """32 random hex digits (os.urandom: unique across forked processes; ~4x faster than uuid4)."""
    return os.urandom(16).hex()


def current_request_id() -> str | None:
    return request_id_var.get()


def current_run_id() -> str | None:
    """The run this code works for: set by a worker's task, or the ``run_id`` path parameter
    of the API request being served (only if it is a UUID; the route rejects anything else)."""
    run_id = run_id_var.get()
    if run_id is not None:
        return run_id
    scope = http_scope_var.get()
    if scope is None:
        return None
    path_params = scope.get("path_params")
    candidate = path_params.get("run_id") if path_params else None
    if candidate is None:
        return None
    try:
        return str(uuid.UUID(str(candidate)))
    except ValueError:
        return None


@contextmanager
def log_context(*, request_id: str | None, run_id: str | None) -> Iterator[None]:
    """Within the block, log lines carry ``request_id`` and ``run_id`` (a worker's task)."""
    request_token = request_id_var.set(request_id)
    run_token = run_id_var.set(run_id)
    try:
        yield
    finally:
        run_id_var.reset(run_token)
        request_id_var.reset(request_token)
