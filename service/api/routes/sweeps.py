"""/v1/sweeps: grids of configurations × splits, trained as stacked networks by the workers."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Query
from fastapi.responses import JSONResponse

from service.api.deps import SessionDep, SettingsDep
from service.api.idempotency import IdempotencyKey, canonical, create_once
from service.jobs.idempotency import fingerprint
from service.runs import service as runs
from service.sweeps import service as sweeps
from service.sweeps.schemas import SweepCreate, SweepList, SweepRead

router = APIRouter(prefix="/v1/sweeps", tags=["sweeps"])


@router.post("", status_code=202, response_model=SweepRead, responses={422: {"description": "invalid sweep"}})
def create_sweep(
    data: SweepCreate, session: SessionDep, settings: SettingsDep, idempotency_key: IdempotencyKey = None,
) -> JSONResponse:
    """Queue a sweep. Follow it with GET /v1/sweeps/{id} (or /v1/runs/{id}/events); cancel it
    with POST /v1/sweeps/{id}/cancel."""
    return create_once(
        settings, idempotency_key, scope="POST /v1/sweeps", status_code=202,
        fingerprint=fingerprint(canonical(data.model_dump(mode="json"))),
        create=lambda: sweeps.create(session, settings, data),
    )


@router.get("", response_model=SweepList)
def list_sweeps(session: SessionDep, limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> SweepList:
    return SweepList(items=sweeps.list_sweeps(session, limit=limit))


@router.get("/{sweep_id}", response_model=SweepRead, responses={404: {"description": "no such sweep"}})
def read_sweep(sweep_id: uuid.UUID, session: SessionDep) -> SweepRead:
    return sweeps.read(session, sweep_id)


@router.post("/{sweep_id}/cancel", response_model=SweepRead,
             responses={404: {"description": "no such sweep"}, 409: {"description": "already ended"}})
def cancel_sweep(sweep_id: uuid.UUID, session: SessionDep, settings: SettingsDep) -> SweepRead:
    sweeps.get_row(session, sweep_id)
    runs.cancel(session, settings, sweep_id)
    return sweeps.read(session, sweep_id)
