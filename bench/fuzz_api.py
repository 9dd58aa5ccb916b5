"""Fuzz the HTTP API from its own OpenAPI schema with schemathesis: no request may get a 5xx.

Every operation of ``/openapi.json`` gets generated requests, valid ones (positive) and
invalid ones (negative), sent in process to the ASGI app with an API key. Path parameters,
``dataset_id``-like body and query fields are real ids half of the time (a dataset, a trained
run, a queued run, a sweep, a key, a registered model, ...), so requests get past "not found"
into the handlers; predict inputs of a real run get its feature count half of the time, so the
model itself is fed generated numbers. The only check that fails the run is schemathesis'
``not_a_server_error``; everything else (status codes outside the documented ones, ...) is
only counted.

    python -m bench.fuzz_api --examples 200    # the long profile (``make bench-fuzz``)

It needs nothing running: a temporary SQLite database and the embedded broker, unless
``--database-url`` / ``--broker-url`` point elsewhere (an empty PostgreSQL database is
migrated first). ``tests/test_schemathesis.py`` runs a short profile (>= 1,000 requests) in
the test suite with :func:`fuzz`.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Operations that cannot be fuzzed this way, and why (none at present: the event streams are
# read up to their first event, see ``max_stream_events``, so the live feeds are fuzzed too).
EXCLUDED: dict[tuple[str, str], str] = {}

# Path, query and body fields that take an id of an object the fuzzer made beforehand.
ID_FIELDS = ("dataset_id", "run_id", "sweep_id", "key_id", "job_id", "name", "alias", "version")


@dataclass
class Fixtures:
    """Real objects of the fuzzing tenant: values by field name, and input widths by run id or model name."""

    ids: dict[str, list[Any]] = field(default_factory=dict)
    input_widths: dict[str, int] = field(default_factory=dict)


@dataclass
class Failure:
    operation: str
    status: int | None  # None: the app raised through the transport (a server would answer 500) or timed out
    reproduce: str  # a curl command (API key hidden)
    response: str


@dataclass
class Report:
    requests: int = 0
    by_operation: Counter = field(default_factory=Counter)
    by_status: Counter = field(default_factory=Counter)
    by_operation_status: Counter = field(default_factory=Counter)  # (operation, status)
    failures: list[Failure] = field(default_factory=list)
    not_generated: dict[str, str] = field(default_factory=dict)  # "GET /x negative": why
    seconds: float = 0.0

    def summary(self) -> str:
        statuses = ", ".join(f"{status}: {count}" for status, count in sorted(self.by_status.items()))
        lines = [f"{self.requests} requests to {len(self.by_operation)} operations in {self.seconds:.1f} s "
                 f"({self.requests / max(self.seconds, 1e-9):.0f}/s); statuses {statuses}; "
                 f"{len(self.failures)} server errors"]
        for failure in self.failures[:20]:
            status = failure.status or "raised (a 500, or a hang)"
            lines.append(f"  {failure.operation} -> {status}: {failure.response[:300]}\n    {failure.reproduce}")
        return "\n".join(lines)


def fuzz(
    app: Any,
    headers: Mapping[str, str],
    *,
    examples_per_operation: int,
    min_requests: int = 0,
    fixtures: Fixtures | None = None,
    modes: tuple[str, ...] = ("positive", "negative"),
    seed: int | None = 0,
    exclude: Mapping[tuple[str, str], str] = EXCLUDED,
    request_timeout_s: float = 20.0,
    max_stream_events: int = 1,
    progress: Callable[[str], None] | None = None,
) -> Report:
    """Send ``examples_per_operation`` generated requests per operation and mode to ``app``,
    then, while fewer than ``min_requests`` were sent, more rounds (other seeds) spread over the
    operations whose inputs were not exhausted.

    ``seed`` makes the generation reproducible (None: random). Event streams are read up to
    ``max_stream_events`` events, then closed (what a client that goes away does)."""
    import hypothesis
    import schemathesis
    from hypothesis import HealthCheck, Phase
    from hypothesis import strategies as st
    from schemathesis.checks import not_a_server_error
    from schemathesis.generation.modes import GenerationMode
    from schemathesis.python import asgi

    report = Report()
    started = time.perf_counter()
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    # The API key is ours (``headers``): no generated Authorization headers, which would only
    # test the key check (tests/api cover it) and spend a sixth of the requests on 401s.
    schema.config.generation.update(with_security_parameters=False)
    fixtures = fixtures or Fixtures()
    hidden = {name: "***" for name in headers}
    call_headers = dict(headers)

    def send_one(session: Any, case: Any, data: Any, label: str) -> None:
        _use_fixtures(case, data, fixtures, st)
        report.requests += 1
        report.by_operation[label] += 1
        try:
            response = case.call(session=session, headers=call_headers, timeout=request_timeout_s)
        except Exception as exc:  # a hang past the timeout, or the app raising through the transport
            report.failures.append(Failure(label, None, _curl(case, hidden), f"{type(exc).__name__}: {exc}"))
            return
        report.by_status[response.status_code] += 1
        report.by_operation_status[label, response.status_code] += 1
        try:
            case.validate_response(response, checks=[not_a_server_error], headers=call_headers)
        except Exception:  # the check failed: record it, and keep generating
            report.failures.append(Failure(label, response.status_code, _curl(case, hidden), response.text[:2000]))

    def run(session: Any, operation: Any, label: str, mode: str, examples: int, round_seed: int | None) -> int:
        """Sends up to ``examples`` requests; returns how many (fewer: the inputs ran out)."""
        before = report.requests
        strategy = operation.as_strategy(generation_mode=GenerationMode(mode))
        test = hypothesis.given(case=strategy, data=st.data())(
            lambda case, data: send_one(session, case, data, label))
        test = hypothesis.settings(
            max_examples=examples, deadline=None, database=None, phases=[Phase.generate],
            suppress_health_check=list(HealthCheck), verbosity=hypothesis.Verbosity.quiet,
        )(test)
        if round_seed is not None:
            test = hypothesis.seed(round_seed)(test)
        try:
            test()
        except hypothesis.errors.Unsatisfiable as exc:  # e.g. no invalid request exists for GET /healthz
            report.not_generated[f"{label} {mode}"] = str(exc).split(".")[0][:200]
        return report.requests - before

    jobs = []
    for result in schema.get_all_operations():
        operation = result.ok()
        key = (operation.method.upper(), operation.path)
        if key not in exclude:
            jobs += [(operation, f"{key[0]} {key[1]}", mode) for mode in modes]

    with contextlib.ExitStack() as stack:
        session = stack.enter_context(asgi.get_client(app, max_stream_events=max_stream_events))
        stack.callback(asgi.shutdown_lifespans)  # the app's lifespan ends with the fuzzing
        examples, round_number = examples_per_operation, 0
        while jobs and round_number < 10:
            round_seed = None if seed is None else seed + round_number
            unexhausted = []
            for job in jobs:
                sent = run(session, *job, examples, round_seed)
                if sent >= examples:
                    unexhausted.append(job)
                if progress is not None:
                    progress(f"{job[1]} ({job[2]}): {sent} requests; {report.requests} in all, "
                             f"{len(report.failures)} server errors")
            jobs = unexhausted
            missing = min_requests - report.requests
            if missing <= 0:
                break
            examples, round_number = max(1, math.ceil(missing / max(1, len(jobs)))), round_number + 1
    report.seconds = time.perf_counter() - started
    return report


def _use_fixtures(case: Any, data: Any, fixtures: Fixtures, st: Any) -> None:
    """Half of the time, a real id in place of a generated one (path, query, body); a real
    run's feature count for predict inputs."""
    for container in (case.path_parameters, case.query, case.body if isinstance(case.body, dict) else None):
        if not container:
            continue
        for name in list(container):
            choices = fixtures.ids.get(name)
            if choices and data.draw(st.booleans(), label=f"real {name}"):
                container[name] = data.draw(st.sampled_from(choices), label=name)
    width = next((fixtures.input_widths[str(value)] for value in (case.path_parameters or {}).values()
                  if str(value) in fixtures.input_widths), None)
    if width and isinstance(case.body, dict) and "inputs" in case.body and data.draw(st.booleans(), label="width"):
        number = st.floats(allow_nan=False, allow_infinity=False)
        case.body["inputs"] = data.draw(st.lists(st.lists(number, min_size=width, max_size=width), min_size=1,
                                                 max_size=4), label="inputs")


