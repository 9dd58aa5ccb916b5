"""Batch prediction use cases: submit (a job row of kind "predict", queued like a run), read,
list, cancel, download the results; and, for the worker, prepare a job to run."""

from __future__ import annotations

import io
import secrets
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
from sqlalchemy import select
from sqlalchemy.orm import Session

from service import queue
from service.batch_predictions import execution, repository
from service.batch_predictions.inputs import BatchInput, ipc_to_table, parse_input_csv
from service.batch_predictions.models import BatchPredictionRow
from service.batch_predictions.schemas import (
    BatchPredictionOptions,
    BatchPredictionRead,
    InputRead,
    ModelUsed,
    ResultFormat,
)
from service.config import Settings
from service.datasets import service as datasets
from service.datasets.models import DatasetRow
from service.db import get_sessionmaker
from service.errors import InvalidInput, InvalidState, NotFound, PayloadTooLarge
from service.pagination import Page, PageQuery, paginate
from service.registry import service as registry
from service.runs import repository as runs_repository
from service.runs import service as runs
from service.runs.modelling import TrainedModel
from service.runs.models import RunRow, RunStatus

KIND = "predict"
MEDIA_TYPES = {"csv": "text/csv; charset=utf-8", "parquet": "application/vnd.apache.parquet"}


@dataclass
class _Model:
    """What submitting needs to know of the model (no weights loaded)."""

    run: RunRow
    task: str
    class_names: list[str]
    feature_names: list[str]
    target_name: str


def _error(loc: list[Any], msg: str, kind: str = "value_error") -> dict[str, Any]:
    return {"loc": ["body", *loc], "msg": msg, "type": kind}


def _model(session: Session, options: BatchPredictionOptions, tenant_id: str) -> _Model:
    """The succeeded training run of the caller that the options name (by id or registered model)."""
    if options.run_id is not None:
        loc, run_id = ["run_id"], options.run_id
        try:
            run = runs.get_row(session, run_id, tenant_id)
        except NotFound:
            raise InvalidInput(f"run {run_id} does not exist", errors=[_error(loc, "no such run", "not_found")]) from None
    else:
        assert options.model is not None
        loc = ["model"]
        try:
            run_id = registry.resolve(session, tenant_id, options.model.name, alias=options.model.alias,
                                      version=options.model.version)
        except NotFound as exc:
            raise InvalidInput(exc.detail, errors=[_error(loc, exc.detail, "not_found")]) from None
        run = runs.get_row(session, run_id, tenant_id)
    if run.kind != "train":
        raise InvalidInput(f"{run_id} is a {run.kind} job, not a trained model",
                           errors=[_error(loc, "not a training run", "value_error")])
    if run.status != RunStatus.SUCCEEDED:
        raise InvalidState(f"run {run_id} is {run.status}; batch predictions need a succeeded run")
    weights = runs_repository.weights(session, run_id)
    if weights is None:
        raise InvalidState(f"run {run_id} has no stored weights")
    trained_on = datasets.get_row(session, run.dataset_id, None)
    task = weights.preprocessing["task"]
    class_names = weights.preprocessing.get("class_names") or (
        [str(i) for i in range(weights.network["n_outputs"])] if task == "classification" else [])
    return _Model(run, task, list(class_names), list(trained_on.feature_names), trained_on.target_name)


def _feature_order(model: _Model, dataset: DatasetRow) -> list[int]:
    missing = [name for name in model.feature_names if name not in dataset.feature_names]
    unknown = [name for name in dataset.feature_names if name not in model.feature_names]
    if missing or unknown:
        parts = ([f"lacks the model's features {missing[:20]}"] if missing else []) + (
            [f"has features the model does not take {unknown[:20]}"] if unknown else [])
        raise InvalidInput(f"dataset {dataset.id} does not match the model's features: " + "; ".join(parts),
                           errors=[_error(["dataset_id"], "; ".join(parts))])
    return [dataset.feature_names.index(name) for name in model.feature_names]


def _checked(settings: Settings, options: BatchPredictionOptions, model: _Model) -> dict[str, Any]:
    """The options as stored in the job's spec (seed and interval level filled in)."""
    if options.samples > settings.max_samples:
        raise InvalidInput(f"at most {settings.max_samples} samples",
                           errors=[_error(["samples"], f"{options.samples} samples", "too_large")])
    interval_level = options.interval_level
    if model.task != "regression" and interval_level is not None:
        raise InvalidInput("interval_level applies to regression models only",
                           errors=[_error(["interval_level"], f"the model's task is {model.task}")])
    if model.task == "regression" and interval_level is None:
        interval_level = 0.95
    return {
        "task": model.task, "samples": options.samples,
        # Recorded even when the service picks it, so every job can be reproduced.
        "seed": options.seed if options.seed is not None else secrets.randbelow(2**31),
        "interval_level": interval_level, "chunk_rows": options.chunk_rows, "device": options.device,
        "model_run_id": str(model.run.id),
    }


