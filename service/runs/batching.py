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
- **When a batch runs**: everything happens on the requests' event loop, with no thread of
  the batcher's own in between. A request that arrives while nothing is computing and nothing
  is queued makes its group due at once: it runs at the end of the loop's current iteration,
  together with every request for the same model that the loop reads in that iteration (under
  load, a whole burst; at low load, no added latency). Otherwise (a batch is computing off the
  loop, or other groups are queued) the group waits at most ``wait_ms`` after its first request
  (less once it holds ``max_inputs`` rows) and then runs as soon as the batcher is free;
  meanwhile further requests for the same model join it. A group never exceeds ``max_inputs``
  rows, except that a single request is never split.
- **Where a batch runs**: a small batch (at most ``inline_max_macs`` multiply-adds: for the
  README's digits classifier at T = 100, up to ~70 rows, ~1-2 ms here) is computed on the event
  loop itself; requests that arrive meanwhile wait in their sockets and gather for the next
  batch. A larger one runs in one compute thread, off the loop (the batcher is busy until it
  is done, so requests keep gathering). Why not always a thread: every torch op releases and
  re-takes the GIL, so a forward of ~40 small ops in a second thread fights the event loop for
  the GIL ~80 times, and each hand-over between the loop and a thread costs wake-ups and GIL
  switches; measured at 64 concurrent requests on 2 cores, scheduling on the loop with no thread
  in the hand-off cost ~30 % less server CPU per request than the earlier design (a compute
  thread that handed small batches to the loop): 243 vs 343 µs, and a lone request's p50 went
  from 0.84 to 0.70 ms (``make bench`` before and after, same machine). A large batch (or
  model) is worth the thread, and must not stall the loop for long. Seeded and oversized
  requests run alone in the threadpool.

The compute thread runs torch with the process's thread count (``api_torch_threads``, 1 by
default), as the event loop's thread does.
"""

from __future__ import annotations

import asyncio
import threading
import weakref
from collections import deque
from collections.abc import Hashable
from concurrent.futures import ThreadPoolExecutor
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
    compute_torch_threads: int | None = None  # torch.get_num_threads() where the last merged batch ran


@dataclass
class _Pending:
    features: np.ndarray  # [rows, n_inputs] float32, validated
    future: asyncio.Future[list[Prediction]]


@dataclass
class _Group:
    model: TrainedModel
    samples: int
    deadline: float  # loop.time() after which the group runs as soon as the batcher is free
    requests: deque[_Pending] = field(default_factory=deque)
    rows: int = 0


@dataclass
class _LoopState:
    """The batcher's state on one event loop (touched only from that loop)."""

    groups: dict[Hashable, _Group] = field(default_factory=dict)
    busy: bool = False  # a batch is computing off the loop
    soon: bool = False  # a dispatch is scheduled for the end of this iteration
    timer: asyncio.TimerHandle | None = None  # a dispatch at a group's deadline


