"""Shared fixtures: a PostgreSQL database and a Redis db number of the tests' own, real worker
processes, and an API client. PostgreSQL and Redis must run on 127.0.0.1 (see .ci/run)."""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
import redis
from fastapi.testclient import TestClient

from service.api.app import create_app
from service.config import Settings
from service.migrate import upgrade

# Short leases and reconciler periods so that crash-recovery tests finish in seconds.
FAST_JOBS = {
    "lease_s": 3.0, "heartbeat_interval_s": 0.5, "reconcile_interval_s": 1.0,
    "redispatch_after_s": 2.0, "transient_retry_s": 60.0, "webhook_backoff_s": 0.5,
}

PG_ADMIN_URL = os.environ.get("MCDROP_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("MCDROP_TEST_REDIS", "redis://127.0.0.1:6379")
REPO = Path(__file__).resolve().parents[1]


def _pg_url(database: str) -> str:
    base = PG_ADMIN_URL.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1)
    return f"{base}/{database}"


def create_database() -> str:
    name = f"mcdrop_test_{secrets.token_hex(4)}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as connection:
        connection.execute(f'CREATE DATABASE "{name}"')
    return name


def drop_database(name: str) -> None:
    from service.db import get_engine

    get_engine.cache_clear()
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as connection:
        connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A fresh, migrated PostgreSQL database for this test session, dropped at the end."""
    try:
        name = create_database()
    except psycopg.OperationalError as exc:
        pytest.fail(f"PostgreSQL is not reachable at {PG_ADMIN_URL}: {exc} (start it as .ci/run does)")
    url = _pg_url(name)
    upgrade(url)
    yield url
    drop_database(name)


def _free_redis_db(client: redis.Redis) -> int:
    for number in list(range(15, 0, -1)):
        probe = redis.Redis.from_url(f"{REDIS_URL}/{number}")
        if probe.dbsize() == 0 and probe.set("mcdrop-test-claim", "1", nx=True, ex=3600):
            return number
    raise RuntimeError("no empty Redis database number between 1 and 15")


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """An empty Redis database number of our own, flushed at the end."""
    client = redis.Redis.from_url(REDIS_URL)
    try:
        client.ping()
    except redis.ConnectionError as exc:
        pytest.fail(f"Redis is not reachable at {REDIS_URL}: {exc} (start it as .ci/run does)")
    number = _free_redis_db(client)
    url = f"{REDIS_URL}/{number}"
    yield url
    redis.Redis.from_url(url).flushdb()


@pytest.fixture(scope="session")
def settings(postgres_url: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    return Settings(
        database_url=postgres_url,
        broker_url=redis_url,
        data_dir=tmp_path_factory.mktemp("data"),
        max_predict_inputs=64,
        **FAST_JOBS,
    )


def make_key(settings: Settings, tenant: str = "default") -> str:
    """A new API key of ``tenant`` on the settings' database."""
    from service.auth.service import create_key
    from service.db import get_sessionmaker

    with get_sessionmaker(settings.sqlalchemy_url)() as session:
        return create_key(session, tenant, "tests").key


@pytest.fixture(scope="session")
def api_key(settings: Settings) -> str:
    """A key of tenant "default": the tenant every test client acts as unless it says otherwise."""
    return make_key(settings)


@pytest.fixture(scope="session")
def auth_headers(api_key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"}


@pytest.fixture(scope="session")
def client(settings: Settings, auth_headers: dict[str, str]) -> Iterator[TestClient]:
    with TestClient(create_app(settings), headers=auth_headers) as test_client:
        yield test_client


def settings_env(settings: Settings) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MCDROP_")}
    env.update({
        "MCDROP_DATA_DIR": str(settings.data_dir),
        "MCDROP_LOG_LEVEL": "info",
        "MCDROP_AUTH": settings.auth,
        "PYTHONUNBUFFERED": "1",
        # the API (this process's TestClient) runs on the same cores, as under `mcdrop up`
        "MCDROP_WORKER_BESIDE_API": "1",
    })
    for name in FAST_JOBS:
        env[f"MCDROP_{name.upper()}"] = str(getattr(settings, name))
    if settings.database_url:
        env["MCDROP_DATABASE_URL"] = settings.database_url
    if settings.broker_url:
        env["MCDROP_BROKER_URL"] = settings.broker_url
    return env


class Process:
    """A child process whose output goes to a log file; stopped (and reaped) on exit."""

    def __init__(self, args: list[str], env: dict[str, str], log_path: Path) -> None:
        self.log_path = log_path
        self._log = log_path.open("wb")
        self.popen = subprocess.Popen(
            args, env=env, cwd=REPO, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True
        )

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for_output(self, text: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.output():
            if self.popen.poll() is not None:
                raise AssertionError(f"process exited ({self.popen.returncode}):\n{self.output()[-4000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{text!r} not seen within {timeout}s:\n{self.output()[-4000:]}")
            time.sleep(0.1)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.popen.poll() is None:
            self.popen.send_signal(sig)
            try:
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait()
        self._log.close()
        return self.popen.returncode


def wait_until_ready(base: str, process: Process, timeout: float = 90) -> None:
    """Polls ``base``/readyz until it answers 200; fails with the process's log if it exits or times out."""
    import httpx

    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if process.popen.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"{base} did not become ready:\n{process.output()[-4000:]}")
        time.sleep(0.2)


def start_worker(settings: Settings, log_path: Path) -> Process:
    worker = Process([sys.executable, "-m", "service.cli", "worker"], settings_env(settings), log_path)
    worker.wait_for_output(" ready.", timeout=90)
    return worker


@pytest.fixture
def worker(settings: Settings, tmp_path: Path) -> Iterator[Process]:
    """A real Celery worker process on the session's PostgreSQL and Redis."""
    process = start_worker(settings, tmp_path / "worker.log")
    yield process
    process.stop()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_run(client: TestClient | object, run_id: str, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        body = client.get(f"/v1/runs/{run_id}").json()  # type: ignore[attr-defined]
        if body["status"] in ("succeeded", "failed"):
            return body
        if time.monotonic() > deadline:
            raise AssertionError(f"run {run_id} still {body['status']} after {timeout}s: {body}")
        time.sleep(0.2)
