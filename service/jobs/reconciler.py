"""The reconciler: makes sure every run that should be trained gets trained.

- running runs whose lease expired (their worker died) go back to queued;
- queued runs whose message may be lost (broker flushed, embedded broker killed mid-delivery,
  send failed) are dispatched again, with a doubling delay so a long queue is not flooded;
- due webhook deliveries are attempted.

Every step is a compare-and-set on the database, so any number of reconcilers (in workers and
API replicas) may run at once.
"""

from __future__ import annotations

import logging
import uuid
from datetime import timedelta

from sqlalchemy import or_, select, update

from service import queue
from service.config import Settings
from service.db import session_scope, utcnow
from service.jobs import idempotency, webhooks
from service.runs import lifecycle
from service.runs.models import RunRow, RunStatus

log = logging.getLogger(__name__)

MAX_REDISPATCH_DELAY_S = 3600.0


def redispatch_delay(settings: Settings, dispatch_count: int) -> float:
    return min(MAX_REDISPATCH_DELAY_S, settings.redispatch_after_s * 2 ** max(0, dispatch_count - 1))


def mark_dispatched(settings: Settings, run_id: uuid.UUID) -> None:
    with session_scope(settings.sqlalchemy_url) as session:
        session.execute(
            update(RunRow).where(RunRow.id == run_id)
            .values(dispatched_at=utcnow(), dispatch_count=RunRow.dispatch_count + 1)
        )


def dispatch(settings: Settings, run: RunRow) -> bool:
    """Send a job's message (its task by kind); False (and logged) if the broker is unreachable."""
    try:
        queue.enqueue_training(settings, run.id, queue_name=run.queue, priority=run.priority,
                               task_name=queue.task_for_kind(run.kind))
        return True
    except Exception as exc:
        log.warning("could not send run %s to the broker: %s", run.id, exc)
        return False


def reconcile_once(settings: Settings) -> dict[str, int]:
    url = settings.sqlalchemy_url
    with session_scope(url) as session:
        requeued = lifecycle.expire_leases(session)
        session.commit()
    for run_id in requeued:
        log.warning("run %s: its worker stopped heartbeating; back to the queue", run_id)

    now = utcnow()
    sent = 0
    with session_scope(url) as session:
        candidates = list(session.scalars(
            select(RunRow).where(
                RunRow.status == RunStatus.QUEUED,
                or_(RunRow.dispatched_at.is_(None), RunRow.dispatched_at < now - timedelta(seconds=settings.redispatch_after_s)),
            ).order_by(RunRow.created_at).limit(200)
        ))
        for run in candidates:
            if run.dispatched_at is not None and run.dispatched_at > now - timedelta(seconds=redispatch_delay(settings, run.dispatch_count)):
                continue
            # claim the right to send (another reconciler may be looking at the same row)
            claimed = session.execute(
                update(RunRow).where(
                    RunRow.id == run.id, RunRow.status == RunStatus.QUEUED,
                    RunRow.dispatch_count == run.dispatch_count,
                ).values(dispatched_at=now, dispatch_count=run.dispatch_count + 1)
            ).rowcount == 1
            session.commit()
            if claimed and dispatch(settings, run):
                sent += 1
                log.info("run %s dispatched again (attempt %d)", run.id, run.dispatch_count + 1)
    delivered = webhooks.deliver_due(settings)
    idempotency.purge_expired(url)
    return {"requeued": len(requeued), "dispatched": sent, "webhook_attempts": delivered}


class ReconcilerThread:
    """Runs :func:`reconcile_once` every ``reconcile_interval_s`` in a daemon thread of its own
    (the API's, and each worker's beside its lease-renewal thread: a webhook receiver that takes
    its full timeout, or a slow broker, must never delay a lease renewal)."""

    def __init__(self, settings: Settings, *, first_after_s: float | None = None) -> None:
        import threading

        self.settings = settings
        self.first_after_s = settings.reconcile_interval_s if first_after_s is None else first_after_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="mcdrop-reconciler", daemon=True)

    def start(self) -> ReconcilerThread:
        self._thread.start()
        return self

    def stop(self, *, wait: bool = True) -> None:
        self._stop.set()
        if wait and self._thread.ident is not None:
            self._thread.join(timeout=10)

    def _loop(self) -> None:
        delay = self.first_after_s
        while not self._stop.wait(delay):
            delay = self.settings.reconcile_interval_s
            try:
                reconcile_once(self.settings)
            except Exception as exc:
                log.warning("reconciler: %s: %s", type(exc).__name__, str(exc)[:300])
