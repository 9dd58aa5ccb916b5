"""The app's routes: added flat to its own router (service.api.app._add_routes), the predict
routes matched first, the OpenAPI document as include_router would make it."""

from __future__ import annotations

import pytest
from fastapi import APIRouter, Depends, FastAPI

from service.api.app import _add_routes, create_app
from service.config import Settings


def test_routes_are_flat_with_the_predict_route_first(settings: Settings) -> None:
    app = create_app(settings)
    paths = [getattr(route, "path", None) for route in app.router.routes]
    api_paths = [path for path in paths if path and path.startswith("/v")]
    assert api_paths[0] == "/v1/runs/{run_id}/predict"
    assert all(type(route).__name__ != "_IncludedRouter" for route in app.router.routes)
    # the same operations as routers included the usual way
    included = FastAPI()
    for route in app.router.routes:
        if getattr(route, "path", "").startswith(("/v", "/healthz", "/readyz", "/dashboard")):
            router = APIRouter()
            router.routes.append(route)
            included.include_router(router)
    assert app.openapi()["paths"].keys() == included.openapi()["paths"].keys()


def test_a_router_with_settings_of_its_own_is_refused() -> None:
    guarded = APIRouter(prefix="/x", dependencies=[Depends(lambda: None)])

    @guarded.get("/y")
    def y() -> dict:
        return {}

    with pytest.raises(RuntimeError, match="dependencies"):
        _add_routes(FastAPI(), guarded)
