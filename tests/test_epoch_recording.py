"""Batched epoch records (workers.runners._EpochRecorder, repository.record_epochs): every
epoch's metrics row and event is written, a stop at any point resumes bit-identical, a cancel
keeps the metrics so far. The worker's job logic runs in this process on PostgreSQL."""

from __future__ import annotations

import uuid
from collections.abc import Callable

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from service.config import Settings
from service.db import session_scope
from service.runs import lifecycle, repository
from service.runs.models import RunCheckpointRow, RunEventRow, RunMetricRow, RunStatus, RunWeightsRow
from tests.factories import make_dataset, make_run
from workers import runners
from workers.daemon import WorkerDaemon

MODEL = {"hidden_layers": [16], "dropout": 0.2}
TRAINING = {"epochs": 6, "batch_size": 32, "seed": 11, "validation_fraction": 0.2}


@pytest.fixture(scope="module")
def iris(client: TestClient) -> dict:
    return make_dataset(client, "iris", name="iris-epoch-recording")


def batched(settings: Settings, interval_s: float = 3600.0) -> Settings:
    return settings.model_copy(update={"checkpoint_interval_s": interval_s})


def epochs_seen(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The epochs the recorder was handed, in order (a spy on _EpochRecorder.add)."""
    seen: list[int] = []
    add = runners._EpochRecorder.add

    def spy(self, metrics) -> None:
        seen.append(metrics.epoch)
        add(self, metrics)

    monkeypatch.setattr(runners._EpochRecorder, "add", spy)
    return seen


def writes_counted(monkeypatch: pytest.MonkeyPatch) -> list[tuple[list[int], bool]]:
    """(epochs, with a checkpoint) of each repository.record_epochs call."""
    calls: list[tuple[list[int], bool]] = []
    record = repository.record_epochs

    def spy(session, run_id, owner, epochs, blob):
        calls.append(([values["epoch"] for values in epochs], blob is not None))
        return record(session, run_id, owner, epochs, blob)

    monkeypatch.setattr(repository, "record_epochs", spy)
    return calls


def train(settings: Settings, run_id: str, should_stop: Callable[[], bool] = lambda: False,
          daemon: WorkerDaemon | None = None) -> None:
    runners.train_run(uuid.UUID(run_id), settings, daemon or WorkerDaemon(settings, ["cpu"], "cpu"), should_stop)


def history(settings: Settings, run_id: str) -> list[RunMetricRow]:
    with session_scope(settings.sqlalchemy_url) as session:
        return list(session.scalars(select(RunMetricRow).where(RunMetricRow.run_id == uuid.UUID(run_id))
                                    .order_by(RunMetricRow.epoch)))


def events(settings: Settings, run_id: str) -> list[tuple[str, str, int | None]]:
    with session_scope(settings.sqlalchemy_url) as session:
        rows = session.scalars(select(RunEventRow).where(RunEventRow.run_id == uuid.UUID(run_id)).order_by(RunEventRow.id))
        return [(row.kind, row.status, row.data.get("epoch")) for row in rows]


def weights(settings: Settings, run_id: str) -> bytes:
    with session_scope(settings.sqlalchemy_url) as session:
        row = session.get(RunWeightsRow, uuid.UUID(run_id))
        assert row is not None
        return row.weights


def state(client: TestClient, run_id: str) -> dict:
    return client.get(f"/v1/runs/{run_id}").json()


def test_short_epochs_are_written_in_one_transaction_at_the_end(client, settings, iris, monkeypatch) -> None:
    calls = writes_counted(monkeypatch)
    run = make_run(client, iris["id"], model=MODEL, training=TRAINING)
    train(batched(settings), run["id"])
    assert state(client, run["id"])["status"] == "succeeded"
    assert calls == [([1, 2, 3, 4, 5, 6], True)]
    assert [row.epoch for row in history(settings, run["id"])] == [1, 2, 3, 4, 5, 6]
    assert events(settings, run["id"]) == [
        ("status", "queued", None), ("status", "running", None),
        *[("epoch", "running", epoch) for epoch in range(1, 7)], ("status", "succeeded", None),
    ]

    calls.clear()
    every = make_run(client, iris["id"], model=MODEL, training=TRAINING)
    train(batched(settings, 0.0), every["id"])
    assert calls == [([epoch], True) for epoch in range(1, 7)]
    assert [row.train_loss for row in history(settings, every["id"])] == [
        row.train_loss for row in history(settings, run["id"])]


def test_stops_at_a_boundary_and_mid_epoch_resume_bit_identical(client, settings, iris, monkeypatch) -> None:
    reference = make_run(client, iris["id"], model=MODEL, training=TRAINING)
    train(batched(settings), reference["id"])

    seen = epochs_seen(monkeypatch)
    calls = writes_counted(monkeypatch)
    run = make_run(client, iris["id"], model=MODEL, training=TRAINING)
    # 1. the worker shuts down right after epoch 2 (between epochs): those epochs and a checkpoint
    #    are written although the interval has not passed; the run goes back to the queue
    train(batched(settings), run["id"], should_stop=lambda: len(seen) >= 2)
    assert calls == [([1, 2], True)]
    body = state(client, run["id"])
    assert body["status"] == "queued" and body["epochs_done"] == 2
    with session_scope(settings.sqlalchemy_url) as session:
        assert session.get(RunCheckpointRow, uuid.UUID(run["id"])).epoch == 2

    # 2. resumed, then stopped in the middle of epoch 5: epochs 3 and 4 were never written, so
    #    nothing changes; they will be trained again from the epoch-2 checkpoint
    polls = []

    def mid_epoch_5() -> bool:
        if len(seen) >= 4:
            polls.append(1)
        return len(polls) >= 3  # the poll before epoch 5, then before its first two batches

    calls.clear()
    train(batched(settings), run["id"], should_stop=mid_epoch_5)
    assert seen == [1, 2, 3, 4] and calls == []
    body = state(client, run["id"])
    assert body["status"] == "queued" and body["epochs_done"] == 2
    assert [row.epoch for row in history(settings, run["id"])] == [1, 2]

    # 3. resumed to the end: the same history and weights as the run that was never stopped
    train(batched(settings), run["id"])
    assert state(client, run["id"])["status"] == "succeeded"
    assert calls == [([3, 4, 5, 6], True)]
    assert [(row.epoch, row.train_loss, row.val_loss) for row in history(settings, run["id"])] == [
        (row.epoch, row.train_loss, row.val_loss) for row in history(settings, reference["id"])]
    assert weights(settings, run["id"]) == weights(settings, reference["id"])
    epoch_events = [epoch for kind, _, epoch in events(settings, run["id"]) if kind == "epoch"]
    assert epoch_events == [1, 2, 3, 4, 5, 6]


def test_cancel_keeps_the_metrics_of_unwritten_epochs(client, settings, iris, monkeypatch) -> None:
    seen = epochs_seen(monkeypatch)
    calls = writes_counted(monkeypatch)
    run = make_run(client, iris["id"], model=MODEL, training=TRAINING)
    daemon = WorkerDaemon(settings, ["cpu"], "cpu")  # not started: the test plays its lease renewal

    def cancel_after_epoch_3() -> bool:
        if len(seen) == 3 and not daemon.current.cancel_requested.is_set():
            assert client.post(f"/v1/runs/{run['id']}/cancel").status_code == 202
            daemon.current.cancel_requested.set()  # what the renewal reads from the row
        return False

    train(batched(settings), run["id"], should_stop=cancel_after_epoch_3, daemon=daemon)
    body = state(client, run["id"])
    assert body["status"] == "cancelled" and body["epochs_done"] == 3
    assert calls == [([1, 2, 3], False)]  # no checkpoint: the run has ended
    assert [row.epoch for row in history(settings, run["id"])] == [1, 2, 3]


def test_record_epochs_is_fenced_and_replaces_rows_of_retrained_epochs(client, settings, iris) -> None:
    run = make_run(client, iris["id"], model=MODEL, training=TRAINING)
    run_id = uuid.UUID(run["id"])

    def metrics(epoch: int, loss: float) -> dict:
        return {"epoch": epoch, "train_loss": loss, "val_loss": None, "train_accuracy": None,
                "val_accuracy": None, "train_rmse": None, "val_rmse": None, "duration_s": 0.01}

    with session_scope(settings.sqlalchemy_url) as session:
        assert lifecycle.claim(session, run_id, owner="me", worker="w", device="cpu", lease_s=60)
    with session_scope(settings.sqlalchemy_url) as session:
        assert not repository.record_epochs(session, run_id, "me", [metrics(1, 1.0), metrics(2, 2.0)], None)
    with session_scope(settings.sqlalchemy_url) as session:
        repository.record_epochs(session, run_id, "me", [metrics(2, 2.5), metrics(3, 3.0)], b"state")
    assert [(row.epoch, row.train_loss) for row in history(settings, run["id"])] == [(1, 1.0), (2, 2.5), (3, 3.0)]
    with session_scope(settings.sqlalchemy_url) as session:
        checkpoint = session.get(RunCheckpointRow, run_id)
        assert (checkpoint.epoch, checkpoint.size_bytes) == (3, 5)
        with pytest.raises(repository.LeaseLost):
            repository.record_epochs(session, run_id, "someone else", [metrics(4, 4.0)], b"x")
    assert state(client, run["id"])["epochs_done"] == 3
    with session_scope(settings.sqlalchemy_url) as session:  # leave it ended
        assert lifecycle.transition(session, run_id, RunStatus.CANCELLED, expected=[RunStatus.RUNNING])
