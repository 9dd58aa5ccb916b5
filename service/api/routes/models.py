"""/v1/models: the model registry — versions, gated aliases, predict and acquire by name."""

from __future__ import annotations

import logging
from typing import Annotated

import anyio.to_thread
from fastapi import APIRouter, Path, Query, Request, Response

from service.api.deps import CurrentTenant, PageDep, SessionDep, SettingsDep
from service.registry import acquisition
from service.registry import service as registry
from service.registry.schemas import (
    ALIAS_PATTERN,
    MODEL_NAME_PATTERN,
    AcquireRequest,
    AcquireResponse,
    AliasGatesUpdate,
    AliasMove,
    AliasRead,
    ModelVersionCreate,
    ModelVersionList,
    ModelVersionRead,
    RegisteredModelList,
    RegisteredModelRead,
)
from service.registry.serving import ServingAliases
from service.runs import service as runs
from service.runs.batching import app_batcher
from service.runs.schemas import PredictRequest, PredictResponse

log = logging.getLogger(__name__)

router = APIRouter(prefix="/v1/models", tags=["models"])

ModelNamePath = Annotated[str, Path(pattern=MODEL_NAME_PATTERN, description="the registered model's name")]
AliasPath = Annotated[str, Path(pattern=ALIAS_PATTERN, description="e.g. production, staging")]
AliasQuery = Annotated[str | None, Query(pattern=ALIAS_PATTERN, description="serve this alias (default: production)")]
VersionQuery = Annotated[int | None, Query(ge=1, le=2**31 - 1, description="serve this version (instead of an alias)")]

NOT_FOUND = {404: {"description": "no such model, version or alias (also another tenant's)"}}


def _aliases(request: Request) -> ServingAliases:
    return request.app.state.model_aliases


def _follow_now(request: Request) -> None:
    """After a change of aliases: this replica preloads and switches right away (the others
    within their refresh interval)."""
    aliases = _aliases(request)
    if aliases.following:
        try:
            aliases.refresh(force=True)
        except Exception as exc:  # the change is committed; the refresher will catch up
            log.warning("alias refresh after a change failed: %s: %s", type(exc).__name__, str(exc)[:300])


@router.post(
    "/{name}/predict",
    response_model=PredictResponse,
    responses={**NOT_FOUND, 409: {"description": "the run is not servable"}, 422: {"description": "bad inputs"}},
)
async def predict_model(
    name: ModelNamePath, request: PredictRequest, http_request: Request, tenant: CurrentTenant,
    alias: AliasQuery = None, version: VersionQuery = None,
) -> Response:
    """Monte Carlo dropout prediction by model name, at `alias` (default `production`) or
    `version`; the same body and response as POST /v1/runs/{run_id}/predict (micro-batched
    likewise). The `X-Model-Version` header says which version answered. After an alias move,
    each replica switches only once the new version is loaded (no cold start)."""
    state = http_request.app.state
    aliases: ServingAliases = state.model_aliases
    target = aliases.cached(tenant, name, alias, version)
    if target is None:
        target = await anyio.to_thread.run_sync(aliases.resolve_in_own_session, tenant, name, alias, version)
    batcher = app_batcher(state, state.settings)
    predicted = await runs.predict(state.settings, state.model_cache, batcher, target.run_id, request, tenant)
    return Response(predicted.json(), media_type="application/json",
                    headers={"X-Model-Version": str(target.version)})


@router.post(
    "", status_code=201, response_model=ModelVersionRead,
    responses={409: {"description": "the run has not succeeded, or is already a version of this model"},
               422: {"description": "no such run of the caller, or not a training run"}},
)
def register_model_version(data: ModelVersionCreate, session: SessionDep, tenant: CurrentTenant) -> ModelVersionRead:
    """Register a succeeded training run as the next version (1, 2, ...) of the named model,
    creating the model on first use."""
    return registry.register_version(session, tenant, data)


@router.get("", response_model=RegisteredModelList)
def list_models(session: SessionDep, tenant: CurrentTenant, page: PageDep) -> RegisteredModelList:
    """The caller's registered models with their aliases, a page at a time."""
    result = registry.list_models(session, tenant, page)
    return RegisteredModelList(items=result.items, next_cursor=result.next_cursor)


@router.get("/{name}", response_model=RegisteredModelRead, responses=NOT_FOUND)
def read_model(name: ModelNamePath, session: SessionDep, tenant: CurrentTenant) -> RegisteredModelRead:
    return registry.read_model(session, tenant, name)


@router.get("/{name}/versions", response_model=ModelVersionList, responses=NOT_FOUND)
def list_model_versions(name: ModelNamePath, session: SessionDep, tenant: CurrentTenant, page: PageDep) -> ModelVersionList:
    """The model's versions (newest first unless `sort=created_at`) with the aliases on each."""
    result = registry.list_versions(session, tenant, name, page)
    return ModelVersionList(items=result.items, next_cursor=result.next_cursor)


@router.put(
    "/{name}/aliases/{alias}", response_model=AliasRead,
    responses={**NOT_FOUND, 409: {"description": "the version fails the alias's gates (each failing condition listed)"}},
)
def move_alias(
    name: ModelNamePath, alias: AliasPath, data: AliasMove, request: Request, session: SessionDep,
    tenant: CurrentTenant,
) -> AliasRead:
    """Point the alias (created if new) at a version, in one call. If the alias has gates, the
    version's stored evaluation must pass every condition, else 409 with the failing ones
    (actual values included; a missing metric fails too)."""
    moved = registry.move_alias(session, tenant, name, alias, data.version)
    _follow_now(request)
    return moved


@router.put("/{name}/aliases/{alias}/gates", response_model=AliasRead, responses=NOT_FOUND)
def set_alias_gates(
    name: ModelNamePath, alias: AliasPath, data: AliasGatesUpdate, session: SessionDep, tenant: CurrentTenant,
) -> AliasRead:
    """Replace the alias's gate conditions (creating the alias, pointing nowhere, if new). They
    apply to later moves; the version it points at now is not re-checked."""
    return registry.set_gates(session, tenant, name, alias, data.conditions)


@router.delete("/{name}/aliases/{alias}", status_code=204, responses=NOT_FOUND)
def delete_alias(name: ModelNamePath, alias: AliasPath, request: Request, session: SessionDep, tenant: CurrentTenant) -> Response:
    """Remove the alias and its gates."""
    registry.delete_alias(session, tenant, name, alias)
    _follow_now(request)
    return Response(status_code=204)


@router.post(
    "/{name}/acquire", response_model=AcquireResponse,
    responses={**NOT_FOUND, 422: {"description": "bad pool, limits exceeded, or a strategy the model's task lacks"}},
)
def acquire(
    name: ModelNamePath, data: AcquireRequest, request: Request, session: SessionDep, settings: SettingsDep,
    tenant: CurrentTenant, alias: AliasQuery = None, version: VersionQuery = None,
) -> AcquireResponse:
    """Active learning: rank a pool of unlabelled rows (inline `inputs` or a `dataset_id`) by
    BALD (mutual information), predictive entropy or variation ratio under MC dropout, and
    return the top `k` (index into the pool, score and the uncertainty fields), highest first.
    With a `seed` the ranking is reproducible; without one, the seed used is returned."""
    return acquisition.acquire(
        session, settings, request.app.state.model_cache, _aliases(request), tenant, name, data,
        alias=alias, version=version,
    )