def create(
    session: Session, settings: Settings, options: BatchPredictionOptions, tenant_id: str, *,
    dataset_id: uuid.UUID | None = None, upload: bytes | None = None, filename: str | None = None,
    id_column: str | None = None,
) -> BatchPredictionRead:
    """Queue a batch prediction over a dataset of the caller or over an uploaded CSV."""
    assert (dataset_id is None) != (upload is None)
    model = _model(session, options, tenant_id)
    spec = _checked(settings, options, model)
    row = BatchPredictionRow(
        model_run_id=model.run.id, chunk_rows=options.chunk_rows,
        model_name=options.model.name if options.model else None,
        model_alias=options.model.alias if options.model else None,
        model_version=options.model.version if options.model else None,
    )
    if dataset_id is not None:
        dataset = runs.dataset_for_job(session, dataset_id, tenant_id)
        row.input_source, row.input_dataset_id, row.feature_order = "dataset", dataset.id, _feature_order(model, dataset)
        row.n_rows, has_ids, has_target = dataset.n_rows, False, True
        job_dataset_id = dataset.id
    else:
        assert upload is not None
        if len(upload) > settings.max_upload_bytes:
            raise PayloadTooLarge(f"the upload is larger than {settings.max_upload_bytes} bytes")
        rows = parse_input_csv(upload, feature_names=model.feature_names, task=model.task,
                               target_name=model.target_name, id_column=id_column, max_rows=settings.max_dataset_rows)
        row.input_source, row.input_filename = "upload", (filename or "upload.csv")[:255]
        row.input_data = rows.to_ipc()
        row.input_size_bytes = len(row.input_data)
        row.n_rows, has_ids, has_target = rows.n_rows, rows.ids is not None, rows.target is not None
        job_dataset_id = model.run.dataset_id  # the dataset whose columns the file follows
    row.columns = execution.result_columns(model.task, model.class_names, has_ids=has_ids, has_target=has_target)
    job = RunRow(
        kind=KIND, tenant_id=tenant_id, dataset_id=job_dataset_id, spec=spec,
        epochs_total=row.n_rows, epochs_done=0, queue=queue.queue_for_device(options.device),
        priority=options.priority, callback_url=str(options.callback_url) if options.callback_url else None,
    )
    session.add(job)
    session.flush()  # the job's row first (no ORM relationship orders the two inserts)
    row.run_id = job.id
    session.add(row)
    runs.submit(session, settings, job)  # commits both rows, then sends the message
    return to_read(job, row)


def to_read(job: RunRow, row: BatchPredictionRow) -> BatchPredictionRead:
    spec = job.spec
    return BatchPredictionRead(
        id=job.id, status=job.status, task=spec["task"],  # type: ignore[arg-type]
        model=ModelUsed(run_id=row.model_run_id, name=row.model_name, alias=row.model_alias, version=row.model_version),
        input=InputRead(source=row.input_source, dataset_id=row.input_dataset_id,  # type: ignore[arg-type]
                        filename=row.input_filename, rows=row.n_rows),
        samples=spec["samples"], seed=spec["seed"], interval_level=spec.get("interval_level"),
        chunk_rows=row.chunk_rows, device=spec.get("device", "cpu"), priority=job.priority,
        callback_url=job.callback_url, rows_done=job.epochs_done, rows_total=job.epochs_total,
        progress=job.epochs_done / job.epochs_total if job.epochs_total else 1.0,
        columns=row.columns, cancel_requested=job.cancel_requested, attempts=job.attempts,
        worker_device=job.device, error=job.error,
        created_at=job.created_at, started_at=job.started_at, finished_at=job.finished_at,
    )


def get_row(session: Session, job_id: uuid.UUID, tenant_id: str | None) -> RunRow:
    """The job, or NotFound (also for another tenant's job when ``tenant_id`` is given)."""
    job = runs_repository.get(session, job_id)
    if job is None or job.kind != KIND or (tenant_id is not None and job.tenant_id != tenant_id):
        raise NotFound("batch prediction", job_id)
    return job


def read(session: Session, job_id: uuid.UUID, tenant_id: str | None) -> BatchPredictionRead:
    job = get_row(session, job_id, tenant_id)
    row = repository.get(session, job_id)
    assert row is not None
    return to_read(job, row)


def list_page(
    session: Session, tenant_id: str, page: PageQuery, *, status: str | None = None,
    model_run_id: uuid.UUID | None = None,
) -> Page[BatchPredictionRead]:
    query = select(RunRow).where(RunRow.kind == KIND, RunRow.tenant_id == tenant_id)
    if status is not None:
        query = query.where(RunRow.status == status)
    if model_run_id is not None:
        query = query.where(RunRow.id.in_(
            select(BatchPredictionRow.run_id).where(BatchPredictionRow.model_run_id == model_run_id)))
    jobs, next_cursor = paginate(session, query, RunRow, page)
    rows = repository.many(session, [job.id for job in jobs])
    return Page([to_read(job, rows[job.id]) for job in jobs], next_cursor)


