"""Sweep use cases: create (a job row of kind "sweep", queued like a run), read, list."""

from __future__ import annotations

import secrets
import uuid
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from service import queue
from service.config import Settings
from service.errors import InvalidInput, NotFound
from service.runs import repository
from service.runs import service as runs
from service.runs.models import RunRow
from service.sweeps import planning
from service.sweeps.schemas import SweepCreate, SweepRead

KIND = "sweep"
MAX_NETS = 5000


def _errors(spec: SweepCreate, task: str, n_rows: int) -> list[dict[str, Any]]:
    errors: list[dict[str, Any]] = []

    def error(loc: list[Any], msg: str) -> None:
        errors.append({"loc": ["body", *loc], "msg": msg, "type": "value_error"})

    if task != "regression":
        error(["dataset_id"], f"sweeps train regression networks; the dataset's task is {task} "
                              "(for classification, submit runs with different dropout rates)")
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
    if any(c.prior_lengthscale is not None and c.tau is None for c in configs):
        error(["grid", "prior_lengthscale"], "needs tau (model.tau or grid.tau)")
    if spec.metric == "log_likelihood" and not spec.model.heteroscedastic and any(c.tau is None for c in configs):
        error(["metric"], "log_likelihood needs tau (model.tau or grid.tau) unless the model is heteroscedastic")
    if spec.training.validation_fraction <= 0:
        error(["training", "validation_fraction"], "a sweep ranks configurations on validation rows: use > 0")
    return errors


def create(session: Session, settings: Settings, spec: SweepCreate) -> SweepRead:
    dataset = runs.dataset_for_job(session, spec.dataset_id)
    errors = _errors(spec, dataset.task, dataset.n_rows)
    if errors:
        raise InvalidInput("the sweep does not fit the dataset: " + errors[0]["msg"], errors=errors)
    if spec.training.seed is None:
        spec = spec.model_copy(update={"training": spec.training.model_copy(update={"seed": secrets.randbelow(2**31)})})
    stored = spec.model_dump(mode="json", exclude={"dataset_id", "priority"})
    stored["task"] = dataset.task
    row = RunRow(
        kind=KIND, dataset_id=dataset.id, spec=stored,
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


def get_row(session: Session, sweep_id: uuid.UUID) -> RunRow:
    row = repository.get(session, sweep_id)
    if row is None or row.kind != KIND:
        raise NotFound("sweep", sweep_id)
    return row


def read(session: Session, sweep_id: uuid.UUID) -> SweepRead:
    return to_read(session, get_row(session, sweep_id))


def list_sweeps(session: Session, limit: int = 100) -> list[SweepRead]:
    rows = session.scalars(select(RunRow).where(RunRow.kind == KIND).order_by(RunRow.created_at.desc()).limit(limit))
    return [to_read(session, row) for row in rows]
