"""Served-uncertainty histograms: bucket counts against hand-computed ones, exposition parsed
with prometheus_client's own parser, a bounded label set."""

from __future__ import annotations

import math

import numpy as np
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from service.observability.uncertainty import ServedUncertainty


def scrape(collector: ServedUncertainty) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    registry = CollectorRegistry()
    registry.register(collector)
    samples: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for sample in family.samples:
            samples.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return samples


def test_bucket_counts_sum_and_count() -> None:
    histograms = ServedUncertainty(capacity=4, bounds=(0.1, 0.5, 1.0))
    # le semantics: a value equal to a bound belongs to that bound's bucket
    histograms.observe("run-a", np.array([0.05, 0.1, 0.3, 0.5, 2.0, np.nan]), np.array([0.0, 0.7, np.inf]))
    histograms.observe("run-a", np.array([1.0]), np.array([0.1]))
    samples = scrape(histograms)
    entropy = samples["mcdrop_served_predictive_entropy_nats_bucket"]
    assert [entropy[(("le", le), ("run_id", "run-a"))] for le in ("0.1", "0.5", "1.0", "+Inf")] == [2, 4, 5, 6]
    assert samples["mcdrop_served_predictive_entropy_nats_count"][(("run_id", "run-a"),)] == 6
    assert math.isclose(samples["mcdrop_served_predictive_entropy_nats_sum"][(("run_id", "run-a"),)], 3.95)
    information = samples["mcdrop_served_mutual_information_nats_bucket"]
    assert [information[(("le", le), ("run_id", "run-a"))] for le in ("0.1", "0.5", "1.0", "+Inf")] == [2, 2, 3, 3]
    assert math.isclose(samples["mcdrop_served_mutual_information_nats_sum"][(("run_id", "run-a"),)], 0.8)


def test_from_prediction_dicts_and_regression_is_skipped() -> None:
    histograms = ServedUncertainty()
    histograms.observe_predictions("clf", [{"predictive_entropy": 0.2, "mutual_information": 0.01},
                                           {"predictive_entropy": 1.2, "mutual_information": 0.6}])
    histograms.observe_predictions("reg", [{"mean": 1.0, "std": 0.5}])
    histograms.observe_predictions("empty", [])
    assert histograms.models() == ["clf"]
    samples = scrape(histograms)
    assert samples["mcdrop_served_mutual_information_nats_count"] == {(("run_id", "clf"),): 2}
    assert math.isclose(samples["mcdrop_served_predictive_entropy_nats_sum"][(("run_id", "clf"),)], 1.4)


def test_the_label_set_is_bounded_least_recently_served_goes() -> None:
    histograms = ServedUncertainty(capacity=2)
    one = np.array([0.3])
    histograms.observe("a", one, one)
    histograms.observe("b", one, one)
    histograms.observe("a", one, one)  # a is now the most recently served
    histograms.observe("c", one, one)
    assert sorted(histograms.models()) == ["a", "c"]
    counts = scrape(histograms)["mcdrop_served_predictive_entropy_nats_count"]
    assert counts == {(("run_id", "a"),): 2, (("run_id", "c"),): 1}