def _curl(case: Any, hidden: Mapping[str, str]) -> str:
    try:
        return case.as_curl_command(headers=dict(hidden))
    except Exception as exc:  # the repro is a courtesy; never let it hide the failure
        return f"(no curl command: {exc}); {case.operation.label} path={case.path_parameters} query={case.query} body={case.body!r:.500}"


# -- objects to fuzz against ----------------------------------------------------------------


def prepare(client: Any, settings: Any, *, regression: bool = False) -> Fixtures:
    """Make the fuzzing tenant's objects through the API (``client``: a service.client.McdropClient)
    and train one small classification run (and one regression run with ``regression``) in process."""
    from service.client import ApiError

    fixtures = Fixtures()

    def add(name: str, value: Any) -> None:
        fixtures.ids.setdefault(name, []).append(str(value))

    digits = client.create_dataset("fuzz digits", builtin="digits")
    add("dataset_id", digits.id)
    trained = _train(client, settings, {"dataset_id": str(digits.id), "model": {"hidden_layers": [16], "dropout": 0.3},
                                        "training": {"epochs": 2, "batch_size": 128, "seed": 1},
                                        "evaluation": {"samples": 10}})
    add("run_id", trained)
    fixtures.input_widths[str(trained)] = digits.n_features
    if regression:
        diabetes = client.create_dataset("fuzz diabetes", builtin="diabetes")
        add("dataset_id", diabetes.id)
        fitted = _train(client, settings, {"dataset_id": str(diabetes.id), "model": {"hidden_layers": [16], "dropout": 0.1},
                                           "training": {"epochs": 3, "batch_size": 64, "seed": 1},
                                           "evaluation": {"samples": 10}})
        add("run_id", fitted)
        fixtures.input_widths[str(fitted)] = diabetes.n_features
    add("run_id", client.create_run({"dataset_id": str(digits.id), "training": {"epochs": 1}}).id)  # stays queued
    regression_set = client.create_dataset("fuzz diabetes sweep", builtin="diabetes")
    add("sweep_id", client.create_sweep({"dataset_id": str(regression_set.id), "grid": {"dropout": [0.1, 0.2]},
                                         "training": {"epochs": 1}, "splits": {"folds": 2}, "metric": "rmse",
                                         "retrain_best": False}).id)
    add("key_id", client.create_key("fuzz spare").id)
    register = getattr(client, "register_model", None)
    if register is not None:  # the model registry
        try:
            version = register("fuzz-model", trained)
            add("name", "fuzz-model")
            add("version", getattr(version, "version", 1))
            client.set_alias("fuzz-model", "production", getattr(version, "version", 1))
            add("alias", "production")
            fixtures.input_widths["fuzz-model"] = digits.n_features
        except ApiError as exc:
            print(f"fuzz: no registered model ({exc})", file=sys.stderr)
    submit = getattr(client, "create_batch_prediction", None)
    if submit is not None:  # batch prediction jobs
        try:
            add("job_id", submit({"run_id": str(trained), "dataset_id": str(digits.id)}).id)
        except ApiError as exc:
            print(f"fuzz: no batch prediction job ({exc})", file=sys.stderr)
    return fixtures


