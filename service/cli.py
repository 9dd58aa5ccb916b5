"""The ``mcdrop`` command line: migrate, serve, worker, and ``up`` (all of it, supervised);
``keys`` (admin, on the database); and the API commands (``datasets``, ``runs``, ``predict``,
``models``) that talk to a running server through the Python client, service/client.py."""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from service.config import Settings, get_settings

if TYPE_CHECKING:
    from service.client import McdropClient
    from service.datasets.schemas import DatasetRead
    from service.registry.schemas import RegisteredModelRead
    from service.runs.schemas import PredictResponse, RunRead

app = typer.Typer(help="mcdrop: dropout networks trained by workers, served with MC dropout.", no_args_is_help=True)

log = logging.getLogger("mcdrop")


def _configure_logging(level: str) -> None:
    """Root logger to stderr, as text or JSON lines (MCDROP_LOG_FORMAT), with request/run ids."""
    from service.observability.logging import configure_logging

    configure_logging(level, get_settings().log_format)


keys_app = typer.Typer(help="API keys (admin: talks to the database directly).", no_args_is_help=True)
app.add_typer(keys_app, name="keys")


@keys_app.command("create")
def keys_create(
    tenant: Annotated[str, typer.Option(help="the tenant the key belongs to (created on first use)")],
    name: Annotated[str, typer.Option(help="a label to tell keys apart")] = "key",
) -> None:
    """Create an API key and print it (the only time it is shown; it is stored hashed)."""
    from service.auth import service as auth
    from service.db import get_sessionmaker
    from service.errors import DomainError
    from service.migrate import upgrade

    settings = get_settings()
    upgrade(settings.sqlalchemy_url)
    with get_sessionmaker(settings.sqlalchemy_url)() as session:
        try:
            created = auth.create_key(session, tenant, name)
        except DomainError as exc:
            raise typer.BadParameter(exc.detail, param_hint="--tenant") from None
    typer.echo(f"created key {created.id} ({created.prefix}...) for tenant {created.tenant_id}; "
               "send it as `Authorization: Bearer <key>`. It is not shown again:", err=True)
    typer.echo(created.key)


@keys_app.command("list")
def keys_list(tenant: Annotated[str | None, typer.Option(help="only this tenant's keys")] = None) -> None:
    """List keys (never their secrets)."""
    from service.auth import service as auth
    from service.db import get_sessionmaker

    settings = get_settings()
    with get_sessionmaker(settings.sqlalchemy_url)() as session:
        for key in auth.list_keys(session, tenant):
            state = f"revoked {key.revoked_at:%Y-%m-%d %H:%M}" if key.revoked_at else "active"
            typer.echo(f"{key.id}  {key.tenant_id:<20} {key.prefix}...  {key.name:<20} {state}")


@keys_app.command("revoke")
def keys_revoke(key_id: Annotated[str, typer.Argument(help="the key's id (from `mcdrop keys list`)")]) -> None:
    """Revoke a key."""
    import uuid

    from service.auth import service as auth
    from service.db import get_sessionmaker
    from service.errors import DomainError

    settings = get_settings()
    try:
        identifier = uuid.UUID(key_id)
    except ValueError:
        raise typer.BadParameter("not a key id", param_hint="KEY_ID") from None
    with get_sessionmaker(settings.sqlalchemy_url)() as session:
        try:
            auth.revoke_key(session, identifier)
        except DomainError as exc:
            raise typer.BadParameter(exc.detail, param_hint="KEY_ID") from None
    typer.echo(f"revoked {identifier}")


@app.command()
def migrate() -> None:
    """Apply database migrations (waits for the database first)."""
    from service.migrate import upgrade

    settings = get_settings()
    _configure_logging(settings.log_level)
    upgrade(settings.sqlalchemy_url)


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="default: MCDROP_HOST")] = None,
    port: Annotated[int | None, typer.Option(help="default: MCDROP_PORT")] = None,
) -> None:
    """Run the HTTP API (uvicorn)."""
    settings = get_settings()
    _configure_logging(settings.log_level)
    _run_api(settings, host or settings.host, port or settings.port)