class PredictBatcher:
    """Merges concurrent unseeded predictions for one model into one forward (see the module)."""

    def __init__(self, *, enabled: bool = True, wait_ms: float = 2.0, max_inputs: int = 256,
                 inline_max_macs: float = INLINE_MAX_MACS) -> None:
        self.enabled = enabled
        self.wait_s = max(0.0, wait_ms) / 1000.0
        self.max_inputs = max(1, max_inputs)
        self.inline_max_macs = inline_max_macs
        self.stats = BatchingStats()
        self._stats_lock = threading.Lock()  # the threadpool's requests count too
        self._states: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopState] = weakref.WeakKeyDictionary()
        self._executor: ThreadPoolExecutor | None = None

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
            with self._stats_lock:
                self.stats.requests += 1
            return await anyio.to_thread.run_sync(self._alone, model, features, samples, seed)
        loop = asyncio.get_running_loop()
        state = self._states.get(loop)
        if state is None:
            state = self._states[loop] = _LoopState()
        future: asyncio.Future[list[Prediction]] = loop.create_future()
        with self._stats_lock:
            self.stats.requests += 1
        now = loop.time()
        group = state.groups.get((key, samples))
        if group is None:
            # Nothing computing and nothing queued: due now (the end of this loop iteration).
            idle = not state.busy and not state.groups
            group = state.groups[(key, samples)] = _Group(model, samples, now if idle else now + self.wait_s)
        group.requests.append(_Pending(features, future))
        group.rows += len(features)
        if group.rows >= self.max_inputs:
            group.deadline = min(group.deadline, now)
        self._schedule(state, loop)
        return await future

    def close(self) -> None:
        """Stop the compute thread (the app's shutdown); queued requests are not affected."""
        if self._executor is not None:
            self._executor.shutdown(wait=False)
            self._executor = None

    def _alone(self, model: TrainedModel, features: np.ndarray, samples: int, seed: int | None) -> list[Prediction]:
        """In the threadpool: one request, its own forward."""
        _own_torch_threads()
        predictions = model.predict(features, samples, seed)
        with self._stats_lock:
            self.stats.forward_calls += 1
            self.stats.largest_batch = max(self.stats.largest_batch, 1)
        return predictions

    # -- on the event loop --------------------------------------------------------------
    def _schedule(self, state: _LoopState, loop: asyncio.AbstractEventLoop) -> None:
        """Arrange the next dispatch: at the end of this iteration if a group is due, else at the
        earliest deadline. Nothing while a batch computes off the loop (its end dispatches)."""
        if state.busy or not state.groups or state.soon:
            return
        earliest = min(group.deadline for group in state.groups.values())
        if earliest <= loop.time():
            state.soon = True
            loop.call_soon(self._dispatch, state, loop)
        elif state.timer is None or earliest < state.timer.when():
            if state.timer is not None:
                state.timer.cancel()
            state.timer = loop.call_at(earliest, self._dispatch, state, loop)

    def _dispatch(self, state: _LoopState, loop: asyncio.AbstractEventLoop) -> None:
        """Run the due groups, earliest deadline first: small batches here, a large one off the loop."""
        state.soon = False
        if state.timer is not None:
            state.timer.cancel()
            state.timer = None
        while not state.busy and state.groups:
            key, group = min(state.groups.items(), key=lambda item: item[1].deadline)
            if group.deadline > loop.time():
                break
            batch = [group.requests.popleft()]
            rows = len(batch[0].features)
            while group.requests and rows + len(group.requests[0].features) <= self.max_inputs:
                rows += len(group.requests[0].features)
                batch.append(group.requests.popleft())
            group.rows -= rows
            if group.requests:
                group.deadline = loop.time()  # the overflow of a full batch is due at once
            else:
                del state.groups[key]
            if rows * group.samples * _macs_per_row_sample(group.model) <= self.inline_max_macs:
                outcome = _compute(group, batch)
                self._count(batch, on_loop=True)
                _resolve(_parts(batch, outcome))
                continue
            state.busy = True
            computing = loop.run_in_executor(self._compute_thread(), self._compute_off_loop, group, batch)
            computing.add_done_callback(lambda done, batch=batch: self._computed(state, loop, batch, done))
        self._schedule(state, loop)

    def _computed(self, state: _LoopState, loop: asyncio.AbstractEventLoop, batch: list[_Pending],
                  done: asyncio.Future[list[Prediction] | BaseException]) -> None:
        """A batch computed off the loop is back: answer its requests and go on."""
        state.busy = False
        if done.cancelled():
            outcome: list[Prediction] | BaseException = RuntimeError("prediction cancelled")
        else:
            outcome = done.exception() or done.result()  # _compute returns its errors
        self._count(batch, on_loop=False)
        _resolve(_parts(batch, outcome))
        self._dispatch(state, loop)

    def _compute_off_loop(self, group: _Group, batch: list[_Pending]) -> list[Prediction] | BaseException:
        """In the compute thread: the batch's forward; records the thread's torch thread count."""
        outcome = _compute(group, batch)
        with self._stats_lock:
            self.stats.compute_torch_threads = torch.get_num_threads()
        return outcome

    def _compute_thread(self) -> ThreadPoolExecutor:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="predict-batcher",
                                                initializer=_own_torch_threads)
        return self._executor

    def _count(self, batch: list[_Pending], *, on_loop: bool) -> None:
        with self._stats_lock:
            self.stats.forward_calls += 1
            self.stats.largest_batch = max(self.stats.largest_batch, len(batch))
            if len(batch) > 1:
                self.stats.merged_requests += len(batch)
            if on_loop:
                self.stats.forwards_on_loop += 1
                self.stats.compute_torch_threads = torch.get_num_threads()


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
