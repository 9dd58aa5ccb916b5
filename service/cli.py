"""The ``mcdrop`` command line: migrate, serve, worker, and ``up`` (all of it, supervised)."""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from typing import Annotated

import typer

from service.config import Settings, get_settings

app = typer.Typer(help="mcdrop: dropout networks trained by workers, served with MC dropout.", no_args_is_help=True)

log = logging.getLogger("mcdrop")


def _configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )


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

    if settings.worker_torch_threads > 0:
        torch.set_num_threads(settings.worker_torch_threads)
    from service.tuning import tune_allocator

    tune_allocator()
    from workers.celery_app import app as celery_app

    processes = concurrency or settings.worker_concurrency
    argv = [
        "worker",
        f"--queues={queues or ','.join(default_queues())}",
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
) -> None:
    """Follow a run live (Server-Sent Events): a progress bar until it ends. Exit 0 if it succeeded."""
    from service.watch import WatchError
    from service.watch import watch as follow

    try:
        status = follow(url.rstrip("/"), run_id)
    except WatchError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(1) from None
    raise typer.Exit(0 if status == "succeeded" else 1)


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
        self.process = subprocess.Popen([sys.executable, "-m", "service.cli", "worker"], preexec_fn=_die_with_parent)

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