def _run_api(settings: Settings, host: str, port: int) -> None:
    """Serve until SIGINT/SIGTERM, then return (uvicorn would re-raise the signal instead,
    which kills the process before ``up`` can stop its worker)."""
    import uvicorn

    from service.api.app import create_app

    settings = settings.model_copy(update={"host": host, "port": port})
    refusal = settings.auth_problem()
    if refusal is not None:
        raise typer.BadParameter(refusal)

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

    config = uvicorn.Config(
        create_app(settings), host=host, port=port, log_level=settings.log_level,
        access_log=False, timeout_graceful_shutdown=10,
        log_config=None,  # uvicorn's loggers propagate to ours (_configure_logging): one format
    )
    Server(config).run()


def default_queues() -> list[str]:
    import torch

    from service.queue import CPU_QUEUE, CUDA_QUEUE

    settings = get_settings()
    if settings.device != "cpu" and torch.cuda.is_available():
        return [CUDA_QUEUE, CPU_QUEUE]
    return [CPU_QUEUE]


@app.command()
def worker(
    queues: Annotated[str | None, typer.Option(help="comma-separated; default cpu, plus cuda when a GPU is present")] = None,
    concurrency: Annotated[int | None, typer.Option(help="processes (prefork); default MCDROP_WORKER_CONCURRENCY")] = None,
    name: Annotated[str | None, typer.Option(help="Celery node name")] = None,
) -> None:
    """Run a Celery worker that trains runs."""
    settings = get_settings()
    _configure_logging(settings.log_level)
    import torch

    from service.tuning import tune_allocator, usable_cores, worker_torch_threads

    processes = concurrency or settings.worker_concurrency
    cores = usable_cores()
    threads = worker_torch_threads(settings.worker_torch_threads, processes, cores, beside_api=settings.worker_beside_api)
    torch.set_num_threads(threads)  # inherited by prefork children
    log.info("worker: %d process%s, %d torch thread%s each (%d usable cores%s)", processes, "" if processes == 1 else "es",
             threads, "" if threads == 1 else "s", cores, ", beside the API" if settings.worker_beside_api else "")
    tune_allocator()
    from service.queue import CUDA_QUEUE
    from workers.celery_app import app as celery_app
    from workers.runners import warm_up

    consumed = (queues or ",".join(default_queues())).split(",")
    # One-time costs (torch._dynamo's import, first ops) before the first run, not in it. A GPU
    # worker that trains in its own process (solo pool) also creates its CUDA context and loads
    # the kernels here (seconds); prefork children cannot inherit a CUDA context, so they pay it
    # in their first CUDA run.
    warm_up()
    if processes == 1 and CUDA_QUEUE in consumed and torch.cuda.is_available():
        warm_up("cuda")
    argv = [
        *(["--quiet"] if settings.log_format == "json" else []),  # no banner: the output stays JSON lines
        "worker",
        f"--queues={','.join(consumed)}",
        f"--loglevel={settings.log_level.upper()}",
        "--without-gossip",
        "--without-mingle",
        f"--hostname={name or f'mcdrop-{os.getpid()}@%h'}",
    ]
    # One process trains in the worker itself (solo pool): a kill of the worker stops training
    # at once and leaves nothing behind; more processes use the prefork pool.
    argv += ["--pool=solo"] if processes == 1 else ["--pool=prefork", f"--concurrency={processes}"]
    celery_app.worker_main(argv)


@app.command()
def watch(
    run_id: Annotated[str, typer.Argument(help="the run to follow")],
    url: Annotated[str, typer.Option(help="API base URL", envvar="MCDROP_URL")] = "http://127.0.0.1:8000",
    api_key: Annotated[str | None, typer.Option(help="API key", envvar="MCDROP_API_KEY", show_default=False)] = None,
) -> None:
    """Follow a run live (Server-Sent Events): a progress bar until it ends. Exit 0 if it succeeded."""
    from service.watch import WatchError
    from service.watch import watch as follow

    try:
        status = follow(url.rstrip("/"), run_id, headers={"Authorization": f"Bearer {api_key}"} if api_key else None)
    except WatchError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(1) from None
    raise typer.Exit(0 if status == "succeeded" else 1)


