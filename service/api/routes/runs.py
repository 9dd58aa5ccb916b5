"""/v1/runs: submit training, follow it, predict with Monte Carlo dropout."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from service.api.deps import ModelCacheDep, SessionDep, SettingsDep, ValidRun
from service.runs import service as runs
from service.runs.schemas import (
    MetricsList,
    PredictRequest,
    PredictResponse,
    RunCreate,
    RunList,
    RunRead,
    RunStatusName,
)

router = APIRouter(prefix="/v1/runs", tags=["runs"])


@router.post("", status_code=202, response_model=RunRead, responses={422: {"description": "invalid spec"}})
def create_run(data: RunCreate, session: SessionDep, settings: SettingsDep) -> RunRead:
    """Queue a training run; it is picked up by a worker. Poll it or read its metrics."""
    return runs.create(session, settings, data)


@router.get("", response_model=RunList)
def list_runs(
    session: SessionDep,
    status: RunStatusName | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> RunList:
    """Runs, newest first."""
    return RunList(items=runs.list_runs(session, status=status, limit=limit))


@router.get("/{run_id}", response_model=RunRead, responses={404: {"description": "no such run"}})
def read_run(run: ValidRun, session: SessionDep) -> RunRead:
    return runs.read(session, run.id)


@router.get("/{run_id}/metrics", response_model=MetricsList, responses={404: {"description": "no such run"}})
def read_run_metrics(run: ValidRun, session: SessionDep) -> MetricsList:
    """Per-epoch training history."""
    return runs.metrics(session, run.id)


@router.post(
    "/{run_id}/predict",
    response_model=PredictResponse,
    responses={404: {"description": "no such run"}, 409: {"description": "run has not succeeded"},
               422: {"description": "bad inputs"}},
)
def predict(
    run: ValidRun, request: PredictRequest, session: SessionDep, settings: SettingsDep,
    cache: ModelCacheDep,
) -> PredictResponse:
    """Monte Carlo dropout: `samples` stochastic forward passes per input, summarised."""
    return runs.predict(session, settings, cache, run.id, request)
