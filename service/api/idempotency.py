"""Idempotency-Key for POSTs that create something (the semantics live in service.jobs.idempotency)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Annotated

from fastapi import Header
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from service.config import Settings
from service.jobs import idempotency

IdempotencyKey = Annotated[
    str | None,
    Header(
        alias=idempotency.HEADER,
        description="Retry-safe creation: the same key with the same body returns the original "
        "response (200) instead of creating again; with another body, 422.",
    ),
]


def canonical(value: object) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


def create_once(
    settings: Settings, key: str | None, *, tenant: str, scope: str, fingerprint: str, status_code: int,
    create: Callable[[], BaseModel],
) -> JSONResponse:
    """Run ``create`` at most once per (tenant, scope, key); replays answer 200 with the first
    body. Keys are per tenant: another tenant's identical key is a different request."""

    def run() -> tuple[int, dict]:
        return status_code, create().model_dump(mode="json")

    if key is None:
        status, body = run()
        return JSONResponse(body, status_code=status)
    status, body, replayed = idempotency.execute(
        settings.sqlalchemy_url, scope=f"{tenant}:{scope}", key=key, fingerprint=fingerprint,
        ttl_s=settings.idempotency_ttl_s, create=run,
    )
    return JSONResponse(body, status_code=200 if replayed else status, headers={"Idempotent-Replayed": str(replayed).lower()})
