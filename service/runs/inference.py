"""A bounded, thread-safe cache of loaded models for the prediction path."""

from __future__ import annotations

import gc
import threading
import uuid
from collections import OrderedDict
from collections.abc import Callable

from service.ml import mc
from service.runs.modelling import TrainedModel


class _Loading:
    """One load in flight: the first caller loads, the others wait for its outcome."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.model: TrainedModel | None = None
        self.error: BaseException | None = None


class ModelCache:
    """LRU of ``TrainedModel`` by run id, at most ``capacity`` models.

    Only succeeded runs are loaded, and a succeeded run never changes state or weights, so a
    cached model stays valid: a hit needs no database round trip. Loads are single-flight:
    concurrent first requests for one run load it once (the others wait for that load and get
    its model, or its error; a failed load is not cached, so a later request tries again).

    After each load, ``gc.freeze()`` moves every object that exists then (the app, the
    libraries, the loaded models) out of the garbage collector's scans. Under load, request
    objects that live through a few young collections make full collections frequent (about
    twice a second at 2,000 predictions/s), and each one scanned all ~270,000 long-lived
    objects of the API process: ~130 ms with the GIL held, which stalled every request
    (p99 ~180 ms at 64 concurrent vs ~30 ms frozen). Frozen objects are still freed by
    reference counting; only a reference cycle among them would never be collected.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = max(1, capacity)
        self._models: OrderedDict[uuid.UUID, TrainedModel] = OrderedDict()
        self._loading: dict[uuid.UUID, _Loading] = {}
        self._lock = threading.Lock()
        self.loads = 0  # how many times a load function ran (for tests and monitoring)

    def peek(self, run_id: uuid.UUID) -> TrainedModel | None:
        """The cached model (marked as recently used), or None; never loads."""
        with self._lock:
            model = self._models.get(run_id)
            if model is not None:
                self._models.move_to_end(run_id)
            return model

    def get(self, run_id: uuid.UUID, load: Callable[[], TrainedModel]) -> TrainedModel:
        with self._lock:
            model = self._models.get(run_id)
            if model is not None:
                self._models.move_to_end(run_id)
                return model
            loading = self._loading.get(run_id)
            leader = loading is None
            if leader:
                loading = self._loading[run_id] = _Loading()
                self.loads += 1
        assert loading is not None
        if not leader:
            loading.done.wait()
            if loading.error is not None:
                raise loading.error
            assert loading.model is not None
            return loading.model
        try:
            model = load()  # outside the lock: loading may read megabytes from the database
        except BaseException as exc:
            loading.error = exc
            with self._lock:
                del self._loading[run_id]
            loading.done.set()
            raise
        loading.model = model
        gc.freeze()
        with self._lock:
            del self._loading[run_id]
            self._models[run_id] = model
            self._models.move_to_end(run_id)
            while len(self._models) > self.capacity:
                self._models.popitem(last=False)
        loading.done.set()
        return model

    @staticmethod
    def warm_up() -> None:
        """The prediction path's one-time costs (the MC engine's kernels), paid before the first request."""
        mc.warm_up()

    def __len__(self) -> int:
        return len(self._models)
