"""Annotated dependencies: settings, a database session, the model cache, validated ids."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.orm import Session

from service.config import Settings
from service.datasets import service as datasets
from service.datasets.models import DatasetRow
from service.db import get_sessionmaker
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


def valid_run_id(run_id: uuid.UUID, session: SessionDep) -> RunRow:
    """Loads the run or raises NotFound (404)."""
    return runs.get_row(session, run_id)


def valid_dataset_id(dataset_id: uuid.UUID, session: SessionDep) -> DatasetRow:
    return datasets.get_row(session, dataset_id)


ValidRun = Annotated[RunRow, Depends(valid_run_id)]
ValidDataset = Annotated[DatasetRow, Depends(valid_dataset_id)]
