"""Liveness and readiness."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from sqlalchemy import text
from starlette.concurrency import run_in_threadpool

from service import queue
from service.api.deps import SessionDep, SettingsDep

router = APIRouter(tags=["health"])


@router.get("/healthz")
def read_health() -> dict[str, str]:
    """The process is up."""
    return {"status": "ok"}


@router.get("/readyz", responses={503: {"description": "database or broker unreachable"}})
async def read_readiness(settings: SettingsDep, session: SessionDep) -> JSONResponse:
    """200 when both the database and the broker answer, else 503 (problem+json)."""
    checks: dict[str, str] = {}

    def database() -> None:
        session.execute(text("SELECT 1"))

    for name, check in (("database", database), ("broker", lambda: queue.check_broker(settings))):
        try:
            await run_in_threadpool(check)
            checks[name] = "ok"
        except Exception as exc:  # any failure means not ready; say which and why
            checks[name] = f"unavailable: {type(exc).__name__}: {exc}"[:300]
    if all(value == "ok" for value in checks.values()):
        return JSONResponse({"status": "ready", "checks": checks})
    return JSONResponse(
        {
            "type": "about:blank", "title": "Service Unavailable", "status": 503,
            "detail": "not ready: " + ", ".join(k for k, v in checks.items() if v != "ok"),
            "instance": "/readyz", "checks": checks,
        },
        status_code=503, media_type="application/problem+json", headers={"Retry-After": "5"},
    )