# -- API commands: talk to a running server through the Python client (service/client.py) ----------
# Each takes --url (MCDROP_URL) and --api-key (MCDROP_API_KEY), prints JSON (or --table), and
# exits 1 with the problem detail when the API refuses.

UrlOption = Annotated[str, typer.Option("--url", help="API base URL", envvar="MCDROP_URL")]
ApiKeyOption = Annotated[str | None, typer.Option("--api-key", help="API key", envvar="MCDROP_API_KEY", show_default=False)]
TableOption = Annotated[bool, typer.Option("--table", help="a compact table instead of JSON")]
IdempotencyOption = Annotated[str | None, typer.Option(help="retry-safe creation: the same key and body give the same object")]
DEFAULT_API_URL = "http://127.0.0.1:8000"

datasets_app = typer.Typer(help="Datasets (built-in or CSV uploads) on a running server.", no_args_is_help=True)
runs_app = typer.Typer(help="Training runs on a running server.", no_args_is_help=True)
models_app = typer.Typer(help="The model registry on a running server: versions and aliases.", no_args_is_help=True)
app.add_typer(datasets_app, name="datasets")
app.add_typer(runs_app, name="runs")
app.add_typer(models_app, name="models")

DATASET_COLUMNS = ("id", "name", "task", "n_rows", "n_features", "n_classes", "created_at")
RUN_COLUMNS = ("id", "status", "task", "epochs", "validation", "device", "created_at")


@contextlib.contextmanager
def _api(url: str, api_key: str | None) -> Iterator[McdropClient]:
    """A client for the command; API and connection errors end it with exit status 1."""
    from service.client import McdropClient, McdropError

    try:
        with McdropClient(url, api_key) as client:
            yield client
    except McdropError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None


def _jsonable(value: object) -> object:
    from pydantic import BaseModel

    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, (list, tuple)):
        return [_jsonable(item) for item in value]
    return value


def _emit(value: object, table: bool = False, rows: list[dict[str, object]] | None = None) -> None:
    """Print ``value`` as JSON, or ``rows`` as a table with --table."""
    import json

    if table and rows is not None:
        typer.echo(_table(rows))
    else:
        typer.echo(json.dumps(_jsonable(value), indent=2))


