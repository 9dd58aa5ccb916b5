"""Serving over HTTP: predict throughput and latency, micro-batching, a BentoML peer, submit → running.

Every number comes from real processes on this machine, measured in the same run:

- the API is ``python -m service.cli serve`` (embedded mode: SQLite + filesystem broker in a
  temporary MCDROP_DATA_DIR, one uvicorn process) with the README's textbook digits classifier,
  trained by a real ``python -m service.cli worker`` that is stopped before measuring;
- the HTTP ceiling is a bare FastAPI app in its own uvicorn process with the same uvicorn
  settings (one process, uvloop + httptools, no access log) that parses the same body with the
  API's own ``PredictRequest`` model and returns a constant;
- the peer is the same trained weights (exported as safetensors) served by BentoML with adaptive
  batching, from a virtual environment the benchmark makes under /tmp/mcdrop-bench/bentoml
  (``pip install bentoml torch==2.13.0 safetensors``; reused when it already works; outside
  the repository, so nothing needs ignoring and the project's .venv is never touched);
- load comes from a second process: a closed-loop asyncio HTTP/1.1 keep-alive client (uvloop)
  with a fixed number of connections, one request in flight on each, a warm-up first, then a
  fixed duration. It is a small raw-socket client rather than httpx: httpx's AsyncClient, tried
  here against the bare app at 64 connections, delivered a small fraction of the raw client's
  ~6,000 req/s, so it would have measured itself rather than the ceiling (this machine has 2
  cores, which the load generator shares with the server).

Every process started here is stopped at the end (SIGTERM to its process group, then SIGKILL),
also when something fails. Run alone: ``python -m bench.http_serving [--quick]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

from bench import machine
from bench.report import Section
from bench.server import embedded_server, free_port
from service.runs.schemas import PredictRequest

REPO = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("MCDROP_BENCH_CACHE", "/tmp/mcdrop-bench"))
PG_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
REDIS_URL = "redis://127.0.0.1:6379"
SAMPLES = 100
ZERO = [0, 0, 5, 13, 9, 1, 0, 0, 0, 0, 13, 15, 10, 15, 5, 0, 0, 3, 15, 2, 0, 11, 8, 0, 0, 4, 12, 0, 0, 8, 8, 0,
        0, 5, 8, 0, 0, 9, 8, 0, 0, 4, 11, 0, 1, 12, 7, 0, 0, 2, 14, 5, 10, 12, 0, 0, 0, 0, 6, 13, 10, 0, 0, 0]
TEXTBOOK_RUN = {
    "model": {"hidden_layers": [64, 64], "dropout": 0.5},
    "training": {"epochs": 10, "batch_size": 32, "optimizer": "adam", "learning_rate": 0.001,
                 "weight_decay": 0, "l1": 0, "validation_fraction": 0.2, "seed": 0},
}


# -- processes ---------------------------------------------------------------------------
class Process:
    """A child in its own process group, output to a log file; stop() ends the whole group."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], log_dir: Path, cwd: Path = REPO) -> None:
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self._log = self.log_path.open("wb")
        self.popen = subprocess.Popen(args, env=env, cwd=cwd, stdout=self._log, stderr=subprocess.STDOUT,
                                      start_new_session=True)

    def output(self, tail: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-tail:]
        except OSError:
            return ""

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, timeout: float = 20) -> None:
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                pass
        with contextlib.suppress(ProcessLookupError):  # stragglers of the group (workers, children)
            os.killpg(self.popen.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=5)
        self._log.close()

    def wait_for_output(self, text: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.output(tail=10**6):
            if not self.alive():
                raise RuntimeError(f"{self.name} exited ({self.popen.returncode}):\n{self.output()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name}: {text!r} not seen in {timeout:.0f} s:\n{self.output()}")
            time.sleep(0.2)


def _wait_http(process: Process, url: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(url, timeout=2).status_code == 200:
                return
        if not process.alive():
            raise RuntimeError(f"{process.name} exited ({process.popen.returncode}):\n{process.output()}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{process.name} did not answer {url} in {timeout:.0f} s:\n{process.output()}")
        time.sleep(0.25)


def _mcdrop_env(data_dir: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MCDROP_")}
    # Embedded on loopback without API keys: every caller is tenant "default" (the auth check
    # still runs per request, as it does for a key found in the API's key cache).
    env.update({"MCDROP_DATA_DIR": str(data_dir), "MCDROP_LOG_LEVEL": "warning", "MCDROP_AUTH": "off",
                "PYTHONUNBUFFERED": "1", **extra})
    return env


@contextlib.contextmanager
def _terminate_on_sigterm() -> Iterator[None]:
    """A SIGTERM to the benchmark unwinds it (so its children are stopped) instead of killing it."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# -- the bare ceiling app ----------------------------------------------------------------
def bare_app():  # noqa: ANN201 - a FastAPI app, imported lazily
    """The HTTP ceiling: parses the predict body with the API's own model, answers a constant."""
    from fastapi import FastAPI

    app = FastAPI()
    answer = {"run_id": str(uuid.UUID(int=0)), "task": "classification", "samples": SAMPLES, "predictions": []}

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/v1/runs/{run_id}/predict")
    async def predict(run_id: uuid.UUID, request: PredictRequest) -> dict:
        return answer

    return app


def _serve_bare(port: int) -> None:
    import uvicorn

    from service.config import Settings
    from service.tuning import tune_garbage_collector

    # The same process settings as the API's: its garbage-collector tuning (the API's lifespan
    # applies it), and the same uvicorn.Config as service.cli._run_api (loop and http "auto":
    # uvloop, httptools).
    tune_garbage_collector(Settings.model_fields["api_gc_threshold"].default)
    config = uvicorn.Config(bare_app(), host="127.0.0.1", port=port, log_level="warning", access_log=False,
                            timeout_graceful_shutdown=10)
    uvicorn.Server(config).run()


# -- the load generator (runs in its own process) -------------------------------------------
@dataclass
class Load:
    concurrency: int
    requests: int
    errors: int
    seconds: float
    p50_ms: float
    p99_ms: float
    first_error: str | None = None
    server_cpu_us: float | None = None  # the server process's CPU time (all threads) per answered request

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds > 0 else 0.0


async def _load(url: str, body: bytes, concurrency: int, warmup_s: float, duration_s: float) -> dict:
    target = httpx.URL(url)
    host, port, path = target.host, target.port or 80, target.raw_path.decode()
    request = (f"POST {path} HTTP/1.1\r\nhost: {host}:{port}\r\ncontent-type: application/json\r\n"
               f"content-length: {len(body)}\r\n\r\n").encode() + body
    latencies: list[float] = []
    errors: list[str] = []
    start = time.perf_counter()
    measure_from, end = start + warmup_s, start + warmup_s + duration_s

    async def connection() -> None:
        reader, writer = await asyncio.open_connection(host, port)
        try:
            while (sent := time.perf_counter()) < end:
                writer.write(request)
                head = await reader.readuntil(b"\r\n\r\n")
                status = int(head[9:12])
                headers = head.decode("latin-1").lower()
                if "transfer-encoding: chunked" in headers:
                    payload = b""
                    while (size := int((await reader.readline()).strip(), 16)) > 0:
                        payload += await reader.readexactly(size + 2)
                    await reader.readline()
                else:
                    length = int(headers.split("content-length:", 1)[1].split("\r\n", 1)[0])
                    payload = await reader.readexactly(length)
                done = time.perf_counter()
                if sent >= measure_from:
                    if status == 200:
                        latencies.append(done - sent)
                    else:
                        errors.append(f"HTTP {status}: {payload[:300]!r}")
        except (OSError, asyncio.IncompleteReadError, ValueError, IndexError) as exc:
            errors.append(f"{type(exc).__name__}: {exc}")
        finally:
            writer.close()

    await asyncio.gather(*(connection() for _ in range(concurrency)))
    ordered = sorted(latencies)

    def percentile(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000 if ordered else float("nan")

    return {"concurrency": concurrency, "requests": len(latencies), "errors": len(errors),
            "seconds": duration_s, "p50_ms": percentile(0.50), "p99_ms": percentile(0.99),
            "first_error": errors[0] if errors else None}


def _cpu_seconds(root: int) -> float:
    """User + system CPU time of a process and its descendants, all threads (Linux /proc)."""
    stats: dict[int, tuple[int, int]] = {}  # pid -> (parent, clock ticks)
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # it ended meanwhile
            continue
        stats[int(stat.parent.name)] = (int(fields[1]), int(fields[11]) + int(fields[12]))  # ppid, utime + stime
    family, grew = {root}, True
    while grew:
        grew = False
        for pid, (parent, _) in stats.items():
            if parent in family and pid not in family:
                family.add(pid)
                grew = True
    return sum(stats.get(pid, (0, 0))[1] for pid in family) / os.sysconf("SC_CLK_TCK")


def _run_load_process(url: str, body: dict, concurrency: int, warmup_s: float, duration_s: float,
                      server_pid: int | None = None) -> Load:
    """The load generator in a second process (so its CPU is not the server's); with the
    server's pid, also the CPU time of it and its children per request over the measured seconds."""
    args = [sys.executable, "-m", "bench.http_serving", "--load", url, "--body", json.dumps(body),
            "--concurrency", str(concurrency), "--warmup", str(warmup_s), "--duration", str(duration_s)]
    generator = subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    cpu = None
    try:
        if server_pid is not None:
            time.sleep(warmup_s + 0.3)  # the generator's start-up is well under this
            before, started = _cpu_seconds(server_pid), time.perf_counter()
            time.sleep(max(0.1, duration_s - 0.6))
            cpu = (_cpu_seconds(server_pid) - before, time.perf_counter() - started)
        stdout, stderr = generator.communicate(timeout=warmup_s + duration_s + 60)
    finally:
        if generator.poll() is None:
            generator.kill()
            generator.wait()
    if generator.returncode != 0:
        raise RuntimeError(f"load generator failed: {stderr[-2000:]}")
    load = Load(**json.loads(stdout.strip().splitlines()[-1]))
    if cpu is not None and load.rps > 0:
        load.server_cpu_us = cpu[0] / cpu[1] / load.rps * 1e6
    return load


# -- mcdrop: train the textbook classifier, serve it ---------------------------------------
@dataclass
class Trained:
    data_dir: Path
    run_id: str


def _train_textbook(log_dir: Path, data_dir: Path, stack: contextlib.ExitStack) -> Trained:
    env = _mcdrop_env(data_dir)
    subprocess.run([sys.executable, "-m", "service.cli", "migrate"], env=env, cwd=REPO, check=True,
                   capture_output=True, timeout=120)
    port = free_port()
    api = Process("train-api", [sys.executable, "-m", "service.cli", "serve", "--port", str(port)], env, log_dir)
    stack.callback(api.stop)
    worker = Process("train-worker", [sys.executable, "-m", "service.cli", "worker"],
                     {**env, "MCDROP_LOG_LEVEL": "info"}, log_dir)
    try:
        base = f"http://127.0.0.1:{port}"
        _wait_http(api, f"{base}/healthz")
        with httpx.Client(base_url=base, timeout=60) as client:
            dataset = client.post("/v1/datasets", json={"name": "digits", "builtin": "digits"})
            dataset.raise_for_status()
            run = client.post("/v1/runs", json={"dataset_id": dataset.json()["id"], **TEXTBOOK_RUN})
            run.raise_for_status()
            run_id = run.json()["id"]
            deadline = time.monotonic() + 300
            while (status := client.get(f"/v1/runs/{run_id}").json()["status"]) not in ("succeeded", "failed"):
                if time.monotonic() > deadline or not worker.alive():
                    raise RuntimeError(f"training is {status} after 300 s:\n{worker.output()}")
                time.sleep(0.3)
            if status != "succeeded":
                raise RuntimeError(f"training failed: {client.get(f'/v1/runs/{run_id}').json()['error']}")
    finally:
        worker.stop()  # no worker while measuring predictions
        api.stop()
    return Trained(data_dir, run_id)


def _serve_mcdrop(name: str, trained: Trained, log_dir: Path, stack: contextlib.ExitStack,
                  **env: str) -> tuple[str, int]:
    port = free_port()
    process = Process(name, [sys.executable, "-m", "service.cli", "serve", "--port", str(port)],
                      _mcdrop_env(trained.data_dir, **env), log_dir)
    stack.callback(process.stop)
    base = f"http://127.0.0.1:{port}"
    _wait_http(process, f"{base}/healthz")
    answer = httpx.post(f"{base}/v1/runs/{trained.run_id}/predict", json={"inputs": [ZERO], "samples": SAMPLES},
                        timeout=60)  # loads the model
    answer.raise_for_status()
    return f"{base}/v1/runs/{trained.run_id}/predict", process.popen.pid


def _serve_bare_app(log_dir: Path, stack: contextlib.ExitStack) -> tuple[str, int]:
    port = free_port()
    process = Process("bare", [sys.executable, "-m", "bench.http_serving", "--serve-bare", str(port)],
                      _mcdrop_env(log_dir), log_dir)
    stack.callback(process.stop)
    _wait_http(process, f"http://127.0.0.1:{port}/healthz")
    return f"http://127.0.0.1:{port}/v1/runs/{uuid.UUID(int=0)}/predict", process.popen.pid


# -- BentoML -------------------------------------------------------------------------------
BENTO_SERVICE = '''\
"""The mcdrop textbook classifier served by BentoML: the same MC dropout predict (T passes as
one batched forward with the layers before the first dropout computed once), plain torch."""

import json
from pathlib import Path

import bentoml
import numpy as np
import torch
from safetensors.torch import load_file

HERE = Path(__file__).resolve().parent
SAMPLES = __SAMPLES__
ACTIVATIONS = {"relu": torch.nn.ReLU, "tanh": torch.nn.Tanh, "gelu": torch.nn.GELU}


def build(spec):
    modules = [torch.nn.Dropout(spec["input_dropout"])] if spec["input_dropout"] > 0 else []
    width = spec["n_inputs"]
    for hidden, rate in zip(spec["hidden_layers"], spec["dropout"]):
        modules += [torch.nn.Linear(width, hidden), ACTIVATIONS[spec["activation"]]()]
        if rate > 0:
            modules.append(torch.nn.Dropout(rate))
        width = hidden
    modules.append(torch.nn.Linear(width, spec["n_outputs"]))
    return torch.nn.Sequential(*modules)


@bentoml.service(workers=1)
class MCDropout:
    def __init__(self):
        torch.set_num_threads(1)  # as the mcdrop API (MCDROP_API_TORCH_THREADS=1)
        spec = json.loads((HERE / "network.json").read_text())
        scaler = json.loads((HERE / "preprocessing.json").read_text())["input_scaler"]
        self.mean = np.asarray(scaler["mean"], dtype=np.float64)
        self.std = np.asarray(scaler["std"], dtype=np.float64)
        self.net = build(spec)
        self.net.load_state_dict(load_file(str(HERE / "model.safetensors")))
        self.net.eval()
        self.modules = list(self.net)
        self.first = next(i for i, m in enumerate(self.modules) if isinstance(m, torch.nn.Dropout))

    @bentoml.api(batchable=True, batch_dim=0, max_batch_size=256, max_latency_ms=1000)
    def predict(self, inputs: np.ndarray) -> np.ndarray:
        """Per row: mean probabilities, their std, predictive entropy, expected entropy,
        mutual information, and the deterministic (dropout off) probabilities."""
        x = torch.as_tensor(((np.asarray(inputs, dtype=np.float64) - self.mean) / self.std).astype(np.float32))
        rows = x.shape[0]
        with torch.inference_mode():
            hidden = x
            for module in self.modules[: self.first]:
                hidden = module(hidden)
            hidden = hidden.unsqueeze(0).expand(SAMPLES, *hidden.shape)
            for module in self.modules[self.first:]:
                if isinstance(module, torch.nn.Dropout):
                    keep = 1.0 - module.p
                    hidden = hidden * torch.rand(hidden.shape).lt_(keep).div_(keep)
                else:
                    hidden = module(hidden.reshape(SAMPLES * rows, -1)).reshape(SAMPLES, rows, -1)
            log_probabilities = torch.log_softmax(hidden.double(), dim=-1)
            probabilities = log_probabilities.exp()
            mean = probabilities.mean(dim=0)
            predictive = -torch.xlogy(mean, mean).sum(dim=-1)
            expected = -(probabilities * log_probabilities).sum(dim=-1).mean(dim=0)
            information = (predictive - expected).clamp(min=0.0)
            deterministic = torch.softmax(self.net(x).double(), dim=-1)
            summary = torch.cat([mean, probabilities.std(dim=0, correction=0), predictive[:, None],
                                 expected[:, None], information[:, None], deterministic], dim=1)
        return summary.numpy()
'''


def _bento_python(install_timeout_s: float) -> Path:
    """The BentoML venv's python, made (or reused) under CACHE. Raises with pip's error."""
    venv = CACHE / "bentoml"
    python = venv / "bin" / "python"
    probe = [str(python), "-c", "import bentoml, torch, safetensors; print(bentoml.__version__, torch.__version__)"]
    if python.exists() and subprocess.run(probe, capture_output=True, timeout=120).returncode == 0:
        return python
    CACHE.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True, capture_output=True, timeout=120)
    # torch pinned to the version this machine holds as a local wheel (no multi-GB download).
    install = subprocess.run(
        [str(python), "-m", "pip", "install", "--timeout", "60", "--disable-pip-version-check", "-q",
         "bentoml", "torch==2.13.0", "safetensors"],
        capture_output=True, text=True, timeout=install_timeout_s,
    )
    if install.returncode != 0:
        raise RuntimeError(f"pip install bentoml failed ({install.returncode}): {install.stderr.strip()[-1500:]}")
    check = subprocess.run(probe, capture_output=True, text=True, timeout=120)
    if check.returncode != 0:
        raise RuntimeError(f"bentoml installed but does not import: {check.stderr.strip()[-1500:]}")
    return python


def _export_for_bento(trained: Trained, folder: Path) -> None:
    """The trained run's weights (safetensors bytes as stored) and its preprocessing, from the database."""
    from service.config import Settings
    from service.db import session_scope
    from service.runs import repository

    folder.mkdir(parents=True, exist_ok=True)
    settings = Settings(data_dir=trained.data_dir)
    with session_scope(settings.sqlalchemy_url) as session:
        stored = repository.weights(session, uuid.UUID(trained.run_id))
        assert stored is not None, "a succeeded run has weights"
        (folder / "model.safetensors").write_bytes(stored.weights)
        (folder / "network.json").write_text(json.dumps(stored.network))
        (folder / "preprocessing.json").write_text(json.dumps(stored.preprocessing))
    (folder / "service.py").write_text(BENTO_SERVICE.replace("__SAMPLES__", str(SAMPLES)))


def _serve_bento(python: Path, folder: Path, log_dir: Path, stack: contextlib.ExitStack) -> tuple[str, int]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MCDROP_")}
    env.update({"BENTOML_HOME": str(CACHE / "bentoml-home"), "BENTOML_DO_NOT_TRACK": "True", "PYTHONUNBUFFERED": "1"})
    bentoml = python.parent / "bentoml"
    process = Process("bentoml", [str(bentoml), "serve", "service:MCDropout", "--host", "127.0.0.1",
                                  "--port", str(port)], env, log_dir, cwd=folder)
    stack.callback(process.stop)
    _wait_http(process, f"http://127.0.0.1:{port}/readyz", timeout=180)
    url = f"http://127.0.0.1:{port}/predict"
    answer = httpx.post(url, json={"inputs": [ZERO]}, timeout=60)
    if answer.status_code != 200:
        raise RuntimeError(f"BentoML predict answered {answer.status_code}: {answer.text[:500]}")
    return url, process.popen.pid


# -- submit -> running ---------------------------------------------------------------------
def _submit_latencies(base: str, runs: int, headers: dict[str, str] | None = None) -> tuple[list[float], list[float]]:
    """(observed, server-side) seconds from POST /v1/runs to the run leaving 'queued': observed
    by polling GET every 5 ms from before the POST; server-side as started_at - created_at."""
    from datetime import datetime

    observed, server = [], []
    with httpx.Client(base_url=base, timeout=60, headers=headers) as client:
        dataset = client.post("/v1/datasets", json={"name": "iris", "builtin": "iris"}).json()
        body = {"dataset_id": dataset["id"], "model": {"hidden_layers": [16], "dropout": 0.1},
                "training": {"epochs": 2, "batch_size": 32, "seed": 0}}
        for i in range(runs + 1):  # the first one warms the worker up and is not counted
            started = time.perf_counter()
            run = client.post("/v1/runs", json=body).json()
            deadline = time.monotonic() + 120
            while (state := client.get(f"/v1/runs/{run['id']}").json())["status"] == "queued":
                if time.monotonic() > deadline:
                    raise RuntimeError(f"run {run['id']} still queued after 120 s")
                time.sleep(0.005)
            seen = time.perf_counter() - started
            while state["status"] not in ("succeeded", "failed", "cancelled"):  # one run at a time
                time.sleep(0.02)
                state = client.get(f"/v1/runs/{run['id']}").json()
            if i == 0:
                continue
            observed.append(seen)
            if state.get("started_at") and state.get("created_at"):
                server.append((datetime.fromisoformat(state["started_at"])
                               - datetime.fromisoformat(state["created_at"])).total_seconds())
    return observed, server


@contextlib.contextmanager
def _postgres_and_redis() -> Iterator[dict[str, str]]:
    """A PostgreSQL database and an empty Redis db number of our own, removed afterwards."""
    import psycopg
    import redis

    number = None
    for candidate in range(15, 0, -1):
        probe = redis.Redis.from_url(f"{REDIS_URL}/{candidate}")
        if probe.dbsize() == 0 and probe.set("mcdrop-bench-claim", "1", nx=True, ex=3600):
            number = candidate
            break
    if number is None:
        raise RuntimeError("no empty Redis database number between 1 and 15")
    name = f"mcdrop_bench_{secrets.token_hex(4)}"
    try:
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as connection:
            connection.execute(f'CREATE DATABASE "{name}"')
        try:
            base = PG_ADMIN_URL.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1)
            yield {"MCDROP_DATABASE_URL": f"{base}/{name}", "MCDROP_BROKER_URL": f"{REDIS_URL}/{number}"}
        finally:
            with psycopg.connect(PG_ADMIN_URL, autocommit=True) as connection:
                connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        redis.Redis.from_url(f"{REDIS_URL}/{number}").flushdb()


def _api_key_headers(env: dict[str, str]) -> dict[str, str] | None:
    """With an external database (auth must be on there): a new API key of tenant "bench", as
    `mcdrop keys create` makes it; embedded (bench.server turns auth off on loopback): none."""
    if "MCDROP_DATABASE_URL" not in env:
        return None
    from service.auth.service import create_key
    from service.db import session_scope

    with session_scope(env["MCDROP_DATABASE_URL"]) as session:
        return {"Authorization": f"Bearer {create_key(session, 'bench', 'bench').key}"}


def _ms_percentiles(values: list[float]) -> tuple[float, float, float]:
    ordered = sorted(values)
    p99 = ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]
    return statistics.median(ordered) * 1000, p99 * 1000, ordered[-1] * 1000


def _submit_section(runs: int) -> Section:
    rows: list[list[object]] = []
    notes: list[str] = []
    backends: list[tuple[str, contextlib.AbstractContextManager[dict[str, str]]]] = [
        ("PostgreSQL + Redis", _postgres_and_redis()),
        ("embedded (SQLite + filesystem broker)", contextlib.nullcontext({})),
    ]
    for label, backend in backends:
        try:
            with backend as env, embedded_server(env={**env, "MCDROP_AUTH": "on"} if env else None) as base:
                observed, server = _submit_latencies(base, runs, _api_key_headers(env))
            rows.append([label, len(observed), *_ms_percentiles(observed),
                         *(_ms_percentiles(server)[:2] if server else ("", ""))])
        except Exception as exc:
            rows.append([label, 0, "", "", "", "", ""])
            notes.append(f"{label}: not measured: {type(exc).__name__}: {str(exc)[:800]}")
    notes.append("A small run (iris, Dense 16, 2 epochs) is submitted, GET polls every 5 ms until it leaves "
                 "'queued', then it is waited for, so each run finds the worker idle (the worker of "
                 "`mcdrop up`, warmed up by one uncounted run). Server-side = started_at - created_at. The "
                 "embedded broker polls its folder every MCDROP_BROKER_POLLING_INTERVAL (0.1 s).")
    return Section(
        key="submit-to-running",
        title="7. Submit → running latency (an idle worker picks up a new run)",
        baseline="the same service on the embedded broker and SQLite vs Redis and PostgreSQL",
        columns=["backend", "runs", "observed p50 ms", "observed p99 ms", "observed max ms",
                 "server-side p50 ms", "server-side p99 ms"],
        rows=rows, notes=notes,
    )


# -- where a predict request's CPU goes (in one process, no sockets) -------------------------
def _breakdown(data_dir: str, run_id: str) -> dict:
    """CPU µs per request of the ASGI apps called in this process (no sockets, no uvicorn), and
    of TrainedModel.predict per row at a few batch sizes; torch with one thread, as the API.

    The app of ``mcdrop serve`` is timed with the sampling taken out: its batcher answers from a
    prediction computed once (so the figure is the HTTP-app side alone: middlewares, routing, auth,
    validation, the handler, the response); the sampling is timed on its own, per row.
    """
    import numpy as np
    import torch

    from service.api.app import create_app
    from service.config import Settings
    from service.runs import batching
    from service.tuning import tune_allocator

    torch.set_num_threads(1)
    tune_allocator()
    body = json.dumps({"inputs": [ZERO], "samples": SAMPLES}).encode()

    async def call(app, path: str) -> None:
        scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
                 "method": "POST", "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
                 "root_path": "", "headers": [(b"host", b"127.0.0.1"), (b"content-type", b"application/json"),
                                              (b"content-length", str(len(body)).encode())],
                 "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 8000), "state": {}}
        status = []

        async def receive() -> dict:
            return {"type": "http.request", "body": body, "more_body": False}

        async def send(message: dict) -> None:
            if message["type"] == "http.response.start":
                status.append(message["status"])

        await app(scope, receive, send)
        if status != [200]:
            raise RuntimeError(f"{path} answered {status}")

    async def per_request(app, path: str, count: int = 2000) -> float:
        for _ in range(200):
            await call(app, path)
        timings = []
        for _ in range(5):
            started = time.process_time()
            for _ in range(count):
                await call(app, path)
            timings.append((time.process_time() - started) / count * 1e6)
        return min(timings)  # the least disturbed of 5: other work on the machine only adds

    async def measure() -> dict:
        settings = Settings(data_dir=data_dir, auth="off", log_level="warning", reconcile_interval_s=0)
        ours = create_app(settings)
        async with ours.router.lifespan_context(ours):
            path = f"/v1/runs/{run_id}/predict"
            await call(ours, path)  # loads the model
            model = ours.state.model_cache.peek(uuid.UUID(run_id))
            canned = model.predict(np.asarray([ZERO], dtype=np.float32), SAMPLES, None)

            async def answered(self, key, model, features, samples, seed):  # noqa: ANN001, ANN202
                return [dict(row) for row in canned]

            batching.PredictBatcher.predict = answered
            result = {"bare_app_us": await per_request(bare_app(), f"/v1/runs/{uuid.UUID(int=0)}/predict"),
                      "mcdrop_app_us": await per_request(ours, path)}
            for rows in (1, 16, 32, 64):
                features = np.asarray([ZERO] * rows, dtype=np.float32)
                count = max(20, 800 // rows)
                for _ in range(5):
                    model.predict(features, SAMPLES, None)
                timings = []
                for _ in range(5):
                    started = time.process_time()
                    for _ in range(count):
                        model.predict(features, SAMPLES, None)
                    timings.append((time.process_time() - started) / count / rows * 1e6)
                result[f"predict_per_row_us_{rows}"] = min(timings)
        return result

    return asyncio.run(measure())


def _breakdown_section(trained: Trained, on: dict[int, Load], ceiling: dict[int, Load]) -> Section:
    done = subprocess.run([sys.executable, "-m", "bench.http_serving", "--breakdown", str(trained.data_dir),
                           trained.run_id], cwd=REPO, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"breakdown failed: {done.stderr[-2000:]}")
    parts = json.loads(done.stdout.strip().splitlines()[-1])
    bare_server, ours_server = _cpu(ceiling[64]), _cpu(on[64])  # "" if not measured
    rows = [
        ["bare ceiling app (FastAPI: routing, body parsing and validation, constant answer)", parts["bare_app_us"]],
        ["mcdrop app without the sampling (middlewares: request id, metrics; routing; auth; validation; handler; "
         "response)", parts["mcdrop_app_us"]],
        *[[f"MC predict (T = 100 forward, summaries, response rows) per row, batch of {rows}",
           parts[f"predict_per_row_us_{rows}"]] for rows in (1, 16, 32, 64)],
        ["bare ceiling server, all of it, at concurrency 64 (table 3)", bare_server],
        ["mcdrop server, all of it, at concurrency 64 (table 3)", ours_server],
    ]
    notes = [
        "The app rows call the ASGI apps in one process (no sockets, no uvicorn, no threads): CPU time per "
        "request, the least of 5 × 2,000 (other work on the machine only adds to it); the mcdrop app with its "
        "batcher answering from a prediction computed once, so that the row is the HTTP-app side alone. The MC "
        "predict rows time TrainedModel.predict alone (one torch thread, as the API), per row of the batch, the "
        "least of 5: the micro-batcher forms batches of ~10-30 requests at concurrency 16-64 here.",
    ]
    if isinstance(bare_server, float) and isinstance(ours_server, float):
        budget = bare_server / 0.6
        extra_app = parts["mcdrop_app_us"] - parts["bare_app_us"]
        low, high = sorted((parts["predict_per_row_us_32"], parts["predict_per_row_us_16"]))
        app_difference = (f"{extra_app:.0f} µs more than the bare app's" if extra_app >= 0
                          else f"{-extra_app:.0f} µs less than the bare app's")
        notes.append(
            f"Reading it: both servers are bound by one core at concurrency 64 (the GIL; the load generator takes "
            f"the other), so throughput goes as 1 / CPU per request, and 60 % of the ceiling allows "
            f"{budget:.0f} µs per request. The ceiling server spends {bare_server:.0f} (its app "
            f"{parts['bare_app_us']:.0f}, uvicorn and asyncio the rest), which leaves {budget - bare_server:.0f} µs "
            f"for everything mcdrop does beyond parsing the body: its app side costs {app_difference} "
            f"(auth, request-id and metrics middlewares, input checks and the response, less the FastAPI dependency "
            f"solving that its lean predict handler skips and the bare app pays), and the "
            f"MC prediction {low:.0f}-{high:.0f} µs per request at batches of 32-16 — "
            f"{extra_app + low:.0f}-{extra_app + high:.0f} µs together. The rest of the measured difference, "
            f"{ours_server - bare_server - extra_app - low:.0f} µs or less, is not broken down here: handing "
            "requests to batches and back (futures, the loop's scheduling of batches), larger responses "
            "through uvicorn, and what 64 requests in flight cost in caches.")
    return Section(
        key="http-serving-cpu",
        title="3b. Where a predict request's CPU goes (T = 100, batch 1, concurrency 64)",
        baseline="the bare ceiling app, timed the same way",
        columns=["part", "CPU µs per request"],
        rows=rows, notes=notes,
    )


# -- the benchmark ---------------------------------------------------------------------------
def run(quick: bool = False) -> list[Section]:
    duration, warmup = (3.0, 1.0) if quick else (10.0, 2.0)
    body = {"inputs": [ZERO], "samples": SAMPLES}
    with _terminate_on_sigterm(), tempfile.TemporaryDirectory(prefix="mcdrop-http-bench-") as scratch, \
            contextlib.ExitStack() as stack:
        work = Path(scratch)
        logs = work / "logs"
        logs.mkdir()
        data_dir = work / "data"
        data_dir.mkdir()

        def load(server: tuple[str, int], concurrency: int, payload: dict = body) -> Load:
            url, pid = server
            return _run_load_process(url, payload, concurrency, warmup, duration, server_pid=pid)

        load_before = machine.load_average()
        trained = _train_textbook(logs, data_dir, stack)
        bare = _serve_bare_app(logs, stack)
        batched = _serve_mcdrop("api-batching", trained, logs, stack, MCDROP_PREDICT_BATCHING="true")
        unbatched = _serve_mcdrop("api-unbatched", trained, logs, stack, MCDROP_PREDICT_BATCHING="false")

        ceiling: dict[int, Load] = {}
        on: dict[int, Load] = {}
        off: dict[int, Load] = {}
        for concurrency in (1, 16, 64):
            ceiling[concurrency] = load(bare, concurrency)
            on[concurrency] = load(batched, concurrency)
            if concurrency != 16:
                off[concurrency] = load(unbatched, concurrency)
        noise = _noise_note(duration, warmup, load_before, machine.load_average())
        sections = [_ceiling_section(ceiling, on, noise)]
        try:
            sections.append(_breakdown_section(trained, on, ceiling))
        except Exception as exc:
            sections[0].notes.append(f"The CPU breakdown could not be measured: {type(exc).__name__}: {str(exc)[:800]}")
        sections.append(_batching_section(on, off, noise))

        bento_notes: list[str] = []
        bento: dict[int, Load] = {}
        beside: dict[int, Load] = {}
        try:
            python = _bento_python(install_timeout_s=600 if quick else 1200)
            version = subprocess.run([str(python), "-c", "import bentoml; print(bentoml.__version__)"],
                                     capture_output=True, text=True, timeout=60).stdout.strip()
            folder = work / "bento-service"
            _export_for_bento(trained, folder)
            bento_server = _serve_bento(python, folder, logs, stack)
            for concurrency in (1, 16, 64):
                bento[concurrency] = load(bento_server, concurrency, {"inputs": [ZERO]})
                beside[concurrency] = load(batched, concurrency)  # re-measured beside it: same conditions
            bento_notes.append(f"BentoML {version} in {python.parent.parent} (torch 2.13.0 CPU, safetensors); "
                               "@bentoml.api(batchable=True, max_batch_size=256, max_latency_ms=1000), one "
                               "worker, torch 1 thread; its service file implements the same MC predict. "
                               "CPU µs/req counts each server process and its children (BentoML's supervisor and worker).")
        except Exception as exc:
            bento_notes.append(f"BentoML could not be measured: {type(exc).__name__}: {str(exc)[:1500]}")
        sections.append(_bento_section({**on, **beside}, bento, bento_notes + [noise]))
    sections.append(_submit_section(runs=10 if quick else 20))
    return sections


def _noise_note(duration: float, warmup: float, load_before: str, load_after: str) -> str:
    return (f"Each point: {warmup:.0f} s warm-up, then {duration:.0f} s closed loop (one request in flight per "
            "connection) from a separate load-generator process, on a 2-core machine that the load generator, "
            f"the server and other work share (load average {load_before} before, {load_after} after): "
            "throughput differences under ~20 % are noise; server CPU µs/request is the steadier figure.")


def _cpu(load: Load | None) -> object:
    return load.server_cpu_us if load is not None and load.server_cpu_us is not None else ""


def _errors(named: dict[str, dict[int, Load]]) -> list[str]:
    return [f"{name} at {concurrency}: {result.errors} errors, e.g. {result.first_error}"
            for name, loads in named.items() for concurrency, result in loads.items() if result.errors]


def _ceiling_section(ceiling: dict[int, Load], on: dict[int, Load], noise: str) -> Section:
    rows = [[c, ceiling[c].rps, ceiling[c].p50_ms, ceiling[c].p99_ms, _cpu(ceiling[c]), on[c].rps, on[c].p50_ms,
             on[c].p99_ms, _cpu(on[c]), f"{on[c].rps / ceiling[c].rps:.0%}" if ceiling[c].rps else ""]
            for c in sorted(ceiling)]
    notes = [noise, "The API: `mcdrop serve`, embedded mode (auth off on loopback: the tenant check still runs), "
             "README textbook digits classifier, T = 100, one input per request, no seed, micro-batching on (the "
             "default); with everything a request goes through in the product: the request-id and metrics "
             "middlewares, the predict route's lean handler (service.api.fast_routes: the same validation and "
             "errors as FastAPI's, without its per-request dependency solving), the MC prediction (the fused CPU "
             "engine, section 2b) and its summaries. Both servers run with the API's garbage-collector tuning "
             "(service.tuning.tune_garbage_collector, MCDROP_API_GC_THRESHOLD). Server CPU: µs of the server "
             "process's CPU time (all threads) per answered request."]
    return Section(
        key="http-serving",
        title="3. API predict throughput and latency vs the HTTP ceiling (T = 100, batch 1)",
        baseline="a bare FastAPI endpoint, same uvicorn settings, parsing the same body and returning a constant",
        columns=["concurrency", "bare req/s", "bare p50 ms", "bare p99 ms", "bare CPU µs/req", "mcdrop req/s",
                 "mcdrop p50 ms", "mcdrop p99 ms", "mcdrop CPU µs/req", "mcdrop / bare"],
        rows=rows, target=">= 60 % of the ceiling's throughput at concurrency 64",
        met=on[64].rps >= 0.6 * ceiling[64].rps,
        notes=notes + _errors({"bare": ceiling, "mcdrop": on}),
    )


def _batching_section(on: dict[int, Load], off: dict[int, Load], noise: str) -> Section:
    rows = [[c, on[c].rps, off[c].rps, on[c].p50_ms, off[c].p50_ms, on[c].p99_ms, off[c].p99_ms, _cpu(on[c]),
             _cpu(off[c])] for c in sorted(off)]
    # At 64: more throughput or a lower p99; at 1: the median no worse than noise (10 % + 0.2 ms).
    met = ((on[64].rps >= off[64].rps or on[64].p99_ms <= off[64].p99_ms)
           and on[1].p50_ms <= off[1].p50_ms * 1.1 + 0.2)
    return Section(
        key="predict-batching",
        title="4. Predict micro-batching on vs off (T = 100, batch 1, no seed)",
        baseline="the same API with MCDROP_PREDICT_BATCHING=false (each request its own forward, in the threadpool)",
        columns=["concurrency", "on req/s", "off req/s", "on p50 ms", "off p50 ms", "on p99 ms", "off p99 ms",
                 "on CPU µs/req", "off CPU µs/req"],
        rows=rows, target="at 64: throughput or p99 better with batching; at 1: p50 not worse (10 % + 0.2 ms)",
        met=met,
        notes=["Batching, scheduled on the event loop: a request that finds nothing computing and nothing "
               "queued runs at the end of the loop's current iteration, with every request for the model read in "
               "that iteration; otherwise its group waits 2 ms at most (MCDROP_PREDICT_BATCH_WAIT_MS); at most 256 "
               "rows per forward; a merged batch of at most 64 M multiply-adds (here ~70 rows) is computed on the "
               "event loop, a larger one in a compute thread. Off: each request's forward in the threadpool.", noise]
        + _errors({"on": on, "off": off}),
    )


def _bento_section(ours: dict[int, Load], bento: dict[int, Load], notes: list[str]) -> Section:
    rows: list[list[object]] = []
    for concurrency in (1, 16, 64):
        mine, peer = ours[concurrency], bento.get(concurrency)
        rows.append([concurrency, mine.rps, mine.p50_ms, mine.p99_ms, _cpu(mine),
                     peer.rps if peer else "", peer.p50_ms if peer else "", peer.p99_ms if peer else "", _cpu(peer),
                     mine.rps / peer.rps if peer and peer.rps else ""])
    peer64 = bento.get(64)
    return Section(
        key="bentoml-peer",
        title="5. mcdrop vs BentoML adaptive batching (T = 100, batch 1, textbook digits MLP)",
        baseline="the same trained weights served by BentoML with adaptive batching",
        columns=["concurrency", "mcdrop req/s", "mcdrop p50 ms", "mcdrop p99 ms", "mcdrop CPU µs/req",
                 "BentoML req/s", "BentoML p50 ms", "BentoML p99 ms", "BentoML CPU µs/req", "mcdrop / BentoML"],
        rows=rows, target="mcdrop >= 1.5x BentoML's throughput at concurrency 64",
        met=(ours[64].rps >= 1.5 * peer64.rps) if peer64 and peer64.rps else None,
        notes=notes + _errors({"mcdrop": ours, "BentoML": bento}),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 s per point and 10 submitted runs")
    parser.add_argument("--serve-bare", type=int, metavar="PORT", help=argparse.SUPPRESS)
    parser.add_argument("--load", metavar="URL", help=argparse.SUPPRESS)
    parser.add_argument("--body", help=argparse.SUPPRESS)
    parser.add_argument("--concurrency", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--warmup", type=float, default=1.0, help=argparse.SUPPRESS)
    parser.add_argument("--duration", type=float, default=3.0, help=argparse.SUPPRESS)
    parser.add_argument("--breakdown", nargs=2, metavar=("DATA_DIR", "RUN_ID"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.breakdown:
        print(json.dumps(_breakdown(*args.breakdown)))
        return
    if args.serve_bare:
        _serve_bare(args.serve_bare)
        return
    if args.load:
        try:
            from uvloop import run as run_loop
        except ImportError:
            run_loop = asyncio.run
        result = run_loop(_load(args.load, args.body.encode(), args.concurrency, args.warmup, args.duration))
        print(json.dumps(result))
        return
    for section in run(quick=args.quick):
        print(section.markdown())


if __name__ == "__main__":
    main()