def cancel(session: Session, settings: Settings, job_id: uuid.UUID, tenant_id: str) -> tuple[BatchPredictionRead, bool]:
    """A queued job at once (done), a running one after its current chunk."""
    get_row(session, job_id, tenant_id)
    _, done = runs.cancel(session, settings, job_id, tenant_id)
    return read(session, job_id, tenant_id), done


# -- results --------------------------------------------------------------------------------
@dataclass
class Download:
    chunks: Iterator[bytes]
    media_type: str
    filename: str


class _Collector:
    """A write-only file for ParquetWriter whose bytes are taken as they are written (streaming)."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.position = 0
        self.closed = False

    def write(self, data: bytes) -> int:
        self.parts.append(bytes(data))
        self.position += len(data)
        return len(data)

    def tell(self) -> int:
        return self.position

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True

    def take(self) -> bytes:
        data, self.parts = b"".join(self.parts), []
        return data


def results(settings: Settings, session: Session, job_id: uuid.UUID, tenant_id: str, fmt: ResultFormat) -> Download:
    """The results as a stream of bytes (one stored chunk read at a time); 409 unless succeeded."""
    job = get_row(session, job_id, tenant_id)
    if job.status != RunStatus.SUCCEEDED:
        progress = f" ({job.epochs_done}/{job.epochs_total} rows)" if job.status == RunStatus.RUNNING else ""
        raise InvalidState(f"batch prediction {job_id} is {job.status}{progress}; its results are ready when it succeeds")
    row = repository.get(session, job_id)
    assert row is not None
    n_chunks = execution.chunk_count(row.n_rows, row.chunk_rows)
    url = settings.sqlalchemy_url

    def tables() -> Iterator[pa.Table]:
        with get_sessionmaker(url)() as reader:
            for chunk in range(n_chunks):
                data = repository.chunk_data(reader, job_id, chunk)
                if data is None:  # cannot happen for a succeeded job; never send a truncated file
                    raise RuntimeError(f"batch prediction {job_id} lacks chunk {chunk}")
                yield ipc_to_table(data)

    def csv_bytes() -> Iterator[bytes]:
        for index, table in enumerate(tables()):
            buffer = io.BytesIO()
            pa_csv.write_csv(table, buffer, pa_csv.WriteOptions(include_header=index == 0))
            yield buffer.getvalue()

    def parquet_bytes() -> Iterator[bytes]:
        sink = _Collector()
        writer: pq.ParquetWriter | None = None
        for table in tables():
            if writer is None:
                writer = pq.ParquetWriter(sink, table.schema, compression="zstd")
            writer.write_table(table)  # one row group per chunk
            yield sink.take()
        assert writer is not None
        writer.close()
        yield sink.take()

    return Download(
        chunks=csv_bytes() if fmt == "csv" else parquet_bytes(), media_type=MEDIA_TYPES[fmt],
        filename=f"batch-prediction-{job_id}.{fmt}",
    )


# -- for the worker -------------------------------------------------------------------------
def prepare(session: Session, job_id: uuid.UUID, device: str) -> tuple[execution.PreparedJob, dict[int, int]]:
    """The job's model (on ``device``), input rows and options, and its already finished chunks."""
    job = get_row(session, job_id, None)
    row = repository.get(session, job_id)
    if row is None:
        raise ValueError(f"batch prediction {job_id} has no input record")
    stored = runs_repository.weights(session, row.model_run_id)
    if stored is None:
        raise ValueError(f"run {row.model_run_id} has no stored weights")
    model = TrainedModel.from_stored(stored.network, stored.preprocessing, stored.weights, device=device)
    if row.input_source == "dataset":
        assert row.input_dataset_id is not None and row.feature_order is not None
        dataset = datasets.load_arrays(session, row.input_dataset_id)
        features = np.ascontiguousarray(dataset.features[:, row.feature_order], dtype=np.float32)
        if dataset.task == "classification" and dataset.class_names:
            target = pa.array(np.asarray(dataset.class_names, dtype=object)[dataset.target], pa.string())
        else:
            target = pa.array(dataset.target.astype(np.float64), pa.float64())
        rows = BatchInput(features=features, target=target)
    else:
        data = session.scalar(select(BatchPredictionRow.input_data).where(BatchPredictionRow.run_id == job_id))
        if data is None:
            raise ValueError(f"batch prediction {job_id} has no stored input")
        rows = BatchInput.from_ipc(data)
    if rows.features.shape[1] != model.network.n_inputs:
        raise ValueError(f"the input has {rows.features.shape[1]} features, the model takes {model.network.n_inputs}")
    spec = job.spec
    prepared = execution.PreparedJob(
        model=model, rows=rows, samples=int(spec["samples"]), seed=int(spec["seed"]),
        interval_level=spec.get("interval_level"), chunk_rows=row.chunk_rows, columns=list(row.columns),
    )
    return prepared, repository.finished_chunks(session, job_id)


def results_summary(job: execution.PreparedJob) -> dict[str, Any]:
    return {"batch_prediction": {"rows": job.rows.n_rows, "chunks": job.n_chunks, "columns": job.columns}}
