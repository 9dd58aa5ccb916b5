"""A bounded, thread-safe cache of loaded models for the prediction path."""

from __future__ import annotations

import threading
import uuid
from collections import OrderedDict
from collections.abc import Callable

from service.runs.modelling import TrainedModel


class ModelCache:
    """LRU of ``TrainedModel`` by run id. A run's weights never change once it succeeded."""

    def __init__(self, capacity: int) -> None:
        self.capacity = max(1, capacity)
        self._models: OrderedDict[uuid.UUID, TrainedModel] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, run_id: uuid.UUID, load: Callable[[], TrainedModel]) -> TrainedModel:
        with self._lock:
            model = self._models.get(run_id)
            if model is not None:
                self._models.move_to_end(run_id)
                return model
        model = load()  # outside the lock: loading may read megabytes from the database
        with self._lock:
            self._models[run_id] = model
            self._models.move_to_end(run_id)
            while len(self._models) > self.capacity:
                self._models.popitem(last=False)
        return model

    def __len__(self) -> int:
        return len(self._models)
