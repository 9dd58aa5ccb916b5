"""Run use cases for the API: create (and enqueue), read, list, metrics, predict."""

from __future__ import annotations

import logging
import secrets
import uuid
from dataclasses import dataclass
from typing import Any

import anyio.to_thread
import pydantic_core
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from service import queue
from service.db import get_sessionmaker, utcnow
from service.jobs import reconciler, webhooks
from service.config import Settings
from service.datasets import service as datasets
from service.datasets.models import DatasetRow
from service.pagination import Page, PageQuery, paginate
from service.errors import InvalidInput, InvalidState, NotFound
from service.observability.uncertainty import served_uncertainty
from service.runs import lifecycle, repository
from service.runs.batching import PredictBatcher
from service.runs.inference import ModelCache
from service.runs.inputs import feature_matrix
from service.runs.modelling import TrainedModel
from service.runs.models import RunRow, RunStatus
from service.runs.schemas import (
    EpochMetricsRead,
    MetricsList,
    PredictRequest,
    PredictResponse,
    RunCreate,
    RunRead,
)

log = logging.getLogger(__name__)


def _to_read(row: RunRow, latest: object | None) -> RunRead:
    return RunRead(
        id=row.id,
        dataset_id=row.dataset_id,
        task=row.spec.get("task", ""),
        status=row.status,  # type: ignore[arg-type]
        spec={key: value for key, value in row.spec.items() if key != "task"},
        priority=row.priority,
        callback_url=row.callback_url,
        cancel_requested=row.cancel_requested,
        attempts=row.attempts,
        epochs_done=row.epochs_done,
        epochs_total=row.epochs_total,
        latest_metrics=EpochMetricsRead.model_validate(latest) if latest is not None else None,
        device=row.device,
        error=row.error,
        created_at=row.created_at,
        started_at=row.started_at,
        finished_at=row.finished_at,
    )


def dataset_for_job(session: Session, dataset_id: uuid.UUID, tenant_id: str) -> DatasetRow:
    """The caller's dataset a new run or sweep names in its body (422 at body.dataset_id if
    missing or another tenant's)."""
    try:
        return datasets.get_row(session, dataset_id, tenant_id)
    except NotFound:
        raise InvalidInput(
            f"dataset {dataset_id} does not exist",
            errors=[{"loc": ["body", "dataset_id"], "msg": "no such dataset", "type": "not_found"}],
        ) from None


def submit(session: Session, settings: Settings, row: RunRow) -> None:
    """Commit a new queued job (run or sweep) with its first event, then send its message.

    The row exists before its message does; a failed send leaves it queued and the reconciler
    sends it again later.
    """
    now = utcnow()
    row.status, row.created_at, row.dispatched_at, row.dispatch_count = RunStatus.QUEUED, now, now, 1
    session.add(row)
    session.flush()
    lifecycle.add_event(session, row.id, "status", RunStatus.QUEUED, {"status": RunStatus.QUEUED})
    session.commit()
    reconciler.dispatch(settings, row)


def create(session: Session, settings: Settings, data: RunCreate, tenant_id: str) -> RunRead:
    dataset = dataset_for_job(session, data.dataset_id, tenant_id)
    errors = spec_errors(data, dataset.task, dataset.n_rows)
    if errors:
        raise InvalidInput("the run spec does not fit the dataset: " + errors[0]["msg"], errors=errors)
    if data.training.epochs > settings.max_epochs:
        raise InvalidInput(
            f"at most {settings.max_epochs} epochs",
            errors=[{"loc": ["body", "training", "epochs"], "msg": "too many epochs", "type": "too_large"}],
        )
    if data.training.seed is None:
        # Record the seed so that every run is reproducible, even one submitted without a seed.
        data = data.model_copy(update={"training": data.training.model_copy(update={"seed": secrets.randbelow(2**31)})})
    spec = data.model_dump(mode="json", exclude={"dataset_id", "callback_url", "priority"})
    spec["task"] = dataset.task
    row = RunRow(
        tenant_id=tenant_id, dataset_id=dataset.id, spec=spec, epochs_total=data.training.epochs, epochs_done=0,
        queue=queue.queue_for_device(data.device), priority=data.priority,
        callback_url=str(data.callback_url) if data.callback_url else None,
    )
    submit(session, settings, row)
    return _to_read(row, None)


