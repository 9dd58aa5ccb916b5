"""GET /metrics (Prometheus text format) for one API process.

- ``mcdrop_http_requests_total`` and ``mcdrop_http_request_duration_seconds`` by method, route
  TEMPLATE (``/v1/runs/{run_id}``, never the raw path) and status, from a pure ASGI middleware.
- ``mcdrop_runs`` by kind and state, ``mcdrop_queue_depth`` / ``mcdrop_queue_running`` per
  queue and ``mcdrop_workers_alive``: counted in the database at scrape time (one GROUP BY each).
- ``mcdrop_training_epoch_duration_seconds``: workers are other processes, so at each scrape
  this process reads the run_metrics rows written since the last one (``EpochDurations``) and
  observes their ``duration_s``; the histogram only grows. Every API replica sees every epoch:
  aggregate across replicas with ``max``, not ``sum``.
- ``mcdrop_served_predictive_entropy_nats`` / ``..._mutual_information_nats`` per model
  (``service.observability.uncertainty``), and the process's own CPU, memory and GC metrics.

Only tenant-free aggregates. ``MCDROP_METRICS_TOKEN``, when set, is required as
``Authorization: Bearer <token>``.
"""

from __future__ import annotations

import hmac
import logging
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from sqlalchemy.exc import SQLAlchemyError
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Mount, Route, Router
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.config import Settings
from service.db import get_sessionmaker, utcnow
from service.jobs.models import WorkerRow
from service.observability.uncertainty import served_uncertainty
from service.runs.models import RunMetricRow, RunRow, RunStatus

log = logging.getLogger(__name__)

# No ``*_created`` sample beside every counter and histogram series: they double the series
# and Prometheus does not use them (process-wide setting of prometheus_client).
disable_created_metrics()

REQUEST_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
EPOCH_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
MAX_GAPS = 10_000  # ids below the high-water mark awaited at most (EpochDurations)
MAX_GAPS_PER_SCRAPE = 1_000
UNMATCHED_ROUTE = "unmatched"  # 404s outside every route: one label value, whatever the path


class HttpMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        labels = ["method", "route", "status"]
        self.requests = Counter(
            "mcdrop_http_requests", "HTTP requests answered, by method, route template and status",
            labels, registry=registry,
        )
        self.duration = Histogram(
            "mcdrop_http_request_duration_seconds",
            "Time from request to the end of the response (SSE streams: until they end), by method, route template and status",
            labels, buckets=REQUEST_BUCKETS, registry=registry,
        )
        # (method, route, status) -> label children: a dict lookup per request instead of
        # prometheus_client's label validation and lock.
        self._children: dict[tuple[str, str, int], tuple[Counter, Histogram]] = {}

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        key = (method, route, status)
        children = self._children.get(key)
        if children is None:
            values = (method, route, str(status))
            children = self._children[key] = (self.requests.labels(*values), self.duration.labels(*values))
        children[0].inc()
        children[1].observe(seconds)


class HttpMetricsMiddleware:
    """Counts and times every HTTP request by the template of the route that served it.

    FastAPI routes put themselves in ``scope["route"]``; plain Starlette routes of ``router``
    (/metrics, /docs, /openapi.json) only leave their ``endpoint``, looked up once each.
    """

    def __init__(self, app: ASGIApp, metrics: HttpMetrics, router: Router) -> None:
        self.app = app
        self.metrics = metrics
        self.router = router
        self._plain_templates: dict[object, str] = {}

    def _template(self, scope: Scope) -> str:
        path = getattr(scope.get("route"), "path", None)  # set once routed (also for a 405)
        if path:
            return path
        endpoint = scope.get("endpoint")
        if endpoint is None:
            return UNMATCHED_ROUTE
        template = self._plain_templates.get(endpoint)
        if template is None:
            template = next(
                (route.path for route in self.router.routes
                 if isinstance(route, (Route, Mount)) and getattr(route, "endpoint", getattr(route, "app", None)) is endpoint),
                UNMATCHED_ROUTE,
            )
            self._plain_templates[endpoint] = template
        return template

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500  # unless a response starts: an exception escaped to the server error handler

        async def send_and_note_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note_status)
        finally:
            method = scope["method"] if scope["method"] in KNOWN_METHODS else "other"
            self.metrics.observe(method, self._template(scope), status, time.perf_counter() - start)


