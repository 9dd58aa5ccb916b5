"""The one place where errors become HTTP responses: RFC 9457 problem+json."""

from __future__ import annotations

import logging
import math
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DBAPIError, OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.errors import (
    Conflict,
    DomainError,
    InvalidInput,
    NotFound,
    PayloadTooLarge,
    Unauthenticated,
    Unavailable,
)
from service.observability.context import REQUEST_ID_HEADER, current_request_id

log = logging.getLogger(__name__)

PROBLEM_JSON = "application/problem+json"

STATUS_BY_ERROR: list[tuple[type[DomainError], int]] = [
    (Unauthenticated, 401),
    (NotFound, 404),
    (Conflict, 409),  # InvalidState is a Conflict
    (InvalidInput, 422),
    (PayloadTooLarge, 413),
    (Unavailable, 503),
]


def problem(
    request: Request, status: int, detail: str, *, errors: list[dict[str, Any]] | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    if request.url.path == "/v2" or request.url.path.startswith("/v2/"):
        # The Open Inference Protocol (KServe V2) has its own error shape: {"error": "..."}.
        return JSONResponse({"error": detail}, status_code=status, headers=headers)
    body: dict[str, Any] = {
        "type": "about:blank",
        "title": HTTPStatus(status).phrase,
        "status": status,
        "detail": detail,
        "instance": request.url.path,
    }
    if errors:
        body["errors"] = errors
    return JSONResponse(jsonable_encoder(body), status_code=status, media_type=PROBLEM_JSON, headers=headers)


def _validation_errors(exc: RequestValidationError) -> list[dict[str, Any]]:
    errors = []
    for error in exc.errors():
        item = {"loc": list(error.get("loc", ())), "msg": error.get("msg", ""), "type": error.get("type", "")}
        value = error.get("input")
        if isinstance(value, (str, int, bool)) or (isinstance(value, float) and math.isfinite(value)):
            item["input"] = value if not isinstance(value, str) else value[:200]
        elif isinstance(value, float):  # NaN and infinities are not JSON: say what they were
            item["input"] = repr(value)
        errors.append(item)
    return errors


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(DomainError)
    async def domain_error(request: Request, exc: DomainError) -> JSONResponse:
        status = next((code for kind, code in STATUS_BY_ERROR if isinstance(exc, kind)), 400)
        retry_after = getattr(exc, "retry_after_s", None)
        headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
        if isinstance(exc, Unauthenticated):
            headers = {"WWW-Authenticate": 'Bearer realm="mcdrop"'}
        return problem(request, status, exc.detail, errors=exc.errors, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = _validation_errors(exc)
        where = ", ".join(".".join(str(part) for part in e["loc"]) + ": " + e["msg"] for e in errors[:3])
        return problem(request, 422, f"the request is not valid: {where}", errors=errors)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        detail = exc.detail if isinstance(exc.detail, str) else HTTPStatus(exc.status_code).phrase
        return problem(request, exc.status_code, detail, headers=getattr(exc, "headers", None))

    @app.exception_handler(OperationalError)
    async def database_unavailable(request: Request, exc: OperationalError) -> JSONResponse:
        log.warning("database unavailable: %s", exc.orig)
        return problem(request, 503, "the database is unavailable; try again shortly", headers={"Retry-After": "5"})

    @app.exception_handler(DBAPIError)
    async def database_error(request: Request, exc: DBAPIError) -> JSONResponse:
        if exc.connection_invalidated:
            return problem(request, 503, "the database connection was lost; try again shortly", headers={"Retry-After": "5"})
        log.exception("database error", exc_info=exc)
        return problem(request, 500, "internal database error")

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        # Answered outside the middlewares (Starlette's ServerErrorMiddleware): add the request id here.
        request_id = current_request_id()
        return problem(request, 500, "internal server error",
                       headers={REQUEST_ID_HEADER: request_id} if request_id else None)
