"""The FastAPI application: create_app, lifespan, routers, error mapping."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import torch
from fastapi import FastAPI

from service.api.errors import install_error_handlers
from service.api.routes import datasets, events, health, queue, runs, sweeps
from service.config import Settings, get_settings
from service.jobs.reconciler import ReconcilerThread
from service.runs.inference import ModelCache
from service.tuning import tune_allocator

log = logging.getLogger(__name__)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Many small requests: one intra-op thread each is fastest and never stalls against
        # the worker's threads on a small machine.
        if settings.api_torch_threads > 0:
            torch.set_num_threads(settings.api_torch_threads)
        tune_allocator()  # MC calls reuse heap pages instead of faulting in fresh ones
        background = ReconcilerThread(settings).start() if settings.reconcile_interval_s > 0 else None
        try:
            yield
        finally:
            if background is not None:
                background.stop()

    app = FastAPI(
        title="mcdrop",
        version="0.1.0",
        summary="Train dropout networks; predict with Monte Carlo dropout uncertainty.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.model_cache = ModelCache(settings.model_cache_size)
    install_error_handlers(app)
    for module in (health, datasets, runs, events, sweeps, queue):
        app.include_router(module.router)
    return app
