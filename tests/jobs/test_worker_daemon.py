"""The worker daemon's lease renewal through real PostgreSQL (a database of this module's own)."""

from __future__ import annotations

import time

from service.config import Settings
from service.db import session_scope
from service.runs import lifecycle
from service.runs.models import RunRow
from tests.jobs.test_webhooks import database_url, dataset_id  # noqa: F401 (fixtures)
from workers.daemon import WorkerDaemon


def lease_expires_at(settings: Settings, run_id):
    with session_scope(settings.sqlalchemy_url) as session:
        row = session.get(RunRow, run_id)
        assert row is not None
        return row.status, row.lease_expires_at


def test_renewals_before_the_claim_commits_do_not_lose_the_attempt(settings: Settings, database_url, dataset_id) -> None:
    """A worker tracks its attempt before it claims the run; a renewal in between finds no lease
    of its own and must not mark the attempt lost (it used to: the worker stopped at once, and the
    run waited for its unrenewed lease to run out before another attempt)."""
    settings = settings.model_copy(update={"database_url": database_url, "reconcile_interval_s": 0.0})
    with session_scope(settings.sqlalchemy_url) as session:
        run = RunRow(dataset_id=dataset_id, spec={"task": "classification"}, epochs_total=1)
        session.add(run)
        session.flush()
        run_id = run.id
    daemon = WorkerDaemon(settings, ["cpu"], "cpu").start()
    attempt = daemon.track(run_id)
    try:
        time.sleep(3 * daemon.tick_s)  # renewal ticks while the run is still queued
        assert not attempt.lost.is_set()
        with session_scope(settings.sqlalchemy_url) as session:
            assert lifecycle.claim(session, run_id, owner=attempt.owner, worker=daemon.name, device="cpu",
                                   lease_s=settings.lease_s)
        attempt.claimed.set()
        status, claimed_until = lease_expires_at(settings, run_id)
        time.sleep(3 * daemon.tick_s)
        status, renewed_until = lease_expires_at(settings, run_id)
        assert status == "running" and renewed_until > claimed_until  # renewed once claimed
        assert not attempt.lost.is_set()
    finally:
        daemon.untrack(attempt)
        daemon.stop()