def spec_errors(data: RunCreate, task: str, n_rows: int) -> list[dict[str, Any]]:
    """What in a run spec does not fit the dataset (task, size), each with where it is."""
    errors: list[dict[str, Any]] = []

    def error(loc: list[Any], msg: str) -> None:
        errors.append({"loc": ["body", *loc], "msg": msg, "type": "value_error"})

    model = data.model
    if task != "regression":
        for name in ("tau", "prior_lengthscale"):
            if getattr(model, name) is not None:
                error(["model", name], f"applies to regression only; the dataset's task is {task}")
        if model.heteroscedastic:
            error(["model", "heteroscedastic"], f"applies to regression only; the dataset's task is {task}")
    if model.prior_lengthscale is not None:
        if model.tau is None:
            error(["model", "prior_lengthscale"], "needs model.tau: reg = l²(1 − p) / (2 N τ)")
        if data.training.weight_decay:
            error(["training", "weight_decay"], "give either weight_decay or model.prior_lengthscale, not both")
    fraction = data.training.validation_fraction
    if data.split is None:
        n_validation = max(round(fraction * n_rows), 1 if fraction > 0 else 0)
        if n_rows - n_validation < 1:
            error(["training", "validation_fraction"],
                  f"validation_fraction {fraction} leaves no training rows of the dataset's {n_rows}")
        return errors
    groups = {"train_indices": data.split.train_indices, "validation_indices": data.split.validation_indices or [],
              "test_indices": data.split.test_indices or []}
    for name, rows in groups.items():
        beyond = [i for i in rows if i >= n_rows]
        if beyond:
            error(["split", name], f"row {beyond[0]} is beyond the dataset's {n_rows} rows")
        if len(set(rows)) != len(rows):
            error(["split", name], "repeats rows")
    train = set(groups["train_indices"])
    for name in ("validation_indices", "test_indices"):
        shared = train & set(groups[name])
        if shared:
            error(["split", name], f"shares {len(shared)} rows with train_indices (e.g. {min(shared)})")
    n_train = len(train)
    if data.split.validation_indices is None and n_train - round(fraction * n_train) < 1:
        error(["training", "validation_fraction"], "leaves no training rows of split.train_indices")
    return errors


def get_row(session: Session, run_id: uuid.UUID, tenant_id: str | None) -> RunRow:
    """The run (or sweep), or NotFound; with ``tenant_id``, another tenant's is not found
    either (None: any tenant's — for workers, which only get ids the API checked)."""
    row = repository.get(session, run_id)
    if row is None or (tenant_id is not None and row.tenant_id != tenant_id):
        raise NotFound("run", run_id)
    return row


def read(session: Session, run_id: uuid.UUID, tenant_id: str | None) -> RunRead:
    row = get_row(session, run_id, tenant_id)
    return _to_read(row, repository.latest_metrics(session, [row.id]).get(row.id))


def list_page(
    session: Session, tenant_id: str, page: PageQuery, *, status: str | None = None,
    dataset_id: uuid.UUID | None = None,
) -> Page[RunRead]:
    query = select(RunRow).where(RunRow.kind == "train", RunRow.tenant_id == tenant_id)
    if status is not None:
        query = query.where(RunRow.status == status)
    if dataset_id is not None:
        query = query.where(RunRow.dataset_id == dataset_id)
    rows, next_cursor = paginate(session, query, RunRow, page)
    latest = repository.latest_metrics(session, [row.id for row in rows])
    return Page([_to_read(row, latest.get(row.id)) for row in rows], next_cursor)


def metrics(session: Session, run_id: uuid.UUID, tenant_id: str | None) -> MetricsList:
    get_row(session, run_id, tenant_id)
    return MetricsList(
        run_id=run_id,
        items=[EpochMetricsRead.model_validate(row) for row in repository.metrics(session, run_id)],
    )


def load_model(session: Session, run_id: uuid.UUID, tenant_id: str) -> TrainedModel:
    stored = repository.weights(session, run_id)
    if stored is None:
        raise InvalidState(f"run {run_id} has no stored weights")
    model = TrainedModel.from_stored(stored.network, stored.preprocessing, stored.weights)
    model.tenant_id = tenant_id  # checked on every cache hit
    return model


@dataclass(frozen=True)
class Predicted:
    """A served MC prediction: the fields of :class:`PredictResponse`, in its order, with the rows
    as ``TrainedModel.predict`` builds them (dicts with the output models' fields, in their order)."""

    run_id: uuid.UUID
    task: str
    samples: int
    seed: int | None
    class_names: list[str] | None
    predictions: list[dict[str, Any]]

    def json(self) -> bytes:
        """``self.response().model_dump_json()``, byte for byte (tested for both tasks, NaN included),
        without validating the rows again: they are ours, and re-validating them cost ~10 µs of a
        served request's CPU (~4 µs instead of ~15 for a row of ten classes)."""
        return pydantic_core.to_json(
            {"run_id": self.run_id, "task": self.task, "samples": self.samples, "seed": self.seed,
             "class_names": self.class_names, "predictions": self.predictions},
            inf_nan_mode="null",  # as a model's JSON: NaN and infinities as null
        )

    def response(self) -> PredictResponse:
        """The validated response model (for callers that read the rows as models)."""
        return PredictResponse(run_id=self.run_id, task=self.task, samples=self.samples, seed=self.seed,
                               class_names=self.class_names, predictions=self.predictions)