def _train(client: Any, settings: Any, spec: dict) -> uuid.UUID:
    """A run trained by the worker's job logic in this process (its lease renewed as a worker does)."""
    from workers import runners
    from workers.daemon import WorkerDaemon

    run = client.create_run(spec)
    daemon = WorkerDaemon(settings, ["cpu"], "cpu").start()
    try:
        runners.train_run(run.id, settings, daemon)
    finally:
        daemon.stop()
    status = client.get_run(run.id).status
    if status != "succeeded":
        raise RuntimeError(f"the fuzzing fixture run {run.id} ended {status}")
    return run.id


def cancel_leftovers(client: Any) -> int:
    """Cancel every job of the fuzzing tenant still queued or running (a later worker would
    otherwise train what the fuzzer submitted). Returns how many."""
    from service.client import ApiError

    cancelled = 0
    listings: list[tuple[Callable[..., Iterator[Any]], Callable[[Any], Any]]] = [
        (client.iter_runs, client.cancel_run), (client.iter_sweeps, client.cancel_sweep),
    ]
    if hasattr(client, "iter_batch_predictions"):
        listings.append((client.iter_batch_predictions, client.cancel_batch_prediction))
    for listing, cancel in listings:
        for status in ("queued", "running"):
            for job in list(listing(status=status, page_size=1000)):
                try:
                    cancel(job.id)
                    cancelled += 1
                except ApiError as exc:
                    if exc.status != 409:  # 409: it ended meanwhile
                        raise
    return cancelled


