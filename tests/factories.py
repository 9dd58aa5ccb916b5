"""Plain factory functions for tests: datasets and trained runs through the real code paths."""

from __future__ import annotations

from typing import Any

from fastapi.testclient import TestClient

from service.config import Settings
from workers import runners

TEXTBOOK_MODEL = {"hidden_layers": [64, 64], "dropout": 0.5}
TEXTBOOK_TRAINING = {
    "epochs": 10, "batch_size": 32, "optimizer": "adam", "learning_rate": 0.001,
    "weight_decay": 0, "l1": 0, "validation_fraction": 0.2, "seed": 0,
}


def make_dataset(client: TestClient, builtin: str = "digits", name: str | None = None) -> dict[str, Any]:
    response = client.post("/v1/datasets", json={"name": name or builtin, "builtin": builtin})
    assert response.status_code == 201, response.text
    return response.json()


def make_run(
    client: TestClient, dataset_id: str, *, model: dict[str, Any] | None = None,
    training: dict[str, Any] | None = None,
) -> dict[str, Any]:
    body = {"dataset_id": dataset_id, "model": model or TEXTBOOK_MODEL, "training": training or TEXTBOOK_TRAINING}
    response = client.post("/v1/runs", json=body)
    assert response.status_code == 202, response.text
    return response.json()


def train_in_process(client: TestClient, settings: Settings, run: dict[str, Any]) -> dict[str, Any]:
    """Runs the worker's job logic in this process (the Celery path is covered end to end)."""
    import uuid

    from workers.daemon import WorkerDaemon

    # No daemon renews the lease in-process: a long one keeps a reconciler (the test app's) from
    # handing the run to a worker while a loaded machine trains slowly.
    settings = settings.model_copy(update={"lease_s": 300.0})
    runners.train_run(uuid.UUID(run["id"]), settings, WorkerDaemon(settings, ["cpu"], "cpu"))
    body = client.get(f"/v1/runs/{run['id']}").json()
    assert body["status"] == "succeeded", body
    return body
