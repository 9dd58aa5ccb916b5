"""Sweep use cases: create (a job row of kind "sweep", queued like a run), read, list."""

from __future__ import annotations

import secrets
import uuid
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from service import queue
from service.pagination import Page, PageQuery, paginate
from service.config import Settings
from service.errors import InvalidInput, NotFound
from service.runs import repository
from service.runs import service as runs
from service.runs.models import RunRow
from service.sweeps import planning
from service.sweeps.schemas import SweepCreate, SweepRead

KIND = "sweep"
MAX_NETS = 5000


def _errors(spec: SweepCreate, task: str, n_rows: int, n_classes: int | None) -> list[dict[str, Any]]:
    """Everything wrong with ``spec`` for the dataset (``spec.metric`` already resolved)."""
    errors: list[dict[str, Any]] = []

    def error(loc: list[Any], msg: str) -> None:
        errors.append({"loc": ["body", *loc], "msg": msg, "type": "value_error"})

    if task not in planning.RANKING_METRICS:
        error(["dataset_id"], f"sweeps train regression or classification networks; the dataset's task is {task}")
        return errors
    if spec.metric not in planning.RANKING_METRICS[task]:
        error(["metric"], f"a {task} sweep ranks by one of {', '.join(planning.RANKING_METRICS[task])}, "
                          f"not {spec.metric}")
    if task == "classification":
        if n_classes is None or n_classes < 2:
            error(["dataset_id"], "a classification sweep needs a dataset with at least two classes")
        for loc, value in ((["model", "tau"], spec.model.tau), (["model", "prior_lengthscale"], spec.model.prior_lengthscale),
                           (["grid", "tau"], spec.grid.tau), (["grid", "prior_lengthscale"], spec.grid.prior_lengthscale)):
            if value is not None:
                error(loc, "applies to regression only; the dataset's task is classification "
                           "(regularise a classifier with weight_decay)")
        if spec.model.heteroscedastic:
            error(["model", "heteroscedastic"], "applies to regression only; the dataset's task is classification")
    n_configs = len(planning.configurations(spec))
    n_splits = len(spec.splits.given) if spec.splits.given is not None else spec.splits.folds or 0
    if n_configs * n_splits > MAX_NETS:
        error(["grid"], f"{n_configs} configurations × {n_splits} splits = {n_configs * n_splits} nets; at most {MAX_NETS}")
    if spec.splits.folds is not None and spec.splits.folds > n_rows:
        error(["splits", "folds"], f"{spec.splits.folds} folds for {n_rows} rows")
    for i, split in enumerate(spec.splits.given or []):
        rows = split.train_indices + split.test_indices
        if max(rows) >= n_rows:
            error(["splits", "given", i], f"row {max(rows)} is beyond the dataset's {n_rows} rows")
        if set(split.train_indices) & set(split.test_indices):
            error(["splits", "given", i], "train_indices and test_indices overlap")
        if len(split.train_indices) - round(spec.training.validation_fraction * len(split.train_indices)) < 1:
            error(["training", "validation_fraction"], f"leaves split {i} no training rows")
    configs = planning.configurations(spec)
    if task == "regression" and any(c.prior_lengthscale is not None and c.tau is None for c in configs):
        error(["grid", "prior_lengthscale"], "needs tau (model.tau or grid.tau)")
    if (task == "regression" and spec.metric == "log_likelihood" and not spec.model.heteroscedastic
            and any(c.tau is None for c in configs)):
        error(["metric"], "log_likelihood needs tau (model.tau or grid.tau) unless the model is heteroscedastic")
    if spec.training.validation_fraction <= 0:
        error(["training", "validation_fraction"], "a sweep ranks configurations on validation rows: use > 0")
    if spec.training.optimizer != "adam":
        error(["training", "optimizer"], "the sweep engine trains every net with Adam")
    return errors


def create(session: Session, settings: Settings, spec: SweepCreate, tenant_id: str) -> SweepRead:
    dataset = runs.dataset_for_job(session, spec.dataset_id, tenant_id)
    if spec.metric is None and dataset.task in planning.RANKING_METRICS:
        spec = spec.model_copy(update={"metric": planning.default_metric(dataset.task)})
    n_classes = len(dataset.class_names) if dataset.class_names is not None else None
    errors = _errors(spec, dataset.task, dataset.n_rows, n_classes)
    if errors:
        raise InvalidInput("the sweep does not fit the dataset: " + errors[0]["msg"], errors=errors)
    if spec.training.seed is None:
        spec = spec.model_copy(update={"training": spec.training.model_copy(update={"seed": secrets.randbelow(2**31)})})
    stored = spec.model_dump(mode="json", exclude={"dataset_id", "priority"})
    stored["task"] = dataset.task
    row = RunRow(
        kind=KIND, tenant_id=tenant_id, dataset_id=dataset.id, spec=stored,
        epochs_total=spec.training.epochs * (2 if spec.retrain_best else 1), epochs_done=0,
        queue=queue.queue_for_device(spec.device), priority=spec.priority,
    )
    runs.submit(session, settings, row)
    return to_read(session, row)


def to_read(session: Session, row: RunRow) -> SweepRead:
    spec = SweepCreate.model_validate({**{k: v for k, v in row.spec.items() if k != "task"}, "dataset_id": row.dataset_id})
    stored = repository.results(session, row.id)
    n_splits = len(spec.splits.given) if spec.splits.given is not None else spec.splits.folds or 0
    return SweepRead(
        id=row.id, dataset_id=row.dataset_id, status=row.status,
        spec={k: v for k, v in row.spec.items() if k != "task"},
        n_configurations=len(planning.configurations(spec)), n_splits=n_splits,
        epochs_done=row.epochs_done, epochs_total=row.epochs_total, error=row.error,
        created_at=row.created_at, started_at=row.started_at, finished_at=row.finished_at,
        results=stored.data if stored is not None else None,
    )


def get_row(session: Session, sweep_id: uuid.UUID, tenant_id: str | None) -> RunRow:
    """The sweep, or NotFound (also for another tenant's sweep when ``tenant_id`` is given)."""
    row = repository.get(session, sweep_id)
    if row is None or row.kind != KIND or (tenant_id is not None and row.tenant_id != tenant_id):
        raise NotFound("sweep", sweep_id)
    return row


def read(session: Session, sweep_id: uuid.UUID, tenant_id: str | None) -> SweepRead:
    return to_read(session, get_row(session, sweep_id, tenant_id))


def list_page(
    session: Session, tenant_id: str, page: PageQuery, *, status: str | None = None,
    dataset_id: uuid.UUID | None = None,
) -> Page[SweepRead]:
    query = select(RunRow).where(RunRow.kind == KIND, RunRow.tenant_id == tenant_id)
    if status is not None:
        query = query.where(RunRow.status == status)
    if dataset_id is not None:
        query = query.where(RunRow.dataset_id == dataset_id)
    rows, next_cursor = paginate(session, query, RunRow, page)
    return Page([to_read(session, row) for row in rows], next_cursor)
