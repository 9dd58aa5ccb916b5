"""Dataset use cases: create from a built-in set or a CSV upload, read, load the arrays."""

from __future__ import annotations

import uuid

import numpy as np
from safetensors.numpy import load as load_tensors
from safetensors.numpy import save as save_tensors
from sqlalchemy import select
from sqlalchemy.orm import Session

from service.config import Settings
from service.datasets.csv_parsing import parse_csv
from service.datasets.models import DatasetRow
from service.datasets.schemas import DatasetCreate, DatasetRead
from service.errors import NotFound, PayloadTooLarge
from service.ml.data import Dataset, load_builtin
from service.pagination import Page, PageQuery, paginate


def _store(session: Session, tenant_id: str, name: str, source: str, dataset: Dataset) -> DatasetRead:
    blob = save_tensors({
        "features": np.ascontiguousarray(dataset.features, dtype=np.float32),
        "target": np.ascontiguousarray(dataset.target),
    })
    row = DatasetRow(
        tenant_id=tenant_id,
        name=name,
        task=dataset.task,
        source=source,
        n_rows=int(dataset.features.shape[0]),
        n_features=int(dataset.features.shape[1]),
        n_classes=dataset.n_classes,
        feature_names=list(dataset.feature_names),
        class_names=list(dataset.class_names) if dataset.class_names is not None else None,
        target_name=dataset.target_name,
        size_bytes=len(blob),
        data=blob,
    )
    session.add(row)
    session.commit()
    return DatasetRead.model_validate(row)


def create_builtin(session: Session, data: DatasetCreate, tenant_id: str) -> DatasetRead:
    return _store(session, tenant_id, data.name, f"builtin:{data.builtin}", load_builtin(data.builtin))


def create_from_csv(
    session: Session, settings: Settings, *, name: str, target: str, task: str, content: bytes, tenant_id: str,
) -> DatasetRead:
    if len(content) > settings.max_upload_bytes:
        raise PayloadTooLarge(f"the upload is larger than {settings.max_upload_bytes} bytes")
    dataset = parse_csv(
        content,
        target=target,
        task=task,
        max_rows=settings.max_dataset_rows,
        max_features=settings.max_dataset_features,
    )
    return _store(session, tenant_id, name, "csv", dataset)


def get_row(session: Session, dataset_id: uuid.UUID, tenant_id: str | None) -> DatasetRow:
    """The dataset, or NotFound; with ``tenant_id``, another tenant's dataset is not found
    either (None: any tenant's — for workers, which only get ids the API checked)."""
    row = session.get(DatasetRow, dataset_id)
    if row is None or (tenant_id is not None and row.tenant_id != tenant_id):
        raise NotFound("dataset", dataset_id)
    return row


def read(session: Session, dataset_id: uuid.UUID, tenant_id: str | None) -> DatasetRead:
    return DatasetRead.model_validate(get_row(session, dataset_id, tenant_id))


def list_page(session: Session, tenant_id: str, page: PageQuery, *, task: str | None = None) -> Page[DatasetRead]:
    query = select(DatasetRow).where(DatasetRow.tenant_id == tenant_id)
    if task is not None:
        query = query.where(DatasetRow.task == task)
    rows, next_cursor = paginate(session, query, DatasetRow, page)
    return Page([DatasetRead.model_validate(row) for row in rows], next_cursor)


def load_arrays(session: Session, dataset_id: uuid.UUID) -> Dataset:
    row = get_row(session, dataset_id, None)
    tensors = load_tensors(row.data)
    return Dataset(
        features=tensors["features"],
        target=tensors["target"],
        task=row.task,  # type: ignore[arg-type]
        feature_names=row.feature_names,
        class_names=row.class_names,
        target_name=row.target_name,
    )
