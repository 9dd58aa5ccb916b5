"""Start a real mcdrop (API + worker, ``mcdrop up``) for benchmarks, and stop it afterwards."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def embedded_server(env: dict[str, str] | None = None, startup_s: float = 120) -> Iterator[str]:
    """``python -m service.cli up`` with its own data folder and port; yields the base URL.

    Extra ``env`` (e.g. MCDROP_DATABASE_URL / MCDROP_BROKER_URL) switches it to PostgreSQL and Redis.
    """
    with tempfile.TemporaryDirectory(prefix="mcdrop-bench-") as data_dir:
        port = free_port()
        environment = {k: v for k, v in os.environ.items() if not k.startswith("MCDROP_")}
        # Benchmarks measure the service, not key handling: auth is off on this loopback-only
        # embedded server (an external database or broker in ``env`` needs MCDROP_AUTH=on and a key).
        environment.update({"MCDROP_DATA_DIR": data_dir, "MCDROP_PORT": str(port), "MCDROP_LOG_LEVEL": "warning",
                            "MCDROP_AUTH": "off", **(env or {})})
        log = open(Path(data_dir) / "server.log", "wb")
        process = subprocess.Popen([sys.executable, "-m", "service.cli", "up"], env=environment, cwd=REPO,
                                   stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        base = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + startup_s
            while True:
                try:
                    if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"mcdrop up did not start:\n{(Path(data_dir) / 'server.log').read_text()[-3000:]}")
                time.sleep(0.3)
            yield base
        finally:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, signal.SIGKILL)
                    process.wait()
            log.close()


def wait_until_done(client: httpx.Client, path: str, timeout_s: float, poll_s: float = 1.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        body = client.get(path).json()
        if body["status"] in ("succeeded", "failed", "cancelled"):
            return body
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} still {body['status']} after {timeout_s:.0f} s")
        time.sleep(poll_s)
