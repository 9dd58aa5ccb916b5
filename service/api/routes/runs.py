"""/v1/runs: submit training, follow it, predict with Monte Carlo dropout."""

from __future__ import annotations

import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import JSONResponse

from service.api.deps import CurrentTenant, PageDep, SessionDep, SettingsDep, ValidRun
from service.api.fast_routes import JsonBodyRoute
from service.api.idempotency import IdempotencyKey, canonical, create_once
from service.jobs.idempotency import fingerprint
from service.jobs import webhooks
from service.jobs.schemas import DeliveryList
from service.runs import service as runs
from service.runs.batching import app_batcher
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


async def predict(run_id: uuid.UUID, request: PredictRequest, http_request: Request, tenant: CurrentTenant) -> Response:
    """Monte Carlo dropout: `samples` stochastic forward passes per input, summarised.

    Concurrent requests without a `seed` for the same run and `samples` may be answered from
    one shared batched forward (micro-batching, `MCDROP_PREDICT_BATCHING`): each input's
    passes use their own independent dropout masks, so results are distributed exactly as if
    computed alone. A request with a `seed` is never merged with others: the same seed and
    inputs give the same result, whatever else is being served."""
    # The hot path, so: first route of this router (matched first); its requests handled by
    # JsonBodyRoute (no dependency solving; the body parsed and validated in one pass); async,
    # reading app.state directly, the sampling off the event loop (service.runs.batching); the
    # response serialised once, from our own rows (runs.Predicted.json).
    state = http_request.app.state
    batcher = app_batcher(state, state.settings)
    predicted = await runs.predict(state.settings, state.model_cache, batcher, run_id, request, tenant)
    return Response(predicted.json(), media_type="application/json")


router.add_api_route(
    "/{run_id}/predict", predict, methods=["POST"], route_class_override=JsonBodyRoute,
    response_model=PredictResponse,
    responses={404: {"description": "no such run"}, 409: {"description": "run has not succeeded"},
               422: {"description": "bad inputs"}},
)


@router.post(
    "", status_code=202, response_model=RunRead,
    responses={200: {"description": "replay of an earlier request with the same Idempotency-Key", "model": RunRead},
               409: {"description": "a request with this Idempotency-Key is still in progress"},
               422: {"description": "invalid spec, or an Idempotency-Key reused with another body"}},
)
def create_run(
    data: RunCreate, session: SessionDep, settings: SettingsDep, tenant: CurrentTenant,
    idempotency_key: IdempotencyKey = None,
) -> JSONResponse:
    """Queue a training run; a worker picks it up. Follow it with GET, /metrics or /events."""
    return create_once(
        settings, idempotency_key, tenant=tenant, scope="POST /v1/runs", status_code=202,
        fingerprint=fingerprint(canonical(data.model_dump(mode="json"))),
        create=lambda: runs.create(session, settings, data, tenant),
    )


@router.get("", response_model=RunList)
def list_runs(
    session: SessionDep,
    tenant: CurrentTenant,
    page: PageDep,
    status: RunStatusName | None = None,
    dataset_id: uuid.UUID | None = None,
) -> RunList:
    """The caller's runs, a page at a time (newest first unless `sort=created_at`), filtered by
    status, dataset and creation time."""
    result = runs.list_page(session, tenant, page, status=status, dataset_id=dataset_id)
    return RunList(items=result.items, next_cursor=result.next_cursor)


@router.get("/{run_id}", response_model=RunRead, responses={404: {"description": "no such run"}})
def read_run(run: ValidRun, session: SessionDep, tenant: CurrentTenant) -> RunRead:
    return runs.read(session, run.id, tenant)


@router.post(
    "/{run_id}/cancel",
    response_model=RunRead,
    responses={200: {"description": "cancelled (it was queued)"},
               202: {"description": "cancellation requested: the worker stops at the next batch"},
               404: {"description": "no such run"}, 409: {"description": "the run already ended"}},
)
def cancel_run(
    run: ValidRun, session: SessionDep, settings: SettingsDep, response: Response, tenant: CurrentTenant,
) -> RunRead:
    """Cancel a queued run at once, or a running one at its next batch boundary (metrics so far are kept)."""
    body, done = runs.cancel(session, settings, run.id, tenant)
    response.status_code = 200 if done else 202
    return body


@router.get("/{run_id}/deliveries", response_model=DeliveryList, responses={404: {"description": "no such run"}})
def list_run_deliveries(run: ValidRun, session: SessionDep) -> DeliveryList:
    """Webhook deliveries of this run's events and their outcome."""
    return DeliveryList(items=webhooks.list_deliveries(session, run.id))


@router.get(
    "/{run_id}/evaluation",
    responses={404: {"description": "no such run, or no held-out rows"}, 409: {"description": "not succeeded"}},
)
def read_run_evaluation(run: ValidRun, session: SessionDep, tenant: CurrentTenant) -> dict[str, Any]:
    """Held-out metrics computed after training, MC dropout beside the deterministic net.

    Classification: accuracy, NLL, Brier, ECE (15 bins) with the reliability diagram, AUROC of
    misclassification detection by predictive entropy and by mutual information, uncertainty
    histograms for correct vs wrong. Regression: RMSE, the mixture test log-likelihood, 95 %
    interval coverage."""
    return runs.evaluation(session, run.id, tenant)


@router.get("/{run_id}/metrics", response_model=MetricsList, responses={404: {"description": "no such run"}})
def read_run_metrics(run: ValidRun, session: SessionDep, tenant: CurrentTenant) -> MetricsList:
    """Per-epoch training history."""
    return runs.metrics(session, run.id, tenant)
