"""The FastAPI application: create_app, lifespan, routers, error mapping."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import torch
from fastapi import APIRouter, FastAPI

from service.api.errors import install_error_handlers
from service.api.routes import batch_predictions, dashboard, datasets, events, health, keys, models, queue, runs, sweeps, v2
from service.auth.service import DEFAULT_TENANT, KeyCache
from service.config import Settings, get_settings
from service.jobs.reconciler import ReconcilerThread
from service.observability import http as observability
from service.registry.serving import AliasRefresher, ServingAliases
from service.runs.inference import ModelCache
from service.tuning import tune_allocator, tune_garbage_collector

log = logging.getLogger(__name__)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    refusal = settings.auth_problem()
    if refusal is not None:
        raise RuntimeError(refusal)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Many small requests: one intra-op thread each is fastest and never stalls against
        # the worker's threads on a small machine.
        if settings.api_torch_threads > 0:
            torch.set_num_threads(settings.api_torch_threads)
        tune_allocator()  # MC calls reuse heap pages instead of faulting in fresh ones
        await asyncio.to_thread(app.state.model_cache.warm_up)  # the MC kernels, before the first prediction
        tune_garbage_collector(settings.api_gc_threshold)  # after the warm-up: its objects are frozen too
        if not settings.auth_enabled:
            log.warning(
                "auth is OFF (MCDROP_AUTH=off, embedded server on loopback): every caller is tenant %r",
                DEFAULT_TENANT,
            )
        background = ReconcilerThread(settings).start() if settings.reconcile_interval_s > 0 else None
        # Follows alias moves: preloads each new target model, then switches (service/registry/serving.py).
        refresher = AliasRefresher(app.state.model_aliases).start() if settings.registry_refresh_interval_s > 0 else None
        try:
            yield
        finally:
            if refresher is not None:
                refresher.stop()
            if background is not None:
                background.stop()
            batcher = getattr(app.state, "predict_batcher", None)
            if batcher is not None:
                batcher.close()

    app = FastAPI(
        title="mcdrop",
        version="0.1.0",
        summary="Train dropout networks; predict with Monte Carlo dropout uncertainty.",
        lifespan=lifespan,
        # Off unless asked for (Settings.otel); on, FastAPI reports to whatever providers are set up.
        telemetry=None if settings.otel else {"tracing": False, "metrics": False, "logs": False},
    )
    app.state.settings = settings
    app.state.model_cache = ModelCache(settings.model_cache_size)
    app.state.model_aliases = ServingAliases(settings, app.state.model_cache)
    app.state.key_cache = KeyCache(settings.auth_cache_s)
    install_error_handlers(app)
    observability.install(app, settings)  # X-Request-ID, request metrics, GET /metrics, CORS
    # Starlette tries routes in order, ~1-2 µs each: the serving routers first (the predict
    # routes lead theirs), so that a prediction is matched after a handful of tries.
    for module in (runs, models, v2, batch_predictions, health, keys, datasets, events, sweeps, queue, dashboard):
        _add_routes(app, module.router)
    return app


def _add_routes(app: FastAPI, router: APIRouter) -> None:
    """The router's routes on the app's own router, as ``include_router`` did before FastAPI kept
    included routers as nodes: those are matched through per-request context objects, ~35 µs of
    CPU per predict request here (a fifth of the API's). Our routers carry nothing but a prefix,
    tags and include_in_schema, which their routes already have; anything more is refused here
    rather than silently dropped."""
    plain = APIRouter(prefix=router.prefix, tags=router.tags, include_in_schema=router.include_in_schema)
    for setting in ("dependencies", "responses", "callbacks", "default_response_class", "route_class",
                    "generate_unique_id_function", "deprecated", "redirect_slashes"):
        if getattr(router, setting) != getattr(plain, setting):
            raise RuntimeError(f"router {router.prefix or '/'} sets {setting}: include it with include_router")
    app.router.routes.extend(router.routes)