def _table(rows: list[dict[str, object]]) -> str:
    if not rows:
        return "(none)"

    def text(value: object) -> str:
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:.4g}"
        if hasattr(value, "strftime"):
            return value.strftime("%Y-%m-%d %H:%M:%S")  # type: ignore[union-attr]
        return str(value)

    columns = list(rows[0])
    cells = [[text(row.get(column)) for column in columns] for row in rows]
    widths = [max(len(column), *(len(line[i]) for line in cells)) for i, column in enumerate(columns)]
    lines = ["  ".join(column.ljust(width) for column, width in zip(columns, widths)).rstrip()]
    lines += ["  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in cells]
    return "\n".join(lines)


def _dataset_row(dataset: DatasetRead) -> dict[str, object]:
    return {column: getattr(dataset, column) for column in DATASET_COLUMNS}


def _run_row(run: RunRead) -> dict[str, object]:
    metrics = run.latest_metrics
    validation = None
    if metrics is not None:
        validation = next(
            (f"{name} {value:.4g}" for name in ("val_accuracy", "val_rmse", "val_loss")
             if (value := getattr(metrics, name)) is not None), None,
        )
    return {"id": run.id, "status": run.status, "task": run.task, "epochs": f"{run.epochs_done}/{run.epochs_total}",
            "validation": validation, "device": run.device, "created_at": run.created_at}


def _numbers(text: str, kind: type, option: str) -> list:
    try:
        return [kind(part) for part in text.replace(" ", "").split(",") if part]
    except ValueError:
        raise typer.BadParameter(f"expected comma-separated numbers, got {text!r}", param_hint=option) from None


def _read_json(source: str, option: str) -> object:
    """JSON from a file path, '-' (standard input) or, for a value starting with [ or {, the text itself."""
    import json

    try:
        if source.lstrip().startswith(("[", "{")):
            text = source
        elif source == "-":
            text = sys.stdin.read()
        else:
            text = Path(source).read_text()
        return json.loads(text)
    except OSError as exc:
        raise typer.BadParameter(f"cannot read {source}: {exc.strerror}", param_hint=option) from None
    except ValueError as exc:
        raise typer.BadParameter(f"not valid JSON: {exc}", param_hint=option) from None


@datasets_app.command("add")
def datasets_add(
    name: Annotated[str, typer.Argument(help="the dataset's name")],
    builtin: Annotated[str | None, typer.Option(help="digits, iris, wine, breast_cancer or diabetes")] = None,
    csv: Annotated[Path | None, typer.Option(help="a CSV file with a header row", exists=True, dir_okay=False)] = None,
    target: Annotated[str | None, typer.Option(help="CSV: the target column")] = None,
    task: Annotated[str | None, typer.Option(help="CSV: classification or regression")] = None,
    idempotency_key: IdempotencyOption = None,
    url: UrlOption = DEFAULT_API_URL, api_key: ApiKeyOption = None, table: TableOption = False,
) -> None:
    """Add a dataset: a built-in one (--builtin digits) or a CSV upload (--csv F --target T --task K)."""
    if (builtin is None) == (csv is None):
        raise typer.BadParameter("give either --builtin or --csv")
    if csv is not None and (target is None or task is None):
        raise typer.BadParameter("a CSV upload needs --target and --task")
    with _api(url, api_key) as client:
        if builtin is not None:
            dataset = client.create_dataset(name, builtin, idempotency_key=idempotency_key)
        else:
            dataset = client.upload_dataset(name, csv, target=target, task=task,  # type: ignore[arg-type]
                                            idempotency_key=idempotency_key)
    _emit(dataset, table, [_dataset_row(dataset)])


@datasets_app.command("list")
def datasets_list(
    task: Annotated[str | None, typer.Option(help="only classification or regression datasets")] = None,
    limit: Annotated[int, typer.Option(help="items per page")] = 50,
    cursor: Annotated[str | None, typer.Option(help="next_cursor of a previous page")] = None,
    all_pages: Annotated[bool, typer.Option("--all", help="follow the cursor through every page")] = False,
    url: UrlOption = DEFAULT_API_URL, api_key: ApiKeyOption = None, table: TableOption = False,
) -> None:
    """The caller's datasets, newest first: one page (with next_cursor), or --all."""
    with _api(url, api_key) as client:
        if all_pages:
            items, next_cursor = list(client.iter_datasets(page_size=limit, task=task)), None
        else:
            page = client.list_datasets(task=task, limit=limit, cursor=cursor)
            items, next_cursor = page.items, page.next_cursor
    _emit({"items": _jsonable(items), "next_cursor": next_cursor}, table, [_dataset_row(d) for d in items])


@datasets_app.command("show")
def datasets_show(
    dataset_id: Annotated[str, typer.Argument(help="the dataset's id")],
    url: UrlOption = DEFAULT_API_URL, api_key: ApiKeyOption = None, table: TableOption = False,
) -> None:
    """One dataset."""
    with _api(url, api_key) as client:
        dataset = client.get_dataset(dataset_id)
    _emit(dataset, table, [_dataset_row(dataset)])


@runs_app.command("submit")
def runs_submit(
    dataset_id: Annotated[str | None, typer.Argument(help="the dataset to train on (or dataset_id in --spec)")] = None,
    spec: Annotated[str | None, typer.Option(help="a run spec as JSON: a file, '-' for stdin, or the JSON itself; "
                                                  "the options below override its fields")] = None,
    layers: Annotated[str | None, typer.Option(help="hidden layer sizes, e.g. 64,64")] = None,
    dropout: Annotated[str | None, typer.Option(help="dropout rate, or one per hidden layer: 0.5 or 0.5,0.3")] = None,
    input_dropout: Annotated[float | None, typer.Option(help="dropout rate on the inputs")] = None,
    activation: Annotated[str | None, typer.Option(help="relu, tanh or gelu")] = None,
    tau: Annotated[float | None, typer.Option(help="regression: model precision")] = None,
    epochs: Annotated[int | None, typer.Option()] = None,
    batch_size: Annotated[int | None, typer.Option()] = None,
    optimizer: Annotated[str | None, typer.Option(help="adam or sgd")] = None,
    learning_rate: Annotated[float | None, typer.Option()] = None,
    weight_decay: Annotated[float | None, typer.Option()] = None,
    validation_fraction: Annotated[float | None, typer.Option()] = None,
    seed: Annotated[int | None, typer.Option(help="default: the service picks one and records it")] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu or cuda")] = None,
    priority: Annotated[int | None, typer.Option(help="0..9, higher first")] = None,
    callback_url: Annotated[str | None, typer.Option(help="receives a signed POST on every terminal state")] = None,
    idempotency_key: IdempotencyOption = None,
    wait: Annotated[bool, typer.Option("--wait", help="wait until the run ends; exit 1 unless it succeeded")] = False,
    url: UrlOption = DEFAULT_API_URL, api_key: ApiKeyOption = None, table: TableOption = False,
) -> None:
    """Queue a training run (prints the run; --wait to wait for its end)."""
    body = _read_json(spec, "--spec") if spec is not None else {}
    if not isinstance(body, dict):
        raise typer.BadParameter("the spec must be a JSON object", param_hint="--spec")
    if dataset_id is not None:
        body["dataset_id"] = dataset_id
    if "dataset_id" not in body:
        raise typer.BadParameter("give the dataset id (argument, or dataset_id in --spec)")
    model = {
        "hidden_layers": _numbers(layers, int, "--layers") if layers is not None else None,
        "dropout": (rates if len(rates := _numbers(dropout, float, "--dropout")) != 1 else rates[0])
        if dropout is not None else None,
        "input_dropout": input_dropout, "activation": activation, "tau": tau,
    }
    training = {
        "epochs": epochs, "batch_size": batch_size, "optimizer": optimizer, "learning_rate": learning_rate,
        "weight_decay": weight_decay, "validation_fraction": validation_fraction, "seed": seed,
    }
    for section, values in (("model", model), ("training", training)):
        given = {k: v for k, v in values.items() if v is not None}
        if given:
            if not isinstance(body.get(section, {}), dict):
                raise typer.BadParameter(f"{section} in the spec must be an object", param_hint="--spec")
            body[section] = {**body.get(section, {}), **given}
    body.update({k: v for k, v in (("device", device), ("priority", priority), ("callback_url", callback_url))
                 if v is not None})
    with _api(url, api_key) as client:
        run = client.create_run(body, idempotency_key=idempotency_key)
        if wait:
            run = client.wait_for_run(run.id, timeout=float("inf"))
    _emit(run, table, [_run_row(run)])
    if wait and run.status != "succeeded":
        raise typer.Exit(1)


@runs_app.command("list")
def runs_list(
    status: Annotated[str | None, typer.Option(help="queued, running, succeeded, failed or cancelled")] = None,
    dataset: Annotated[str | None, typer.Option(help="only runs on this dataset id")] = None,
    limit: Annotated[int, typer.Option(help="items per page")] = 50,
    cursor: Annotated[str | None, typer.Option(help="next_cursor of a previous page")] = None,
    all_pages: Annotated[bool, typer.Option("--all", help="follow the cursor through every page")] = False,
    url: UrlOption = DEFAULT_API_URL, api_key: ApiKeyOption = None, table: TableOption = False,
) -> None:
    """The caller's runs, newest first: one page (with next_cursor), or --all."""
    with _api(url, api_key) as client:
        if all_pages:
            items, next_cursor = list(client.iter_runs(page_size=limit, status=status, dataset_id=dataset)), None
        else:
            page = client.list_runs(status=status, dataset_id=dataset, limit=limit, cursor=cursor)
            items, next_cursor = page.items, page.next_cursor
    _emit({"items": _jsonable(items), "next_cursor": next_cursor}, table, [_run_row(r) for r in items])


@runs_app.command("show")
def runs_show(
    run_id: Annotated[str, typer.Argument(help="the run's id")],
    url: UrlOption = DEFAULT_API_URL, api_key: ApiKeyOption = None, table: TableOption = False,
) -> None:
    """One run: status, progress, latest metrics, spec."""
    with _api(url, api_key) as client:
        run = client.get_run(run_id)
    _emit(run, table, [_run_row(run)])


@runs_app.command("cancel")
def runs_cancel(
    run_id: Annotated[str, typer.Argument(help="the run's id")],
    url: UrlOption = DEFAULT_API_URL, api_key: ApiKeyOption = None, table: TableOption = False,
) -> None:
    """Cancel a run: a queued one at once, a running one at its next batch."""
    with _api(url, api_key) as client:
        run = client.cancel_run(run_id)
    _emit(run, table, [_run_row(run)])


@runs_app.command("metrics")
def runs_metrics(
    run_id: Annotated[str, typer.Argument(help="the run's id")],
    url: UrlOption = DEFAULT_API_URL, api_key: ApiKeyOption = None, table: TableOption = False,
) -> None:
    """A run's per-epoch training history."""
    with _api(url, api_key) as client:
        metrics = client.get_run_metrics(run_id)
    _emit(metrics, table, [item.model_dump() for item in metrics.items])


@runs_app.command("evaluation")
def runs_evaluation(
    run_id: Annotated[str, typer.Argument(help="the run's id")],
    url: UrlOption = DEFAULT_API_URL, api_key: ApiKeyOption = None,
) -> None:
    """A finished run's held-out evaluation (MC dropout beside the deterministic net), as JSON."""
    with _api(url, api_key) as client:
        evaluation = client.get_run_evaluation(run_id)
    _emit(evaluation)


def _read_inputs(inputs: str | None, csv: Path | None) -> list[list[float]]:
    """Input rows from JSON (one row, or a list of rows) or a CSV file of numbers (a header row is skipped)."""
    if (inputs is None) == (csv is None):
        raise typer.BadParameter("give either --inputs or --csv")
    if inputs is not None:
        value = _read_json(inputs, "--inputs")
        rows = [value] if isinstance(value, list) and value and not isinstance(value[0], list) else value
        if not isinstance(rows, list) or not all(isinstance(row, list) for row in rows):
            raise typer.BadParameter("expected a row [x1, x2, ...] or a list of rows", param_hint="--inputs")
        return rows  # the API validates the numbers and says which one is wrong
    import csv as csv_module

    try:
        with Path(csv).open(newline="") as handle:  # type: ignore[arg-type]
            lines = [line for line in csv_module.reader(handle) if any(cell.strip() for cell in line)]
    except OSError as exc:
        raise typer.BadParameter(f"cannot read {csv}: {exc.strerror}", param_hint="--csv") from None
    rows = []
    for number, line in enumerate(lines, start=1):
        try:
            rows.append([float(cell) for cell in line])
        except ValueError:
            if number == 1:
                continue  # a header row
            raise typer.BadParameter(f"line {number} has a value that is not a number", param_hint="--csv") from None
    if not rows:
        raise typer.BadParameter("the CSV has no rows of numbers", param_hint="--csv")
    return rows


def _prediction_rows(response: PredictResponse) -> list[dict[str, object]]:
    rows: list[dict[str, object]] = []
    for index, item in enumerate(response.predictions):
        if hasattr(item, "label"):
            rows.append({"row": index, "label": item.label, "probability": max(item.probabilities),
                         "predictive_entropy": item.predictive_entropy, "expected_entropy": item.expected_entropy,
                         "mutual_information": item.mutual_information})
        else:
            rows.append({"row": index, "mean": item.mean, "std": item.std, "lower_95": item.interval_95.lower,
                         "upper_95": item.interval_95.upper})
    return rows


@app.command()
def predict(
    run_id: Annotated[str | None, typer.Argument(help="the trained run (or --model)")] = None,
    model: Annotated[str | None, typer.Option(help="a registered model's name, instead of a run id")] = None,
    alias: Annotated[str | None, typer.Option(help="with --model: the alias to serve (default production)")] = None,
    version: Annotated[int | None, typer.Option(help="with --model: the version to serve, instead of an alias")] = None,
    inputs: Annotated[str | None, typer.Option(help="JSON rows: the text itself, a file, or '-' for stdin")] = None,
    csv: Annotated[Path | None, typer.Option(help="a CSV file of input rows (numbers; a header row is skipped)",
                                             exists=True, dir_okay=False)] = None,
    samples: Annotated[int, typer.Option(help="T, the stochastic forward passes per row")] = 100,
    seed: Annotated[int | None, typer.Option(help="same seed, same answer")] = None,
    url: UrlOption = DEFAULT_API_URL, api_key: ApiKeyOption = None, table: TableOption = False,
) -> None:
    """Predict with Monte Carlo dropout, by run id or by --model (at --alias or --version):
    mean probabilities and uncertainties, or mean and interval."""
    if (run_id is None) == (model is None):
        raise typer.BadParameter("give either a run id or --model")
    if model is None and (alias is not None or version is not None):
        raise typer.BadParameter("--alias and --version go with --model")
    rows = _read_inputs(inputs, csv)
    with _api(url, api_key) as client:
        if model is not None:
            response = client.predict_model(model, rows, alias=alias, version=version, samples=samples, seed=seed)
        else:
            response = client.predict(run_id, rows, samples=samples, seed=seed)  # type: ignore[arg-type]
    _emit(response, table, _prediction_rows(response))


def _model_row(model: RegisteredModelRead) -> dict[str, object]:
    aliases = ", ".join(f"{a.alias}->{a.version if a.version is not None else '-'}" for a in model.aliases)
    return {"name": model.name, "latest_version": model.latest_version, "aliases": aliases or None,
            "updated_at": model.updated_at}


@models_app.command("register")
def models_register(
    name: Annotated[str, typer.Argument(help="the model's name (created on first use)")],
    run_id: Annotated[str, typer.Argument(help="a succeeded training run")],
    url: UrlOption = DEFAULT_API_URL, api_key: ApiKeyOption = None,
) -> None:
    """Register a succeeded run as the next version of a named model."""
    with _api(url, api_key) as client:
        version = client.register_model(name, run_id)
    _emit(version)


@models_app.command("promote")
def models_promote(
    name: Annotated[str, typer.Argument(help="the registered model")],
    version: Annotated[int, typer.Argument(help="the version to point the alias at")],
    alias: Annotated[str, typer.Option(help="the alias to move (created if new)")] = "production",
    url: UrlOption = DEFAULT_API_URL, api_key: ApiKeyOption = None,
) -> None:
    """Move an alias (default production) to a version; refused (exit 1, failing conditions
    listed) when the version fails the alias's gates."""
    with _api(url, api_key) as client:
        moved = client.set_alias(name, alias, version)
    _emit(moved)


@models_app.command("list")
def models_list(
    limit: Annotated[int, typer.Option(help="items per page")] = 50,
    cursor: Annotated[str | None, typer.Option(help="next_cursor of a previous page")] = None,
    all_pages: Annotated[bool, typer.Option("--all", help="follow the cursor through every page")] = False,
    url: UrlOption = DEFAULT_API_URL, api_key: ApiKeyOption = None, table: TableOption = False,
) -> None:
    """The caller's registered models with their aliases."""
    with _api(url, api_key) as client:
        if all_pages:
            items, next_cursor = list(client.iter_models(page_size=limit)), None
        else:
            page = client.list_models(limit=limit, cursor=cursor)
            items, next_cursor = page.items, page.next_cursor
    _emit({"items": _jsonable(items), "next_cursor": next_cursor}, table, [_model_row(m) for m in items])


@models_app.command("show")
def models_show(
    name: Annotated[str, typer.Argument(help="the registered model")],
    url: UrlOption = DEFAULT_API_URL, api_key: ApiKeyOption = None, table: TableOption = False,
) -> None:
    """One registered model, with its versions."""
    with _api(url, api_key) as client:
        model = client.get_model(name)
        versions = list(client.iter_model_versions(name))
    _emit({**model.model_dump(mode="json"), "versions": _jsonable(versions)}, table,
          [{"version": v.version, "run_id": v.run_id, "aliases": ", ".join(v.aliases) or None,
            "created_at": v.created_at} for v in versions])


@app.command("worker-alive")
def worker_alive() -> None:
    """Health check for a worker container: exit 0 if a worker on this host heartbeated
    recently (answers while it trains, unlike a broker ping to a busy single-process worker)."""
    import socket
    from datetime import timedelta

    from sqlalchemy import select

    from service.db import session_scope, utcnow
    from service.jobs.models import WorkerRow

    settings = get_settings()
    cutoff = utcnow() - timedelta(seconds=3 * settings.heartbeat_interval_s + 5)
    with session_scope(settings.sqlalchemy_url) as session:
        seen = session.scalar(
            select(WorkerRow.name).where(WorkerRow.hostname == socket.gethostname(), WorkerRow.last_seen_at >= cutoff)
        )
    if seen is None:
        typer.echo("no recent heartbeat from a worker on this host", err=True)
        raise typer.Exit(1)


def _die_with_parent() -> None:
    """In a child: get SIGTERM when the parent dies, even by SIGKILL (Linux prctl)."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass
    os.setpgid(0, 0)  # its own group: a Ctrl-C reaches it once, through the parent


@app.command()
def up() -> None:
    """Migrate, then run the API and one worker until Ctrl-C or SIGTERM (``make run``)."""
    settings = get_settings()
    _configure_logging(settings.log_level)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    from service.migrate import upgrade

    upgrade(settings.sqlalchemy_url)
    mode = "embedded (SQLite + filesystem broker)" if settings.database_url is None and settings.embedded_broker else "external"
    log.info("mcdrop %s mode: database %s, broker %s", mode, _redact(settings.sqlalchemy_url), _redact(settings.celery_broker_url))
    refusal = settings.auth_problem()
    if refusal is not None:
        raise typer.BadParameter(refusal)
    if settings.auth_enabled:
        from sqlalchemy import func, select

        from service.auth.models import ApiKeyRow
        from service.db import get_sessionmaker

        with get_sessionmaker(settings.sqlalchemy_url)() as session:
            if not session.scalar(select(func.count()).select_from(ApiKeyRow)):
                log.warning("auth is on and there are no API keys yet: create one with "
                            "`.venv/bin/mcdrop keys create --tenant <name>` (or set MCDROP_AUTH=off on loopback)")

    supervisor = WorkerSupervisor().start()
    try:
        _run_api(settings, settings.host, settings.port)
    finally:
        supervisor.stop()


class WorkerSupervisor:
    """Keeps one worker process alive beside the API (``mcdrop up``): restarted if it dies
    (its run resumes from the last checkpoint once its lease runs out); stopped with SIGTERM
    (warm shutdown: the run goes back to the queue). The worker gets SIGTERM if this process
    dies, even by SIGKILL."""

    def __init__(self) -> None:
        import threading

        self.process: subprocess.Popen[bytes] | None = None
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="worker-supervisor", daemon=True)
        self._lock = threading.Lock()

    def _spawn(self) -> None:
        env = {**os.environ, "MCDROP_WORKER_BESIDE_API": "1"}  # torch threads: one core left to the API
        self.process = subprocess.Popen([sys.executable, "-m", "service.cli", "worker"], env=env,
                                        preexec_fn=_die_with_parent)

    def start(self) -> WorkerSupervisor:
        self._spawn()
        self._thread.start()
        return self

    def _watch(self) -> None:
        import time

        restarts: list[float] = []
        while not self._stopping.wait(1.0):
            with self._lock:
                if self._stopping.is_set() or self.process is None or self.process.poll() is None:
                    continue
                now = time.monotonic()
                restarts = [t for t in restarts if now - t < 60] + [now]
                if len(restarts) > 5:
                    log.error("the worker keeps dying (%d restarts in a minute); not restarting it", len(restarts) - 1)
                    return
                log.warning("the worker exited with %s; starting a new one", self.process.returncode)
                self._spawn()

    def stop(self) -> None:
        with self._lock:
            self._stopping.set()
            process = self.process
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _redact(url: str) -> str:
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url.split("@")[-1]


if __name__ == "__main__":
    app()
