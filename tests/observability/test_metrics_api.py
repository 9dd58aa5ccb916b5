"""GET /metrics through the API (PostgreSQL + Redis): request metrics by route template, runs
by state and queue depth from the database, the optional token; X-Request-ID; CORS."""

from __future__ import annotations

import uuid

from fastapi.testclient import TestClient
from pydantic import SecretStr

from service.api.app import create_app
from service.config import Settings
from tests.api.test_datasets import assert_problem
from tests.factories import make_dataset, make_run
from tests.observability.scraping import scrape, value

REQUESTS = "mcdrop_http_requests_total"
DURATION_COUNT = "mcdrop_http_request_duration_seconds_count"


def test_requests_are_counted_and_timed_by_route_template(client: TestClient) -> None:
    before = scrape(client)
    missing = [uuid.uuid4() for _ in range(3)]
    for run_id in missing:
        assert client.get(f"/v1/runs/{run_id}").status_code == 404
    assert client.get("/v1/runs/not-a-uuid").status_code == 422
    assert client.get("/v1/runs").status_code == 200
    assert client.get(f"/no/such/path/{uuid.uuid4()}").status_code == 404
    after = scrape(client)

    def delta(name: str, method: str, route: str, status: str) -> float:
        return value(after, name, method=method, route=route, status=status) - value(
            before, name, method=method, route=route, status=status)

    for name in (REQUESTS, DURATION_COUNT):
        assert delta(name, "GET", "/v1/runs/{run_id}", "404") == 3
        assert delta(name, "GET", "/v1/runs/{run_id}", "422") == 1
        assert delta(name, "GET", "/v1/runs", "200") == 1
        assert delta(name, "GET", "unmatched", "404") == 1
        assert delta(name, "GET", "/metrics", "200") == 1  # the first scrape
    # latency histogram: cumulative buckets, the +Inf one equal to the count
    labels = {"method": "GET", "route": "/v1/runs/{run_id}", "status": "404"}
    assert value(after, "mcdrop_http_request_duration_seconds_bucket", le="+Inf", **labels) == value(
        after, DURATION_COUNT, **labels)
    assert value(after, "mcdrop_http_request_duration_seconds_bucket", le="0.001", **labels) <= value(
        after, "mcdrop_http_request_duration_seconds_bucket", le="30.0", **labels)
    assert value(after, "mcdrop_http_request_duration_seconds_sum", **labels) > 0
    # never a raw path: unbounded values would be unbounded series
    routes = {dict(labels)["route"] for (name, labels) in after if name == REQUESTS}
    assert not any(str(run_id) in route for route in routes for run_id in missing)
    assert all(route == "unmatched" or route.startswith("/") for route in routes)


def test_runs_by_state_and_queue_depth_follow_the_rows(client: TestClient) -> None:
    dataset = make_dataset(client, "iris")
    before = scrape(client)
    first = make_run(client, dataset["id"])
    second = make_run(client, dataset["id"])
    queued = scrape(client)
    assert value(queued, "mcdrop_runs", kind="train", state="queued") - value(
        before, "mcdrop_runs", kind="train", state="queued") == 2
    assert value(queued, "mcdrop_queue_depth", queue="cpu") - value(before, "mcdrop_queue_depth", queue="cpu") == 2
    assert value(queued, "mcdrop_metrics_database_up") == 1

    assert client.post(f"/v1/runs/{first['id']}/cancel").status_code == 200
    assert client.post(f"/v1/runs/{second['id']}/cancel").status_code == 200
    cancelled = scrape(client)
    for state, change in [("queued", 0), ("cancelled", 2)]:
        assert value(cancelled, "mcdrop_runs", kind="train", state=state) - value(
            before, "mcdrop_runs", kind="train", state=state) == change
    assert value(cancelled, "mcdrop_queue_depth", queue="cpu") == value(before, "mcdrop_queue_depth", queue="cpu")
    # tenant-free aggregates only
    assert not any("tenant" in dict(labels) for (_, labels) in cancelled)


def test_metrics_token_when_configured(settings: Settings) -> None:
    guarded = TestClient(create_app(settings.model_copy(update={"metrics_token": SecretStr("scrape-s3cret")})))
    refused = guarded.get("/metrics")
    body = assert_problem(refused, 401)
    assert "token" in body["detail"] and refused.headers["www-authenticate"].startswith("Bearer")
    assert_problem(guarded.get("/metrics", headers={"Authorization": "Bearer wrong"}), 401)
    assert_problem(guarded.get("/metrics", headers={"Authorization": "Basic scrape-s3cret"}), 401)
    samples = scrape(guarded, headers={"Authorization": "Bearer scrape-s3cret"})
    assert value(samples, REQUESTS, method="GET", route="/metrics", status="401") == 3


def test_request_id_is_echoed_or_replaced(client: TestClient) -> None:
    given = "trace-7.A_b"
    assert client.get("/healthz", headers={"X-Request-ID": given}).headers["x-request-id"] == given
    for invalid in ("x" * 129, "has space", "semi;colon", ""):
        replaced = client.get("/healthz", headers={"X-Request-ID": invalid}).headers["x-request-id"]
        assert replaced != invalid and len(replaced) == 32 and replaced.isalnum()
    made = {client.get("/healthz").headers["x-request-id"] for _ in range(3)}
    assert len(made) == 3  # a fresh one per request
    # also on problem responses
    assert client.get(f"/v1/runs/{uuid.uuid4()}", headers={"X-Request-ID": given}).headers["x-request-id"] == given


def test_cors_preflight_for_configured_origins_only(settings: Settings, client: TestClient) -> None:
    dashboard = "https://dashboard.example.org"
    browser = TestClient(create_app(settings.model_copy(update={"cors_origins": (dashboard,)})))
    preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization,content-type"}

    allowed = browser.options("/v1/runs", headers={"Origin": dashboard, **preflight})
    assert allowed.status_code == 200
    assert allowed.headers["access-control-allow-origin"] == dashboard
    assert "authorization" in allowed.headers["access-control-allow-headers"].lower()
    assert "POST" in allowed.headers["access-control-allow-methods"]

    refused = browser.options("/v1/runs", headers={"Origin": "https://evil.example", **preflight})
    assert refused.status_code == 400
    assert "access-control-allow-origin" not in refused.headers

    simple = browser.get("/healthz", headers={"Origin": dashboard})
    assert simple.headers["access-control-allow-origin"] == dashboard
    exposed = simple.headers["access-control-expose-headers"].lower()
    assert "x-request-id" in exposed and "retry-after" in exposed
    assert "access-control-allow-origin" not in browser.get("/healthz", headers={"Origin": "https://evil.example"}).headers

    # CORS is off unless origins are configured
    off = client.options("/v1/runs", headers={"Origin": dashboard, **preflight})
    assert "access-control-allow-origin" not in off.headers