def examples_for(total: int, operations: int, modes: int = 2) -> int:
    """Examples per operation and mode for a first round of about ``total`` requests."""
    return max(1, math.ceil(total / max(1, operations * modes)))


# -- the long profile -----------------------------------------------------------------------


@contextlib.contextmanager
def _service(database_url: str | None, broker_url: str | None) -> Iterator[tuple[Any, str]]:
    """Settings on a temporary data folder, a migrated database, an API key of tenant "fuzz"."""
    from service.auth.service import create_key
    from service.config import Settings
    from service.db import get_sessionmaker
    from service.migrate import upgrade

    with tempfile.TemporaryDirectory(prefix="mcdrop-fuzz-") as data_dir:
        settings = Settings(data_dir=Path(data_dir), database_url=database_url, broker_url=broker_url,
                            reconcile_interval_s=0, auth="on")
        upgrade(settings.sqlalchemy_url)
        with get_sessionmaker(settings.sqlalchemy_url)() as session:
            key = create_key(session, "fuzz", "fuzzing").key
        yield settings, key


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.fuzz_api", description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=200, help="generated requests per operation and mode")
    parser.add_argument("--min-requests", type=int, default=0, help="more rounds until at least this many were sent")
    parser.add_argument("--seed", type=int, default=None, help="reproducible generation (default: random)")
    parser.add_argument("--positive-only", action="store_true", help="only requests that fit the schema")
    parser.add_argument("--database-url", default=None, help="default: a temporary SQLite database")
    parser.add_argument("--broker-url", default=None, help="default: the embedded filesystem broker")
    parser.add_argument("--verbose", action="store_true", help="statuses per operation")
    args = parser.parse_args(argv)

    import logging

    from fastapi.testclient import TestClient

    from service.client import McdropClient

    # Malformed requests are the point here: no warning per multipart header it refuses.
    logging.getLogger("python_multipart").setLevel(logging.ERROR)

    from service.api.app import create_app

    with _service(args.database_url, args.broker_url) as (settings, key):
        headers = {"Authorization": f"Bearer {key}"}
        # One app makes the fixtures (TestClient runs its lifespan), another is fuzzed (schemathesis runs its own).
        with TestClient(create_app(settings), headers=headers) as http, McdropClient(transport=http) as client:
            print("fuzz: preparing a dataset, trained runs, a queued run, a sweep, a key, a model ...", flush=True)
            fixtures = prepare(client, settings, regression=True)
            try:
                report = fuzz(create_app(settings), headers, examples_per_operation=args.examples, fixtures=fixtures,
                              modes=("positive",) if args.positive_only else ("positive", "negative"),
                              min_requests=args.min_requests, seed=args.seed, progress=lambda line: print(f"fuzz: {line}", flush=True))
            finally:
                print(f"fuzz: cancelled {cancel_leftovers(client)} queued jobs", flush=True)
    print(report.summary())
    if args.verbose:
        for (operation, status), count in sorted(report.by_operation_status.items()):
            print(f"  {operation:<55} {status}: {count}")
    for operation, why in sorted(report.not_generated.items()):
        print(f"  not generated: {operation}: {why}")
    return 1 if report.failures else 0


if __name__ == "__main__":
    sys.exit(main())
