"""Histograms of the predictive entropy and mutual information the API serves, per model.

Drift in uncertainty (inputs the model was not trained for) shows as mass moving to the high
buckets. A predict request only appends its values to a list; they are counted into buckets
with numpy (``searchsorted`` + ``bincount``) at scrape time, not value by value. The label set
is bounded: at most ``capacity`` models (the model cache's size) are tracked; the least
recently served one is dropped when a new one comes (its series disappear from /metrics;
Prometheus treats a returning one as a reset).

One instance per process (``served_uncertainty``), registered in every app's registry.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
from prometheus_client.core import HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

# Nats. The entropy of K classes is at most ln K (ln 10 = 2.30); the mutual information at most that.
UNCERTAINTY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0)

_FAMILIES = (
    ("mcdrop_served_predictive_entropy_nats", "Predictive entropy of served classification predictions (nats)"),
    ("mcdrop_served_mutual_information_nats", "Mutual information (epistemic uncertainty, BALD) of served classification predictions (nats)"),
)


class _Model:
    __slots__ = ("counts", "sums", "pending", "n_pending")

    def __init__(self, n_buckets: int) -> None:
        self.counts = np.zeros((len(_FAMILIES), n_buckets + 1), dtype=np.int64)  # last: beyond every bound
        self.sums = np.zeros(len(_FAMILIES), dtype=np.float64)
        self.pending: tuple[list[float], ...] = tuple([] for _ in _FAMILIES)  # values not yet in counts
        self.n_pending = 0


class ServedUncertainty(Collector):
    """Per request, values are only appended to a list (a few microseconds: this is the
    predict hot path); they are put into buckets with numpy at scrape time, or once
    ``fold_at`` of them wait, so memory stays bounded when nobody scrapes."""

    def __init__(self, capacity: int = 32, bounds: Sequence[float] = UNCERTAINTY_BUCKETS, fold_at: int = 65_536) -> None:
        self.capacity = max(1, capacity)
        self.fold_at = fold_at
        self._bounds = np.asarray(bounds, dtype=np.float64)
        self._bucket_names = [floatToGoString(bound) for bound in bounds] + ["+Inf"]
        self._models: OrderedDict[str, _Model] = OrderedDict()
        self._lock = threading.Lock()

    def observe(self, model: str, predictive_entropy: Iterable[float], mutual_information: Iterable[float]) -> None:
        """Add one request's values (NaN and infinities are skipped)."""
        with self._lock:
            entry = self._models.get(model)
            if entry is None:
                entry = self._models[model] = _Model(len(self._bounds))
                while len(self._models) > self.capacity:
                    self._models.popitem(last=False)
            else:
                self._models.move_to_end(model)
            before = len(entry.pending[0])
            entry.pending[0].extend(predictive_entropy)
            entry.pending[1].extend(mutual_information)
            entry.n_pending += len(entry.pending[0]) - before
            if entry.n_pending >= self.fold_at:
                self._fold(entry)

    def observe_predictions(self, model: str, predictions: Sequence[Mapping[str, Any]]) -> None:
        """From the API's prediction dicts; regression predictions (no entropies) are skipped."""
        if not predictions or "mutual_information" not in predictions[0]:
            return
        self.observe(model, [p["predictive_entropy"] for p in predictions],
                     [p["mutual_information"] for p in predictions])

    def _fold(self, entry: _Model) -> None:
        """Move the waiting values into the bucket counts (under the lock)."""
        for index, pending in enumerate(entry.pending):
            if not pending:
                continue
            values = np.asarray(pending, dtype=np.float64)
            values = values[np.isfinite(values)]
            # le semantics: bound[i - 1] < value <= bound[i] lands in bucket i
            entry.counts[index] += np.bincount(np.searchsorted(self._bounds, values, side="left"),
                                               minlength=len(self._bounds) + 1)
            entry.sums[index] += values.sum()
            pending.clear()
        entry.n_pending = 0

    def models(self) -> list[str]:
        with self._lock:
            return list(self._models)

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            for entry in self._models.values():
                self._fold(entry)
            snapshot = [(model, entry.counts.copy(), entry.sums.copy()) for model, entry in self._models.items()]
        for index, (name, documentation) in enumerate(_FAMILIES):
            family = HistogramMetricFamily(name, documentation, labels=["run_id"])
            for model, counts, sums in snapshot:
                cumulative = np.cumsum(counts[index]).tolist()
                family.add_metric([model], list(zip(self._bucket_names, cumulative)), float(sums[index]))
            yield family


served_uncertainty = ServedUncertainty()
