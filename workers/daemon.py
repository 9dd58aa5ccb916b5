"""A worker process's background threads: lease renewal and heartbeat; reconciliation.

The daemon thread, every tick:
- renews the lease of the run this process is training (and reads its cancel flag),
- records the worker's heartbeat (GET /v1/queue lists workers seen recently).
A second thread runs the reconciler (expired leases, lost messages, webhook retries): it may
wait on a webhook receiver or the broker for seconds, which must never hold up a renewal (a
run whose lease lapses under a live worker is handed out again and retrains from its last
checkpoint). Both keep going through database outages; the runner decides what a lost lease
means.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field

from service.config import Settings
from service.jobs import reconciler, workers_registry
from service.db import session_scope
from service.runs import lifecycle

log = logging.getLogger(__name__)


@dataclass
class Attempt:
    """This process's hold on one run, updated by the daemon thread."""

    run_id: uuid.UUID
    owner: str
    # Set once the claim has committed: the daemon renews only then (a renewal that ran between
    # track() and the claim's commit would find no lease of this owner and mark the attempt lost).
    claimed: threading.Event = field(default_factory=threading.Event)
    lost: threading.Event = field(default_factory=threading.Event)
    cancel_requested: threading.Event = field(default_factory=threading.Event)


class WorkerDaemon:
    def __init__(self, settings: Settings, queues: list[str], device: str) -> None:
        self.settings = settings
        self.name = f"{socket.gethostname()}:{os.getpid()}"
        self.queues = queues
        self.device = device
        self.current: Attempt | None = None
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="mcdrop-daemon", daemon=True)
        # first pass at once: a restarted worker re-sends what its predecessor left behind
        self._reconciler = reconciler.ReconcilerThread(settings, first_after_s=0.0)

    @property
    def tick_s(self) -> float:
        return min(self.settings.heartbeat_interval_s, self.settings.lease_s / 3)

    def start(self) -> WorkerDaemon:
        self._thread.start()
        if self.settings.reconcile_interval_s > 0:
            self._reconciler.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self._reconciler.stop(wait=False)

    def track(self, run_id: uuid.UUID) -> Attempt:
        attempt = Attempt(run_id=run_id, owner=f"{self.name}:{uuid.uuid4().hex[:12]}")
        self.current = attempt
        return attempt

    def untrack(self, attempt: Attempt) -> None:
        if self.current is attempt:
            self.current = None

    def _loop(self) -> None:
        last = time.monotonic()
        while not self._stop.is_set():
            started, attempt = time.monotonic(), self.current  # read once: the runner may untrack meanwhile
            if started - last > self.settings.lease_s / 2 and attempt is not None and attempt.claimed.is_set():
                log.warning("lease renewal ran %.1f s after the previous one (the lease is %.1f s): "
                            "this process is short of CPU or the database is slow", started - last, self.settings.lease_s)
            last = started
            self._renew()
            self._heartbeat()
            self._wake.wait(self.tick_s)
            self._wake.clear()

    def _renew(self) -> None:
        attempt = self.current
        if attempt is None or not attempt.claimed.is_set():
            return
        try:
            with session_scope(self.settings.sqlalchemy_url) as session:
                held, cancel = lifecycle.renew_lease(session, attempt.run_id, attempt.owner, self.settings.lease_s)
        except Exception as exc:  # unknown: keep training, the epoch write is fenced anyway
            log.warning("lease renewal for run %s failed: %s", attempt.run_id, str(exc)[:300])
            return
        if not held:
            attempt.lost.set()
        if cancel:
            attempt.cancel_requested.set()

    def _heartbeat(self) -> None:
        attempt = self.current
        try:
            with session_scope(self.settings.sqlalchemy_url) as session:
                workers_registry.heartbeat(
                    session, name=self.name, hostname=socket.gethostname(), pid=os.getpid(),
                    queues=self.queues, device=self.device,
                    current_run_id=attempt.run_id if attempt else None,
                )
        except Exception as exc:
            log.debug("heartbeat failed: %s", exc)


_daemon: WorkerDaemon | None = None
_lock = threading.Lock()


def get_daemon(settings: Settings, queues: list[str], device: str) -> WorkerDaemon:
    """The process's daemon, started on first use (also in forked pool processes)."""
    global _daemon
    with _lock:
        if _daemon is None or _daemon._thread.ident is not None and not _daemon._thread.is_alive():
            _daemon = WorkerDaemon(settings, queues, device).start()
        return _daemon
