"""schemathesis against the OpenAPI schema, the short profile: at least 1,000 generated requests
across every operation, valid and invalid ones, and not one 5xx answer.

The app runs in process (ASGI) on the session's PostgreSQL and Redis with auth on, as tenant
"fuzz" (its own tenant, so what the fuzzer creates stays out of other tests' listings; a key
of it is made like the session's `api_key`). Real ids are mixed into path parameters and
bodies (bench/fuzz_api.py: a trained run, a queued run, a sweep, a key, a registered model, a
batch job), so requests reach the handlers and the model, not only "404 not found". The check
is schemathesis' `not_a_server_error`; other conformance checks are left to the long profile
(`make bench-fuzz`). Event streams are read up to their first event and then closed, so the
live feeds (/v1/events, /v1/runs/{id}/events) are fuzzed too; nothing is excluded
(bench.fuzz_api.EXCLUDED says why if that changes). The generation is seeded
(MCDROP_FUZZ_SEED, default 0) so a failure reproduces; everything the fuzzer queued is
cancelled afterwards, since a later test's worker would otherwise train it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from bench.fuzz_api import EXCLUDED, cancel_leftovers, examples_for, fuzz, prepare
from service.api.app import create_app
from service.client import McdropClient
from service.config import Settings
from tests.conftest import make_key

MIN_REQUESTS = 1000


@pytest.fixture(scope="module")
def fuzz_headers(settings: Settings) -> dict[str, str]:
    return {"Authorization": f"Bearer {make_key(settings, 'fuzz')}"}


@pytest.fixture(scope="module")
def fuzz_client(client: TestClient, fuzz_headers: dict[str, str]) -> Iterator[McdropClient]:
    """The typed client as tenant "fuzz", over the session's app; cancels the tenant's queued jobs at the end."""
    with McdropClient(transport=client, headers=fuzz_headers) as api:
        try:
            yield api
        finally:
            cancel_leftovers(api)


def test_generated_requests_never_get_a_server_error(
    settings: Settings, fuzz_client: McdropClient, fuzz_headers: dict[str, str],
) -> None:
    fixtures = prepare(fuzz_client, settings)
    # A fresh app for the fuzzer (schemathesis runs its lifespan); no reconciler in it.
    app = create_app(settings.model_copy(update={"reconcile_interval_s": 0}))
    operations = {(method.upper(), path) for path, item in app.openapi()["paths"].items() for method in item
                  if method in ("get", "put", "post", "delete", "patch")} - set(EXCLUDED)
    report = fuzz(
        app, fuzz_headers, examples_per_operation=examples_for(MIN_REQUESTS, len(operations)),
        min_requests=MIN_REQUESTS, fixtures=fixtures, seed=int(os.environ.get("MCDROP_FUZZ_SEED", "0")),
    )
    print(report.summary())
    assert not report.failures, report.summary()
    assert report.requests >= MIN_REQUESTS, report.summary()
    assert set(report.by_operation) == {f"{method} {path}" for method, path in operations}
    assert report.by_status.keys() & {200, 201, 202}, "no request got through"
    assert report.by_status.keys() & {400, 401, 404, 409, 422}, "no request was refused"


def test_bodies_that_are_not_text_are_refused_not_500(client: TestClient) -> None:
    """Found by the fuzzer: a JSON body that is not UTF-8 made the predict route's own body
    parser (service/api/fast_routes.py) raise. Every operation that takes JSON answers 4xx."""
    import re
    import uuid

    placeholders = {"name": "some-model", "alias": "production", "version": "1"}
    schema = client.app.openapi()  # type: ignore[attr-defined]
    checked = 0
    for path, item in schema["paths"].items():
        for method, operation in item.items():
            if "application/json" not in operation.get("requestBody", {}).get("content", {}):
                continue
            url = re.sub(r"{(\w+)}", lambda m: placeholders.get(m.group(1), str(uuid.uuid4())), path)
            for body in (b"\xde\xad\xbe\xef", b'{"inputs": "\xff"}'):
                response = client.request(method.upper(), url, content=body, headers={"content-type": "application/json"})
                assert 400 <= response.status_code < 500, (method, path, body, response.status_code, response.text)
            checked += 1
    assert checked >= 10
