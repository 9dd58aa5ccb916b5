"""Fixtures for the client and CLI tests: the typed client over the session's in-process app,
a digits dataset and a run trained in this process, and cleanup of every run left queued."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from service.client import ApiError, McdropClient
from service.config import Settings
from service.datasets.schemas import DatasetRead
from service.runs.schemas import RunRead


@pytest.fixture(scope="module")
def mcdrop(client: TestClient) -> Iterator[McdropClient]:
    """The typed client over the session's TestClient (an httpx.Client): the real app in process,
    with the session tenant's API key."""
    with McdropClient(transport=client) as api:
        yield api


@pytest.fixture(scope="module")
def cancel_later(mcdrop: McdropClient) -> Iterator[list]:
    """Ids of runs (and sweeps) a test queued: cancelled at the end of the module, since a later
    test's real worker would otherwise train them."""
    queued: list = []
    yield queued
    for job_id in queued:
        try:
            mcdrop.cancel_run(job_id)
        except ApiError as exc:
            assert exc.status == 409, exc  # it had already ended


@pytest.fixture(scope="session")
def digits(client: TestClient) -> DatasetRead:
    with McdropClient(transport=client) as api:
        return api.create_dataset("digits", builtin="digits")


@pytest.fixture(scope="session")
def trained(client: TestClient, settings: Settings, digits: DatasetRead) -> RunRead:
    """A small digits run, trained in this process by the worker's job logic, with the worker's
    lease-renewing daemon running (training may outlast the tests' 3 s lease on a busy machine)."""
    from workers import runners
    from workers.daemon import WorkerDaemon

    with McdropClient(transport=client) as api:
        run = api.create_run({
            "dataset_id": digits.id, "model": {"hidden_layers": [32], "dropout": 0.3},
            "training": {"epochs": 3, "batch_size": 64, "seed": 3}, "evaluation": {"samples": 20},
        })
        daemon = WorkerDaemon(settings, ["cpu"], "cpu").start()
        try:
            runners.train_run(run.id, settings, daemon)
        finally:
            daemon.stop()
        trained = api.get_run(run.id)
    assert trained.status == "succeeded", trained
    return trained
