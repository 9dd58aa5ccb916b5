"""Dynamic micro-batching of Monte Carlo dropout predictions.

Many small predict requests for one model cost mostly per-call overhead: for a small MLP and
T = 100, one request's arithmetic is about a megaflop, while each ``sample_outputs`` call,
summary and thread hop costs a fixed few hundred microseconds. So concurrent requests are
answered from shared forwards:

- **What merges**: unseeded requests for the same run and the same ``samples`` (T). Their
  inputs are concatenated, sampled with ONE ``TrainedModel.predict`` call (one
  ``sample_outputs``: one batched forward of all T passes over all rows) and split back per
  request. Dropout masks are drawn independently per sample, row and unit, so a row's T
  outputs have the same distribution whether or not other rows share its forward: merged
  results are exactly as valid as unmerged ones, only the random draws differ (and an
  unseeded request draws fresh masks every time anyway).
- **What never merges**: a request WITH a seed runs alone, exactly as without batching, so a
  seed reproduces its result bit for bit whatever else is in flight. Likewise a request with
  ``max_inputs`` rows or more (it is a full batch by itself) and every request when batching
  is off. Those run in the threadpool, one ``predict`` each.
- **When a batch runs**: one dedicated compute thread takes batches in order of their
  deadline. A request that arrives while nothing is computing and nothing is queued runs at
  once (no added latency at low load). Otherwise it joins its group, which waits at most
  ``wait_ms`` after its first request (less once it holds ``max_inputs`` rows) and then runs
  as soon as the compute thread is free; meanwhile further requests for the same model join
  it. A group never exceeds ``max_inputs`` rows, except that a single request is never split.
- **Where a batch runs**: a small batch (at most ``inline_max_macs`` multiply-adds: for the
  README's digits classifier at T = 100, up to ~70 rows, ~1-2 ms here) is computed on the
  requests' event loop, handed there by the compute thread, which waits for it, so that the
  batcher stays busy meanwhile and requests keep gathering; a larger one runs in the compute
  thread, off the event loop. Why: every torch op releases and re-takes the GIL, so a forward
  of ~40 small ops in a second thread fights the event loop for the GIL ~80 times; measured
  at 64 concurrent requests on 2 cores, that cost ~100-150 µs of CPU per request (both threads
  together) against a loop-computed batch — more than the overlap gained. A large batch (or
  model) is worth the fight, and must not stall the loop for long. Seeded and oversized
  requests run alone in the threadpool.

One compute thread is enough for CPU serving: torch runs with ``api_torch_threads`` intra-op
threads (1 by default), and more compute threads would only contend for the GIL with the
event loop. The thread stops after a while without work and starts again on demand.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any

import anyio.to_thread
import numpy as np
import torch

from service.config import Settings
from service.runs.modelling import TrainedModel

Prediction = dict[str, Any]

# At most this many multiply-adds (rows x samples x the net's weights) are computed on the event
# loop: ~1-2 ms of one core here, about what parsing a few dozen requests costs anyway.
INLINE_MAX_MACS = 64e6


@dataclass
class BatchingStats:
    """Counters since the batcher was made (read them for tests and monitoring)."""

    requests: int = 0  # predict requests received
    forward_calls: int = 0  # TrainedModel.predict calls (each one sample_outputs call)
    merged_requests: int = 0  # requests answered from a forward shared with other requests
    largest_batch: int = 0  # most requests answered from one forward
    forwards_on_loop: int = 0  # of the merged forwards, those computed on the event loop (small batches)
    compute_torch_threads: int | None = None  # torch.get_num_threads() seen by the compute thread


@dataclass
class _Pending:
    features: np.ndarray  # [rows, n_inputs] float32, validated
    future: asyncio.Future[list[Prediction]]
    loop: asyncio.AbstractEventLoop


@dataclass
class _Group:
    model: TrainedModel
    samples: int
    deadline: float  # time.monotonic() after which the group runs as soon as the thread is free
    requests: deque[_Pending] = field(default_factory=deque)
    rows: int = 0


class PredictBatcher:
    """Merges concurrent unseeded predictions for one model into one forward (see the module)."""

    def __init__(self, *, enabled: bool = True, wait_ms: float = 2.0, max_inputs: int = 256,
                 idle_exit_s: float = 30.0, inline_max_macs: float = INLINE_MAX_MACS) -> None:
        self.enabled = enabled
        self.wait_s = max(0.0, wait_ms) / 1000.0
        self.max_inputs = max(1, max_inputs)
        self.idle_exit_s = idle_exit_s
        self.inline_max_macs = inline_max_macs
        self.stats = BatchingStats()
        self._groups: dict[Hashable, _Group] = {}
        self._busy = False
        # When the waiting compute thread wakes by itself (inf: only when told; None: it is not
        # waiting, so it looks at the groups before it waits again): a notify only when needed.
        self._wakes_at: float | None = None
        self._worker: threading.Thread | None = None
        self._condition = threading.Condition(threading.Lock())

    @classmethod
    def from_settings(cls, settings: Settings) -> PredictBatcher:
        return cls(enabled=settings.predict_batching, wait_ms=settings.predict_batch_wait_ms,
                   max_inputs=settings.predict_batch_max_inputs)

    async def predict(
        self, key: Hashable, model: TrainedModel, features: np.ndarray, samples: int, seed: int | None
    ) -> list[Prediction]:
        """``model.predict(features, samples, seed)``, possibly sharing its forward with other
        requests of the same ``key`` (which must identify the model; samples are added to it)."""
        if not self.enabled or seed is not None or len(features) >= self.max_inputs:
            with self._condition:
                self.stats.requests += 1
            return await anyio.to_thread.run_sync(self._alone, model, features, samples, seed)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[list[Prediction]] = loop.create_future()
        self._submit((key, samples), model, samples, _Pending(features, future, loop))
        return await future

    def _alone(self, model: TrainedModel, features: np.ndarray, samples: int, seed: int | None) -> list[Prediction]:
        """In the threadpool: one request, its own forward."""
        _own_torch_threads()
        predictions = model.predict(features, samples, seed)
        with self._condition:
            self.stats.forward_calls += 1
            self.stats.largest_batch = max(self.stats.largest_batch, 1)
        return predictions

    # -- the event loop's side ----------------------------------------------------------
    def _submit(self, key: Hashable, model: TrainedModel, samples: int, pending: _Pending) -> None:
        with self._condition:
            self.stats.requests += 1
            now = time.monotonic()
            group = self._groups.get(key)
            if group is None:
                # Nothing computing and nothing queued: run now rather than wait for company.
                idle = not self._busy and not self._groups
                group = self._groups[key] = _Group(model, samples, now if idle else now + self.wait_s)
            group.requests.append(pending)
            group.rows += len(pending.features)
            if group.rows >= self.max_inputs:
                group.deadline = min(group.deadline, now)
            if self._worker is None:
                self._worker = threading.Thread(target=self._work, name="predict-batcher", daemon=True)
                self._worker.start()
            elif self._wakes_at is not None and group.deadline < self._wakes_at:
                self._condition.notify()

    # -- the compute thread -------------------------------------------------------------
    def _next_batch(self) -> tuple[_Group, list[_Pending]] | None:
        """Wait for a group that is due and take up to max_inputs rows of it (None: idle too long)."""
        with self._condition:
            while True:
                if not self._groups:
                    self._wakes_at = float("inf")
                    woken = self._condition.wait(timeout=self.idle_exit_s)
                    self._wakes_at = None
                    if not woken and not self._groups:
                        self._worker = None
                        return None
                    continue
                key, group = min(self._groups.items(), key=lambda item: item[1].deadline)
                delay = group.deadline - time.monotonic()
                if delay <= 0:
                    break
                self._wakes_at = group.deadline
                self._condition.wait(timeout=delay)
                self._wakes_at = None
            batch = [group.requests.popleft()]
            rows = len(batch[0].features)
            while group.requests and rows + len(group.requests[0].features) <= self.max_inputs:
                rows += len(group.requests[0].features)
                batch.append(group.requests.popleft())
            group.rows -= rows
            if group.requests:
                group.deadline = time.monotonic()  # the overflow of a full batch is due at once
            else:
                del self._groups[key]
            self._busy = True
            return group, batch

    def _work(self) -> None:
        _own_torch_threads()
        with self._condition:
            self.stats.compute_torch_threads = torch.get_num_threads()
        try:
            while (taken := self._next_batch()) is not None:
                group, batch = taken
                if self._on_loop(group, batch):
                    continue
                outcome = _compute(group, batch)
                self._done(batch, on_loop=False)
                _deliver(batch, outcome)
        finally:  # also if this thread dies: the next request starts a new one
            with self._condition:
                self._busy = False
                if self._worker is threading.current_thread():
                    self._worker = None

    def _done(self, batch: list[_Pending], *, on_loop: bool) -> None:
        with self._condition:
            self._busy = False
            self.stats.forward_calls += 1
            self.stats.largest_batch = max(self.stats.largest_batch, len(batch))
            if len(batch) > 1:
                self.stats.merged_requests += len(batch)
            if on_loop:
                self.stats.forwards_on_loop += 1

    def _on_loop(self, group: _Group, batch: list[_Pending]) -> bool:
        """In the compute thread: have a small batch computed on its requests' event loop, and
        wait until it has been (the batcher stays busy, so new requests keep gathering). False
        (compute it here) for a large batch, or requests from several loops, or a closed loop."""
        loop = batch[0].loop
        rows = sum(len(pending.features) for pending in batch)
        if (rows * group.samples * _macs_per_row_sample(group.model) > self.inline_max_macs
                or any(pending.loop is not loop for pending in batch)):
            return False
        computed = threading.Event()

        def compute() -> None:  # on the loop
            try:
                outcome = _compute(group, batch)
                self._done(batch, on_loop=True)
                _resolve(_parts(batch, outcome))
            finally:
                computed.set()

        try:
            loop.call_soon_threadsafe(compute)
        except RuntimeError:  # the loop is closed
            return False
        while not computed.wait(timeout=1.0):
            if loop.is_closed():  # it stopped before computing: nobody waits for these any more
                break
        with self._condition:  # (already so, unless the loop never ran it)
            self._busy = False
        return True


def _own_torch_threads() -> None:
    """Apply the process's torch thread count to this thread's OpenMP and MKL settings.

    ``torch.set_num_threads`` (the API calls it at start-up) sets them for the calling thread:
    another thread's first matmul would otherwise run MKL with its default team (every core),
    whose OpenMP threads then spin between calls, burning a core for nothing (measured: ~2.5x
    the CPU of the same MC prediction with the setting applied in the thread)."""
    torch.set_num_threads(torch.get_num_threads())


def _macs_per_row_sample(model: TrainedModel) -> int:
    """Multiply-adds of one forward pass of one row: the weights of its Linear layers."""
    network = model.network
    widths = [network.n_inputs, *network.hidden_layers, network.n_outputs]
    return sum(a * b for a, b in zip(widths, widths[1:]))


def _compute(group: _Group, batch: list[_Pending]) -> list[Prediction] | BaseException:
    """One forward for the batch's rows; an exception is every request's answer."""
    try:
        features = batch[0].features if len(batch) == 1 else np.concatenate([p.features for p in batch])
        return group.model.predict(features, group.samples, None)
    except Exception as exc:
        return exc


def _parts(batch: list[_Pending], outcome: list[Prediction] | BaseException) -> list[tuple[asyncio.Future[Any], Any]]:
    """Each request's future with its rows of the outcome (or the error)."""
    parts: list[tuple[asyncio.Future[Any], Any]] = []
    start = 0
    for pending in batch:
        if isinstance(outcome, BaseException):
            parts.append((pending.future, outcome))
        else:
            parts.append((pending.future, outcome[start : start + len(pending.features)]))
            start += len(pending.features)
    return parts


def _deliver(batch: list[_Pending], outcome: list[Prediction] | BaseException) -> None:
    """From the compute thread: hand each request its rows of the outcome (or the error), on
    its own event loop."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[Any], Any]]] = {}
    for pending, part in zip(batch, _parts(batch, outcome)):
        by_loop.setdefault(pending.loop, []).append(part)
    for loop, items in by_loop.items():
        try:
            loop.call_soon_threadsafe(_resolve, items)
        except RuntimeError:  # the loop is closed: nobody waits for these any more
            pass


def _resolve(items: list[tuple[asyncio.Future[Any], Any]]) -> None:
    for future, part in items:
        if future.done():  # cancelled: the client went away
            continue
        if isinstance(part, BaseException):
            future.set_exception(part)
        else:
            future.set_result(part)


def app_batcher(state: Any, settings: Settings) -> PredictBatcher:
    """The API process's batcher, kept on the app's ``state`` and made on first use (on the
    event loop, so without races)."""
    batcher = getattr(state, "predict_batcher", None)
    if batcher is None:
        batcher = PredictBatcher.from_settings(settings)
        state.predict_batcher = batcher
    return batcher
