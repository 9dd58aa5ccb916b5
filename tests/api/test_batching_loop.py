"""The micro-batcher's scheduling on one event loop (service.runs.batching), with a real model and
no server: what merges when, where it runs, and that every request gets its own rows or error."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from service.ml.data import Standardizer
from service.ml.nets import NetworkSpec, build_network
from service.runs.batching import PredictBatcher, _macs_per_row_sample
from service.runs.modelling import TrainedModel

FEATURES = 8


def classifier() -> TrainedModel:
    spec = NetworkSpec(n_inputs=FEATURES, n_outputs=3, hidden_layers=(16,), dropout=(0.5,))
    rows = np.random.default_rng(0).normal(size=(50, FEATURES)).astype(np.float32)
    return TrainedModel(task="classification", network=spec, net=build_network(spec, seed=0).eval(),
                        input_scaler=Standardizer.fit(rows), target_scaler=None, tau=None,
                        class_names=["a", "b", "c"])


MODEL = classifier()
MODEL.predict(np.zeros((1, FEATURES), dtype=np.float32), 2, 0)  # the MC kernels' one-time load, before any timing


def rows(count: int, value: float) -> np.ndarray:
    """``count`` rows whose features all equal ``value``: each request's rows are recognisable."""
    return np.full((count, FEATURES), value, dtype=np.float32)


def deterministic(value: float) -> list[float]:
    return MODEL.predict(rows(1, value), 2, 0)[0]["deterministic"]["probabilities"]


def assert_own_rows(answers: list[list[dict]], requests: list[np.ndarray]) -> None:
    for answer, features in zip(answers, requests):
        assert len(answer) == len(features)
        for prediction in answer:
            np.testing.assert_allclose(prediction["deterministic"]["probabilities"], deterministic(float(features[0, 0])),
                                       rtol=1e-5, atol=1e-9)


def test_requests_read_in_one_loop_iteration_share_one_forward_that_runs_at_once() -> None:
    batcher = PredictBatcher(wait_ms=300.0)
    requests = [rows(1 + i % 3, float(i)) for i in range(10)]

    async def main() -> tuple[list, float]:
        started = time.perf_counter()
        answers = await asyncio.gather(*(batcher.predict("m", MODEL, r, 50, None) for r in requests))
        return answers, time.perf_counter() - started

    answers, seconds = asyncio.run(main())
    assert seconds < 0.25  # an idle batcher does not wait its 300 ms
    assert (batcher.stats.forward_calls, batcher.stats.largest_batch, batcher.stats.merged_requests) == (1, 10, 10)
    assert batcher.stats.forwards_on_loop == 1
    assert_own_rows(answers, requests)


def test_requests_gather_while_a_large_batch_computes_off_the_loop() -> None:
    batcher = PredictBatcher(wait_ms=50.0, inline_max_macs=0.0)  # every batch off the loop

    async def main() -> list:
        first = asyncio.ensure_future(batcher.predict("m", MODEL, rows(2, 1.0), 400, None))
        await asyncio.sleep(0)  # the first one is computing in the thread now
        later = []
        for i in range(4):  # in separate loop iterations: they gather while the batcher is busy
            later.append(asyncio.ensure_future(batcher.predict("m", MODEL, rows(1, float(i + 2)), 400, None)))
            await asyncio.sleep(0)
        return [await first, *[await f for f in later]]

    answers = asyncio.run(main())
    assert (batcher.stats.forward_calls, batcher.stats.largest_batch, batcher.stats.forwards_on_loop) == (2, 4, 0)
    assert_own_rows(answers, [rows(2, 1.0), *[rows(1, float(i + 2)) for i in range(4)]])
    batcher.close()


def test_a_group_over_max_inputs_is_split_between_requests_never_within_one() -> None:
    batcher = PredictBatcher(wait_ms=300.0, max_inputs=8)
    requests = [rows(3, float(i)) for i in range(5)]  # 15 rows: batches of 6, 6 and 3

    async def main() -> list:
        return await asyncio.gather(*(batcher.predict("m", MODEL, r, 20, None) for r in requests))

    answers = asyncio.run(main())
    assert (batcher.stats.forward_calls, batcher.stats.largest_batch) == (3, 2)
    assert_own_rows(answers, requests)


@pytest.mark.parametrize("inline_max_macs", [1e12, 0.0], ids=["on-the-loop", "off-the-loop"])
def test_an_error_reaches_every_request_of_its_batch_and_the_batcher_goes_on(inline_max_macs: float) -> None:
    batcher = PredictBatcher(wait_ms=300.0, inline_max_macs=inline_max_macs)
    wrong = np.zeros((1, FEATURES + 1), dtype=np.float32)  # rows of another width cannot be stacked

    async def main() -> tuple[list, list]:
        failed = await asyncio.gather(batcher.predict("m", MODEL, rows(1, 1.0), 10, None),
                                      batcher.predict("m", MODEL, wrong, 10, None), return_exceptions=True)
        fine = await asyncio.gather(*(batcher.predict("m", MODEL, rows(1, 2.0), 10, None) for _ in range(3)))
        return failed, fine

    failed, fine = asyncio.run(main())
    assert all(isinstance(outcome, ValueError) for outcome in failed)
    assert_own_rows(fine, [rows(1, 2.0)] * 3)
    batcher.close()


def test_seeded_requests_and_other_models_never_merge() -> None:
    batcher = PredictBatcher(wait_ms=300.0)
    other = classifier()

    async def main() -> list:
        return await asyncio.gather(batcher.predict("m", MODEL, rows(1, 1.0), 30, 7),
                                    batcher.predict("m", MODEL, rows(1, 1.0), 30, 7),
                                    batcher.predict("m", MODEL, rows(1, 2.0), 30, None),
                                    batcher.predict("other", other, rows(1, 3.0), 30, None),
                                    batcher.predict("m", MODEL, rows(1, 4.0), 20, None))  # another T

    seeded_a, seeded_b, *_ = asyncio.run(main())
    assert seeded_a == seeded_b  # bit for bit
    assert batcher.stats.forward_calls == 5 and batcher.stats.merged_requests == 0
    assert 100 * _macs_per_row_sample(MODEL) <= batcher.inline_max_macs
