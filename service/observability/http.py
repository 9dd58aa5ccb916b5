"""Wiring for the API app: request ids, request metrics, GET /metrics and CORS."""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.middleware.cors import CORSMiddleware

from service.config import Settings
from service.observability.context import REQUEST_ID_HEADER
from service.observability.metrics import ApiMetrics, HttpMetricsMiddleware, metrics_endpoint
from service.observability.request_id import RequestIdMiddleware

# What a browser dashboard on another origin may send and read.
CORS_ALLOW_HEADERS = ["Authorization", "Content-Type", "Idempotency-Key", "Last-Event-ID", REQUEST_ID_HEADER]
CORS_EXPOSE_HEADERS = [REQUEST_ID_HEADER, "Retry-After", "Location", "Link", "WWW-Authenticate"]
CORS_ALLOW_METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"]


def install(app: Starlette, settings: Settings) -> None:
    """Middlewares, outermost first: request id (every response carries ``X-Request-ID``,
    preflights too) -> CORS, when ``MCDROP_CORS_ORIGINS`` lists origins -> request metrics
    (by route template) -> the app. Adds ``app.state.metrics`` and GET /metrics (outside the
    OpenAPI document and the API-key auth; ``MCDROP_METRICS_TOKEN`` guards it)."""
    app.state.metrics = ApiMetrics(settings)
    app.add_route("/metrics", metrics_endpoint, methods=["GET"], include_in_schema=False)
    # add_middleware wraps what was added before: add the innermost first.
    app.add_middleware(HttpMetricsMiddleware, metrics=app.state.metrics.http, router=app.router)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware, allow_origins=list(settings.cors_origins), allow_methods=CORS_ALLOW_METHODS,
            allow_headers=CORS_ALLOW_HEADERS, expose_headers=CORS_EXPOSE_HEADERS, allow_credentials=False,
            max_age=600,
        )
    app.add_middleware(RequestIdMiddleware)
