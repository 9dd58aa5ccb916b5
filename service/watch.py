"""Follow a run from the command line: read its Server-Sent Events and draw a progress bar.

A dropped connection (server restart, database outage, network) is resumed with
``Last-Event-ID``, so no event is shown twice or missed; retries back off and are bounded.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

TERMINAL_STATUSES = frozenset({"succeeded", "failed", "cancelled"})
# Validation metric shown beside the bar, the first one present (classification, regression).
SHOWN_METRICS = ("val_accuracy", "val_rmse", "val_loss")


class WatchError(RuntimeError):
    """The run cannot be followed: the server refused (e.g. 404), or retries ran out."""


@dataclass(frozen=True)
class StreamMessage:
    """One dispatched message of a ``text/event-stream``."""

    event: str
    data: str
    id: str | None


def parse_event_stream(lines: Iterator[str]) -> Iterator[StreamMessage]:
    """The WHATWG ``text/event-stream`` format, line by line (comments and ``retry`` ignored)."""
    event, data, message_id = "", [], None
    for line in lines:
        if not line:
            if data:
                yield StreamMessage(event or "message", "\n".join(data), message_id)
            event, data, message_id = "", [], None
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if name == "data":
            data.append(value)
        elif name == "event":
            event = value
        elif name == "id" and "\0" not in value:
            message_id = value


def _shown_metric(data: dict[str, Any]) -> str:
    for name in SHOWN_METRICS:
        value = data.get(name)
        if isinstance(value, (int, float)):
            return f"{name} {value:.4g}"
    return ""


def watch(
    base_url: str,
    run_id: str,
    *,
    headers: dict[str, str] | None = None,
    console: Console | None = None,
    retries: int = 8,
    backoff_s: float = 0.5,
    max_backoff_s: float = 10.0,
    transport: httpx.BaseTransport | None = None,
) -> str:
    """Follow the run until it ends; returns its final status (``succeeded``, ``failed``, ``cancelled``).

    ``retries`` bounds consecutive failed connections (any event received resets the count);
    the waits between them double from ``backoff_s`` up to ``max_backoff_s``, with jitter.
    Raises WatchError when the server refuses (4xx) or retries run out.
    """
    console = console or Console(stderr=True)
    url = f"{base_url.rstrip('/')}/v1/runs/{run_id}/events"
    last_id: str | None = None
    status = "connecting"
    metric = ""
    epochs_total: int | None = None
    failures = 0
    # Pings arrive every 15 s: a read that waits much longer means a dead connection.
    timeout = httpx.Timeout(10.0, read=60.0)

    progress = Progress(
        SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
        TimeElapsedColumn(), console=console,
    )
    task = progress.add_task(f"run {run_id[:8]} {status}", total=None)

    def show() -> None:
        progress.update(task, description=" · ".join(part for part in (f"run {run_id[:8]}", status, metric) if part))

    with progress, httpx.Client(timeout=timeout, transport=transport, headers=headers) as client:
        while True:
            problem = ""
            try:
                request_headers = {"Accept": "text/event-stream"}
                if last_id is not None:
                    request_headers["Last-Event-ID"] = last_id
                with client.stream("GET", url, headers=request_headers) as response:
                    if response.status_code >= 400:
                        detail = _problem_detail(response)
                        if response.status_code < 500 and response.status_code not in (408, 429):
                            raise WatchError(f"run {run_id}: HTTP {response.status_code}: {detail}")
                        problem = f"HTTP {response.status_code}: {detail}"
                    else:
                        for message in parse_event_stream(response.iter_lines()):
                            if message.id is not None:
                                last_id = message.id
                            failures = 0
                            try:
                                event = json.loads(message.data)
                            except ValueError:
                                continue
                            status = event.get("status", status)
                            data = event.get("data") or {}
                            if message.event == "epoch":
                                metric = _shown_metric(data)
                                epochs_total = data.get("epochs_total", epochs_total)
                                progress.update(task, total=epochs_total, completed=data.get("epoch", 0))
                            show()
                            if status in TERMINAL_STATUSES:
                                if status == "succeeded" and epochs_total:
                                    progress.update(task, total=epochs_total, completed=epochs_total)
                                if status != "succeeded" and (data.get("error") or data.get("reason")):
                                    console.print(f"run {run_id} {status}: {data.get('error') or data.get('reason')}")
                                return status
                        problem = "the stream ended before the run did"
            except httpx.TransportError as exc:
                problem = f"{type(exc).__name__}: {exc}"
            failures += 1
            if failures > retries:
                raise WatchError(f"run {run_id}: gave up after {retries} retries ({problem})")
            delay = min(max_backoff_s, backoff_s * 2 ** (failures - 1)) * random.uniform(0.5, 1.0)
            progress.update(task, description=f"run {run_id[:8]} {status} · reconnecting in {delay:.1f}s ({problem})")
            time.sleep(delay)


def _problem_detail(response: httpx.Response) -> str:
    response.read()
    try:
        return str(response.json().get("detail", response.text))
    except ValueError:
        return response.text[:200]