class JobsCollector(Collector):
    """Runs by kind and state, queue depths and live workers, counted at scrape time."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("mcdrop_metrics_database_up", "1 if this scrape could read the database")
        try:
            runs, queues, workers = self._count()
        except SQLAlchemyError as exc:
            log.warning("metrics: the database could not be read: %s", str(exc).splitlines()[0][:300])
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        family = GaugeMetricFamily("mcdrop_runs", "Runs (training runs and sweeps) by kind and state", labels=["kind", "state"])
        for kind in sorted({"train", "sweep", *(kind for kind, _ in runs)}):
            for state in RunStatus.ALL:
                family.add_metric([kind, state], runs.get((kind, state), 0))
        yield family
        depth = GaugeMetricFamily("mcdrop_queue_depth", "Queued runs waiting for a worker, per queue", labels=["queue"])
        running = GaugeMetricFamily("mcdrop_queue_running", "Runs being trained, per queue", labels=["queue"])
        for queue in sorted({"cpu", "cuda", *(queue for queue, _ in queues)}):
            depth.add_metric([queue], queues.get((queue, RunStatus.QUEUED), 0))
            running.add_metric([queue], queues.get((queue, RunStatus.RUNNING), 0))
        yield depth
        yield running
        yield GaugeMetricFamily(
            "mcdrop_workers_alive", "Workers whose heartbeat was seen within three heartbeat intervals", value=workers
        )

    def _count(self) -> tuple[dict[tuple[str, str], int], dict[tuple[str, str], int], int]:
        cutoff = utcnow() - timedelta(seconds=3 * self.settings.heartbeat_interval_s + 1)
        with get_sessionmaker(self.settings.sqlalchemy_url)() as session:
            runs = {
                (kind, state): count
                for kind, state, count in session.execute(
                    select(RunRow.kind, RunRow.status, func.count()).group_by(RunRow.kind, RunRow.status)
                )
            }
            queues = {
                (queue, state): count
                for queue, state, count in session.execute(
                    select(RunRow.queue, RunRow.status, func.count())
                    .where(RunRow.status.in_([RunStatus.QUEUED, RunStatus.RUNNING]))
                    .group_by(RunRow.queue, RunRow.status)
                )
            }
            workers = session.scalar(select(func.count()).select_from(WorkerRow).where(WorkerRow.last_seen_at >= cutoff))
        return runs, queues, int(workers or 0)


class EpochDurations(Collector):
    """``mcdrop_training_epoch_duration_seconds``: the epochs the workers finished since this
    process started, read from run_metrics at scrape time by a high-water mark on its id.

    Ids are handed out when a row is inserted but become visible when its transaction commits,
    so a row with a lower id can appear after a higher one: ids skipped below the mark are
    remembered for ``gap_grace_s`` and observed if they show up (a rolled-back insert leaves a
    gap that never fills; it is forgotten then). Each row is observed once.
    """

    def __init__(self, settings: Settings, *, started_at: datetime | None = None, gap_grace_s: float = 300.0,
                 batch: int = 10_000) -> None:
        self.settings = settings
        self.started_at = started_at or datetime.now(UTC)
        self.gap_grace_s = gap_grace_s
        self.batch = batch
        self.histogram = Histogram(
            "mcdrop_training_epoch_duration_seconds", "Duration of training epochs finished by the workers",
            buckets=EPOCH_BUCKETS, registry=None,
        )
        self._high_water: int | None = None  # the largest id observed
        self._gaps: dict[int, float] = {}  # id below the mark not seen yet -> monotonic time noticed
        self._lock = threading.Lock()  # scrapes may overlap

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            try:
                self._tail()
            except SQLAlchemyError as exc:  # observed at the next scrape instead
                log.warning("metrics: epoch durations not read: %s", str(exc).splitlines()[0][:300])
        yield from self.histogram.collect()

    def _tail(self) -> None:
        now = time.monotonic()
        self._gaps = {gap: noticed for gap, noticed in self._gaps.items() if now - noticed < self.gap_grace_s}
        columns = select(RunMetricRow.id, RunMetricRow.duration_s).where(RunMetricRow.created_at >= self.started_at)
        first_scrape = self._high_water is None
        with get_sessionmaker(self.settings.sqlalchemy_url)() as session:
            filled = []
            if self._gaps:  # rows committed late, below the mark (the newest gaps first)
                wanted = sorted(self._gaps, reverse=True)[:MAX_GAPS_PER_SCRAPE]
                filled = session.execute(columns.where(RunMetricRow.id.in_(wanted))).all()
            if first_scrape:
                # Only the newest rows can be from after the start: a bounded scan by id, and
                # the mark goes to the newest row (no gaps below it are awaited).
                highest = session.scalar(select(func.max(RunMetricRow.id))) or 0
                floor = max(0, highest - self.batch)
            else:
                highest = floor = self._high_water
            rows = session.execute(columns.where(RunMetricRow.id > floor).order_by(RunMetricRow.id).limit(self.batch)).all()
        for row_id, duration in filled:
            del self._gaps[row_id]
            self.histogram.observe(max(0.0, float(duration)))
        for row_id, duration in rows:
            self.histogram.observe(max(0.0, float(duration)))
            if not first_scrape:  # ids jumped over since the last row
                for gap in range(max(highest + 1, row_id - MAX_GAPS), row_id):
                    self._gaps[gap] = now
            highest = max(highest, row_id)
        if len(self._gaps) > MAX_GAPS:  # a long run of rolled-back inserts: keep the newest
            for gap in sorted(self._gaps)[: len(self._gaps) - MAX_GAPS]:
                del self._gaps[gap]
        self._high_water = highest


class ApiMetrics:
    """The registry of one API app and what feeds it."""

    def __init__(self, settings: Settings) -> None:
        self.registry = CollectorRegistry()
        self.http = HttpMetrics(self.registry)
        self.epochs = EpochDurations(settings)
        self.registry.register(JobsCollector(settings))
        self.registry.register(self.epochs)
        served_uncertainty.capacity = max(1, settings.model_cache_size)
        self.registry.register(served_uncertainty)
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


def _bearer_token(request: Request) -> str | None:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def metrics_endpoint(request: Request) -> Response:
    """GET /metrics. Synchronous: Starlette runs it in the threadpool (it reads the database)."""
    settings: Settings = request.app.state.settings
    if settings.metrics_token is not None:
        given = _bearer_token(request)
        expected = settings.metrics_token.get_secret_value().encode()
        if given is None or not hmac.compare_digest(given.encode(), expected):
            raise HTTPException(
                401, "the metrics token is required: send `Authorization: Bearer <MCDROP_METRICS_TOKEN>`",
                headers={"WWW-Authenticate": 'Bearer realm="mcdrop-metrics"'},
            )
    metrics: ApiMetrics = request.app.state.metrics
    return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)
