"""Annotated dependencies: settings, a database session, the model cache, validated ids."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Annotated, Literal

import anyio
from fastapi import Depends, Query, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from service.auth import service as auth
from service.config import Settings
from service.datasets import service as datasets
from service.datasets.models import DatasetRow
from service.db import get_sessionmaker
from service.errors import Unauthenticated
from service.pagination import PageQuery
from service.runs import service as runs
from service.runs.inference import ModelCache
from service.runs.models import RunRow


def get_app_settings(request: Request) -> Settings:
    return request.app.state.settings


SettingsDep = Annotated[Settings, Depends(get_app_settings)]


def get_session(settings: SettingsDep) -> Iterator[Session]:
    session = get_sessionmaker(settings.sqlalchemy_url)()
    try:
        yield session
    finally:
        session.close()


SessionDep = Annotated[Session, Depends(get_session)]


def get_model_cache(request: Request) -> ModelCache:
    return request.app.state.model_cache


ModelCacheDep = Annotated[ModelCache, Depends(get_model_cache)]


_bearer = HTTPBearer(auto_error=False, description="An API key: `Authorization: Bearer mcd_...`")


async def current_tenant(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> str:
    """The caller's tenant, from its API key; every tenant-owned object is looked up within it.

    Async on purpose: a key seen in the last ``auth_cache_s`` seconds costs no database read
    and no threadpool hop (the predict hot path)."""
    settings: Settings = request.app.state.settings
    if not settings.auth_enabled:
        return auth.DEFAULT_TENANT
    if credentials is None:
        raise Unauthenticated("an API key is required: send `Authorization: Bearer <key>`")
    digest = auth.hash_key(credentials.credentials)
    cache: auth.KeyCache = request.app.state.key_cache
    tenant = cache.get(digest)
    if tenant is None:
        def lookup() -> str:
            with get_sessionmaker(settings.sqlalchemy_url)() as session:
                return auth.tenant_of_key(session, credentials.credentials)

        tenant = await anyio.to_thread.run_sync(lookup)
        cache.put(digest, tenant)
    return tenant


CurrentTenant = Annotated[str, Depends(current_tenant)]


async def tenant_of_request(request: Request) -> str:
    """``CurrentTenant`` without FastAPI's dependency solving (service.api.fast_routes)."""
    return await current_tenant(request, await _bearer(request))


def valid_run_id(run_id: uuid.UUID, session: SessionDep, tenant: CurrentTenant) -> RunRow:
    """Loads the caller's run or raises NotFound (404), also for another tenant's run."""
    return runs.get_row(session, run_id, tenant)


def valid_dataset_id(dataset_id: uuid.UUID, session: SessionDep, tenant: CurrentTenant) -> DatasetRow:
    return datasets.get_row(session, dataset_id, tenant)


ValidRun = Annotated[RunRow, Depends(valid_run_id)]
ValidDataset = Annotated[DatasetRow, Depends(valid_dataset_id)]


def page_query(
    limit: Annotated[int, Query(ge=1, le=1000, description="items per page")] = 100,
    cursor: Annotated[str | None, Query(max_length=512, description="next_cursor of the previous page")] = None,
    sort: Annotated[Literal["-created_at", "created_at"], Query(description="newest first (default) or oldest first")] = "-created_at",
    created_after: Annotated[datetime | None, Query(description="only items created at or after (ISO 8601; UTC if no offset)")] = None,
    created_before: Annotated[datetime | None, Query(description="only items created before")] = None,
) -> PageQuery:
    def utc(value: datetime | None) -> datetime | None:
        return value.replace(tzinfo=UTC) if value is not None and value.tzinfo is None else value

    return PageQuery(limit=limit, cursor=cursor, sort=sort, created_after=utc(created_after), created_before=utc(created_before))


PageDep = Annotated[PageQuery, Depends(page_query)]
