"""Where a merged batch runs (service.runs.batching): a small one on the event loop, a large one
in the compute thread; either way every request gets its own rows, and the batcher stays busy
while a batch runs, so requests keep gathering."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import numpy as np
import pytest
from fastapi.testclient import TestClient

from service.runs.batching import INLINE_MAX_MACS, PredictBatcher, _macs_per_row_sample
from tests.api.test_batching import STRIPES, ZERO, _at_once, _client, _predict, trained  # noqa: F401


@pytest.fixture(scope="module")
def batching_app(settings, auth_headers: dict[str, str]) -> Iterator[TestClient]:
    yield from _client(settings, auth_headers, predict_batching=True, predict_batch_wait_ms=300.0)


@pytest.mark.parametrize("inline_max_macs", [INLINE_MAX_MACS, 0.0], ids=["on-the-loop", "in-the-thread"])
def test_each_request_gets_its_rows_wherever_the_batch_runs(batching_app: TestClient, trained: dict,
                                                            inline_max_macs: float) -> None:
    run_id = trained["id"]
    _predict(batching_app, run_id, {"inputs": [ZERO]})  # loads the model
    batcher = PredictBatcher(wait_ms=300.0, inline_max_macs=inline_max_macs)
    batching_app.app.state.predict_batcher = batcher
    model = batching_app.app.state.model_cache.peek(uuid.UUID(run_id))
    assert 16 * 100 * _macs_per_row_sample(model) <= INLINE_MAX_MACS  # these batches (<= 16 rows) are small

    deterministic = {
        name: _predict(batching_app, run_id, {"inputs": [row], "seed": 0})["predictions"][0]["deterministic"]
        for name, row in (("zero", ZERO), ("stripes", STRIPES))
    }
    bodies = [{"inputs": [ZERO if (i + j) % 2 == 0 else STRIPES for j in range(1 + i % 3)], "samples": 100}
              for i in range(8)]
    answers = _at_once(8, lambda i: _predict(batching_app, run_id, bodies[i]))

    stats = batcher.stats
    assert stats.merged_requests >= 2 and stats.forward_calls < 8 + 2  # (+2: the seeded requests, alone)
    merged_forwards = stats.forward_calls - 2
    assert stats.forwards_on_loop == (merged_forwards if inline_max_macs else 0)
    for body, answer in zip(bodies, answers):
        assert len(answer["predictions"]) == len(body["inputs"])
        for row, prediction in zip(body["inputs"], answer["predictions"]):
            expected = deterministic["zero" if row is ZERO else "stripes"]
            # float32 round-off only (the BLAS may round batches of different sizes differently)
            np.testing.assert_allclose(prediction["deterministic"]["probabilities"], expected["probabilities"],
                                       rtol=1e-5, atol=1e-9)
            assert sum(prediction["probabilities"]) == pytest.approx(1.0, abs=1e-9)


def test_a_batch_over_the_budget_runs_in_the_thread(batching_app: TestClient, trained: dict) -> None:
    run_id = trained["id"]
    _predict(batching_app, run_id, {"inputs": [ZERO]})
    model = batching_app.app.state.model_cache.peek(uuid.UUID(run_id))
    # A budget of two rows at T = 100: a lone row runs on the loop, a 5-row request in the thread.
    batcher = PredictBatcher(wait_ms=300.0, inline_max_macs=2 * 100 * _macs_per_row_sample(model))
    batching_app.app.state.predict_batcher = batcher
    _predict(batching_app, run_id, {"inputs": [ZERO], "samples": 100})
    assert (batcher.stats.forward_calls, batcher.stats.forwards_on_loop) == (1, 1)
    answer = _predict(batching_app, run_id, {"inputs": [ZERO, STRIPES] * 2 + [ZERO], "samples": 100})
    assert len(answer["predictions"]) == 5
    assert (batcher.stats.forward_calls, batcher.stats.forwards_on_loop) == (2, 1)
