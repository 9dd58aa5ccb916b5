"""Epoch durations read from run_metrics at scrape time: each row observed exactly once, also
when rows become visible out of id order (a transaction that committed late)."""

from __future__ import annotations

import math
from datetime import timedelta

from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import text

from service.config import Settings
from service.db import get_sessionmaker, utcnow
from service.observability.metrics import EpochDurations
from service.runs.models import RunMetricRow
from tests.factories import make_dataset, make_run


def histogram(collector: EpochDurations) -> dict[str, float]:
    registry = CollectorRegistry()
    registry.register(collector)
    found = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for sample in family.samples:
            key = sample.name.removeprefix("mcdrop_training_epoch_duration_seconds_")
            found[key + (f"[{sample.labels['le']}]" if "le" in sample.labels else "")] = sample.value
    return found


def test_each_row_once_also_when_committed_out_of_id_order(client: TestClient, settings: Settings) -> None:
    run = make_run(client, make_dataset(client, "iris")["id"])
    assert client.post(f"/v1/runs/{run['id']}/cancel").status_code == 200  # no worker may train it
    sessions = get_sessionmaker(settings.sqlalchemy_url)

    def reserve_id() -> int:  # what an INSERT does first; the row shows when its transaction commits
        with sessions() as session:
            return session.scalar(text("SELECT nextval(pg_get_serial_sequence('run_metrics', 'id'))"))

    def commit(row_id: int, epoch: int, duration: float, *, created_at=None) -> None:
        with sessions() as session:
            session.add(RunMetricRow(id=row_id, run_id=run["id"], epoch=epoch, train_loss=1.0, duration_s=duration,
                                     created_at=created_at or utcnow()))
            session.commit()

    commit(reserve_id(), 0, 9.0)  # an epoch before this process started: never observed
    epochs = EpochDurations(settings, started_at=utcnow())
    assert histogram(epochs)["count"] == 0

    first, second, third, old = (reserve_id() for _ in range(4))
    assert first < second < third < old

    commit(third, 3, 2.0)
    commit(first, 1, 0.5)
    seen = histogram(epochs)
    assert (seen["count"], seen["sum"]) == (2, 2.5)

    commit(second, 2, 1.0)  # committed after a higher id was read
    commit(old, 4, 7.0, created_at=epochs.started_at - timedelta(hours=1))  # before this process started
    seen = histogram(epochs)
    assert (seen["count"], seen["sum"]) == (3, 3.5)
    assert seen["bucket[0.5]"] == 1 and seen["bucket[1.0]"] == 2 and seen["bucket[2.5]"] == 3
    assert seen["bucket[+Inf]"] == 3

    again = histogram(epochs)  # nothing new: nothing observed twice
    assert (again["count"], again["sum"]) == (3, 3.5)
    assert math.isclose(again["sum"], 3.5)
