"""Predict micro-batching: concurrent unseeded requests share a forward, seeded ones never do."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator

import numpy as np
import pytest
from fastapi.testclient import TestClient

from service.api.app import create_app
from service.config import Settings
from service.runs.inference import ModelCache
from tests.factories import TEXTBOOK_TRAINING, make_dataset, make_run, train_in_process

ZERO = [0, 0, 5, 13, 9, 1, 0, 0, 0, 0, 13, 15, 10, 15, 5, 0, 0, 3, 15, 2, 0, 11, 8, 0, 0, 4, 12, 0, 0, 8, 8, 0,
        0, 5, 8, 0, 0, 9, 8, 0, 0, 4, 11, 0, 1, 12, 7, 0, 0, 2, 14, 5, 10, 12, 0, 0, 0, 0, 6, 13, 10, 0, 0, 0]
STRIPES = ([16] * 8 + [0] * 8) * 4


@pytest.fixture(scope="module")
def trained(client: TestClient, settings: Settings) -> dict:
    dataset = make_dataset(client, "digits")
    run = make_run(client, dataset["id"], training={**TEXTBOOK_TRAINING, "epochs": 3})
    return train_in_process(client, settings, run)


def _client(settings: Settings, headers: dict[str, str], **changes: object) -> Iterator[TestClient]:
    # A long wait makes merging certain however slow the machine; no reconciler needed here.
    app = create_app(settings.model_copy(update={"reconcile_interval_s": 0.0, **changes}))
    with TestClient(app, headers=headers) as test_client:
        yield test_client


@pytest.fixture(scope="module")
def batching(settings: Settings, auth_headers: dict[str, str]) -> Iterator[TestClient]:
    yield from _client(settings, auth_headers, predict_batching=True, predict_batch_wait_ms=300.0)


@pytest.fixture(scope="module")
def unbatched(settings: Settings, auth_headers: dict[str, str]) -> Iterator[TestClient]:
    yield from _client(settings, auth_headers, predict_batching=False)


def _at_once(count: int, call: Callable[[int], dict]) -> list[dict]:
    """``call(i)`` for i < count from as many threads, released together."""
    barrier = threading.Barrier(count)
    results: list[dict | BaseException] = [RuntimeError("no result")] * count

    def go(i: int) -> None:
        barrier.wait()
        try:
            results[i] = call(i)
        except BaseException as exc:  # re-raised below, in the test's thread
            results[i] = exc

    threads = [threading.Thread(target=go, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return results  # type: ignore[return-value]


def _predict(client: TestClient, run_id: str, body: dict) -> dict:
    response = client.post(f"/v1/runs/{run_id}/predict", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def _assert_valid(prediction: dict) -> None:
    probabilities = np.asarray(prediction["probabilities"])
    assert probabilities.shape == (10,) and (probabilities >= 0).all()
    assert probabilities.sum() == pytest.approx(1.0, abs=1e-9)
    assert prediction["predictive_entropy"] >= prediction["mutual_information"] - 1e-12
    assert prediction["mutual_information"] >= 0 and prediction["expected_entropy"] >= 0
    assert (np.asarray(prediction["probabilities_std"]) >= 0).all()


def test_concurrent_unseeded_requests_share_forwards(batching: TestClient, trained: dict, settings: Settings) -> None:
    run_id = trained["id"]
    _predict(batching, run_id, {"inputs": [ZERO]})  # loads the model
    batcher = batching.app.state.predict_batcher
    before = batcher.stats.forward_calls
    # Request i asks for 1 + i % 3 rows, alternating zero and stripes, so a wrong split shows.
    bodies = [{"inputs": [ZERO if (i + j) % 2 == 0 else STRIPES for j in range(1 + i % 3)], "samples": 100}
              for i in range(8)]
    answers = _at_once(8, lambda i: _predict(batching, run_id, bodies[i]))

    assert batcher.stats.forward_calls - before < 8  # merged
    assert batcher.stats.merged_requests >= 2 and batcher.stats.largest_batch >= 2
    assert batcher.stats.compute_torch_threads == settings.api_torch_threads
    # Each request got its own rows: the dropout-off part is deterministic, so it must match.
    deterministic = {
        name: _predict(batching, run_id, {"inputs": [row], "seed": 0})["predictions"][0]["deterministic"]
        for name, row in (("zero", ZERO), ("stripes", STRIPES))
    }
    for body, answer in zip(bodies, answers):
        assert answer["seed"] is None and len(answer["predictions"]) == len(body["inputs"])
        for row, prediction in zip(body["inputs"], answer["predictions"]):
            _assert_valid(prediction)
            expected = deterministic["zero" if row is ZERO else "stripes"]
            # float32 round-off only (the BLAS may round a batch of 3 rows unlike a batch of 1);
            # another row's answer would differ in the first digits
            np.testing.assert_allclose(prediction["deterministic"]["probabilities"], expected["probabilities"],
                                       rtol=1e-5, atol=1e-9)


def test_seeded_requests_reproduce_under_concurrency(batching: TestClient, trained: dict) -> None:
    run_id = trained["id"]
    seeded = {"inputs": [ZERO, STRIPES], "samples": 100, "seed": 7}
    alone = _predict(batching, run_id, seeded)
    answers = _at_once(8, lambda i: _predict(batching, run_id, seeded if i % 2 else {"inputs": [STRIPES, ZERO]}))
    for answer in answers[1::2]:
        assert answer == alone  # bit for bit, whatever ran beside it


def test_merged_results_match_unmerged_statistically(batching: TestClient, unbatched: TestClient, trained: dict) -> None:
    run_id = trained["id"]
    samples = 400
    reference = _predict(unbatched, run_id, {"inputs": [STRIPES], "samples": samples})["predictions"][0]
    batcher = batching.app.state.predict_batcher
    merged_before = batcher.stats.merged_requests
    answers = _at_once(6, lambda i: _predict(batching, run_id, {"inputs": [STRIPES], "samples": samples}))
    assert batcher.stats.merged_requests > merged_before
    mean = np.mean([answer["predictions"][0]["probabilities"] for answer in answers], axis=0)
    spread = np.asarray(reference["probabilities_std"])
    # Standard error of a difference of means over 400 and 6 x 400 passes, with slack.
    tolerance = 6 * spread * np.sqrt(1 / samples + 1 / (6 * samples)) + 1e-3
    assert (np.abs(mean - np.asarray(reference["probabilities"])) <= tolerance).all()
    information = np.mean([answer["predictions"][0]["mutual_information"] for answer in answers])
    assert information == pytest.approx(reference["mutual_information"], abs=0.15)


def test_a_lone_request_does_not_wait(batching: TestClient, trained: dict) -> None:
    run_id = trained["id"]
    _predict(batching, run_id, {"inputs": [ZERO]})
    durations = []
    for _ in range(3):
        started = time.perf_counter()
        _predict(batching, run_id, {"inputs": [ZERO]})
        durations.append(time.perf_counter() - started)
    assert min(durations) < 0.25  # the batch wait here is 300 ms


def test_disabled_batching_runs_each_request_alone(unbatched: TestClient, trained: dict, settings: Settings) -> None:
    run_id = trained["id"]
    _predict(unbatched, run_id, {"inputs": [ZERO]})
    batcher = unbatched.app.state.predict_batcher
    assert not batcher.enabled
    before = batcher.stats.forward_calls
    answers = _at_once(6, lambda i: _predict(unbatched, run_id, {"inputs": [ZERO, STRIPES][: 1 + i % 2]}))
    assert batcher.stats.forward_calls - before == 6 and batcher.stats.merged_requests == 0
    for i, answer in enumerate(answers):
        assert len(answer["predictions"]) == 1 + i % 2
        for prediction in answer["predictions"]:
            _assert_valid(prediction)
    seeded = {"inputs": [STRIPES], "seed": 3}
    assert _predict(unbatched, run_id, seeded) == _predict(unbatched, run_id, seeded)


def test_model_cache_loads_once_for_concurrent_misses_and_stays_bounded() -> None:
    cache = ModelCache(capacity=2)
    calls: list[uuid.UUID] = []

    def slow_load(run_id: uuid.UUID) -> Callable[[], object]:
        def load() -> object:
            calls.append(run_id)
            time.sleep(0.1)
            return object()
        return load

    first = uuid.UUID(int=1)
    models = _at_once(6, lambda i: {"model": cache.get(first, slow_load(first))})  # type: ignore[arg-type]
    assert calls == [first] and len({id(m["model"]) for m in models}) == 1
    for n in (2, 3, 4):
        cache.get(uuid.UUID(int=n), slow_load(uuid.UUID(int=n)))  # type: ignore[arg-type]
    assert len(cache) == 2 and cache.peek(first) is None


def test_a_failed_load_reaches_every_waiter_and_is_retried() -> None:
    cache = ModelCache(capacity=2)
    run_id = uuid.UUID(int=9)

    def failing() -> object:
        time.sleep(0.1)
        raise OSError("database went away")

    outcomes = _at_once(4, lambda i: {"error": _error_of(lambda: cache.get(run_id, failing))})  # type: ignore[arg-type]
    assert all(isinstance(outcome["error"], OSError) for outcome in outcomes)
    assert cache.get(run_id, lambda: "loaded") == "loaded"  # type: ignore[arg-type,return-value]


def _error_of(call: Callable[[], object]) -> BaseException | None:
    try:
        call()
    except BaseException as exc:
        return exc
    return None