async def predict(
    settings: Settings, cache: ModelCache, batcher: PredictBatcher, run_id: uuid.UUID, request: PredictRequest,
    tenant_id: str,
) -> Predicted:
    """MC dropout prediction for a succeeded run, for the event loop.

    A model in the cache answers without a database round trip (only succeeded runs are
    cached, and a succeeded run never changes). Otherwise the run is read and its model loaded
    in the threadpool (once, however many requests wait for it). Sampling runs off the event
    loop through ``batcher``: concurrent unseeded requests may share one forward; a request
    with a seed always runs alone, so the seed reproduces its result exactly.
    """

    def load_succeeded() -> TrainedModel:
        with get_sessionmaker(settings.sqlalchemy_url)() as session:
            row = get_row(session, run_id, tenant_id)
            if row.status != RunStatus.SUCCEEDED:
                raise InvalidState(f"run {run_id} is {row.status}; predictions need a succeeded run")
            return cache.get(run_id, lambda: load_model(session, run_id, row.tenant_id))

    model = cache.peek(run_id)
    if model is None:
        model = await anyio.to_thread.run_sync(load_succeeded)
    if model.tenant_id != tenant_id:  # a cached model of another tenant: as if it did not exist
        raise NotFound("run", run_id)
    if len(request.inputs) > settings.max_predict_inputs:
        raise InvalidInput(
            f"at most {settings.max_predict_inputs} inputs per request",
            errors=[{"loc": ["body", "inputs"], "msg": f"{len(request.inputs)} inputs", "type": "too_long"}],
        )
    if request.samples > settings.max_samples:
        raise InvalidInput(
            f"at most {settings.max_samples} samples",
            errors=[{"loc": ["body", "samples"], "msg": f"{request.samples} samples", "type": "too_large"}],
        )
    features = feature_matrix(request.inputs, model.network.n_inputs)
    predictions = await batcher.predict(run_id, model, features, request.samples, request.seed)
    served_uncertainty.observe_predictions(str(run_id), predictions)  # /metrics: one numpy update per request
    return Predicted(run_id, model.task, request.samples, request.seed, model.class_names, predictions)


def cancel(session: Session, settings: Settings, run_id: uuid.UUID, tenant_id: str | None) -> tuple[RunRead, bool]:
    """Cancel a run: a queued run at once; a running one at its next batch boundary (its
    worker sees the flag through its lease renewal or epoch record). Returns (run, done)."""
    row = get_row(session, run_id, tenant_id)
    if row.status in RunStatus.TERMINAL:
        raise InvalidState(f"run {run_id} is already {row.status}; only queued or running runs can be cancelled")
    if lifecycle.transition(session, run_id, RunStatus.CANCELLED, expected=[RunStatus.QUEUED],
                            event={"reason": "cancelled by request"}):
        session.commit()
        try:  # the cancellation's webhook, right away (the reconciler retries failures)
            webhooks.deliver_due(settings)
        except Exception as exc:
            log.warning("webhook delivery deferred: %s", exc)
        return read(session, run_id, tenant_id), True
    flagged = session.execute(
        update(RunRow).where(RunRow.id == run_id, RunRow.status == RunStatus.RUNNING)
        .values(cancel_requested=True, updated_at=utcnow())
    ).rowcount == 1
    session.commit()
    if not flagged:  # it ended in the meantime
        session.expire_all()
        row = get_row(session, run_id, tenant_id)
        raise InvalidState(f"run {run_id} is already {row.status}; only queued or running runs can be cancelled")
    return read(session, run_id, tenant_id), False


def evaluation(session: Session, run_id: uuid.UUID, tenant_id: str | None) -> dict[str, Any]:
    row = get_row(session, run_id, tenant_id)
    if row.status != RunStatus.SUCCEEDED:
        raise InvalidState(f"run {run_id} is {row.status}; it is evaluated when it succeeds")
    stored = repository.results(session, run_id)
    report = stored.data.get("evaluation") if stored is not None else None
    if report is None:
        raise NotFound("evaluation of run", f"{run_id} (it had no held-out rows: set validation_fraction or split.test_indices)")
    return {"run_id": str(run_id), **report}
