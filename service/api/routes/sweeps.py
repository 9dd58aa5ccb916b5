"""/v1/sweeps: grids of configurations × splits, trained as stacked networks by the workers."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Query
from fastapi.responses import JSONResponse

from service.api.deps import CurrentTenant, PageDep, SessionDep, SettingsDep
from service.api.idempotency import IdempotencyKey, canonical, create_once
from service.jobs.idempotency import fingerprint
from service.runs import service as runs
from service.sweeps import service as sweeps
from service.runs.schemas import RunStatusName
from service.sweeps.schemas import SweepCreate, SweepList, SweepRead

router = APIRouter(prefix="/v1/sweeps", tags=["sweeps"])


@router.post("", status_code=202, response_model=SweepRead, responses={422: {"description": "invalid sweep"}})
def create_sweep(
    data: SweepCreate, session: SessionDep, settings: SettingsDep, tenant: CurrentTenant,
    idempotency_key: IdempotencyKey = None,
) -> JSONResponse:
    """Queue a sweep. Follow it with GET /v1/sweeps/{id} (or /v1/runs/{id}/events); cancel it
    with POST /v1/sweeps/{id}/cancel."""
    return create_once(
        settings, idempotency_key, tenant=tenant, scope="POST /v1/sweeps", status_code=202,
        fingerprint=fingerprint(canonical(data.model_dump(mode="json"))),
        create=lambda: sweeps.create(session, settings, data, tenant),
    )


@router.get("", response_model=SweepList)
def list_sweeps(
    session: SessionDep, tenant: CurrentTenant, page: PageDep, status: RunStatusName | None = None,
    dataset_id: uuid.UUID | None = None,
) -> SweepList:
    """The caller's sweeps, a page at a time, filtered by status, dataset and creation time."""
    result = sweeps.list_page(session, tenant, page, status=status, dataset_id=dataset_id)
    return SweepList(items=result.items, next_cursor=result.next_cursor)


@router.get("/{sweep_id}", response_model=SweepRead, responses={404: {"description": "no such sweep"}})
def read_sweep(sweep_id: uuid.UUID, session: SessionDep, tenant: CurrentTenant) -> SweepRead:
    return sweeps.read(session, sweep_id, tenant)


@router.post("/{sweep_id}/cancel", response_model=SweepRead,
             responses={404: {"description": "no such sweep"}, 409: {"description": "already ended"}})
def cancel_sweep(sweep_id: uuid.UUID, session: SessionDep, settings: SettingsDep, tenant: CurrentTenant) -> SweepRead:
    sweeps.get_row(session, sweep_id, tenant)
    runs.cancel(session, settings, sweep_id, tenant)
    return sweeps.read(session, sweep_id, tenant)
