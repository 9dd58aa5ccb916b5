"""Liveness and readiness: 503 (problem+json) names what is unreachable, never a 500."""

from __future__ import annotations

from fastapi.testclient import TestClient

from service.api.app import create_app


def test_healthz_and_readyz(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["checks"] == {"database": "ok", "broker": "ok"}


def test_readyz_is_503_when_the_broker_is_unreachable(settings) -> None:
    broken = settings.model_copy(update={"broker_url": "redis://127.0.0.1:1/0"})
    with TestClient(create_app(broken)) as client:
        response = client.get("/readyz")
    assert response.status_code == 503
    assert response.headers["content-type"].startswith("application/problem+json")
    body = response.json()
    assert body["checks"]["database"] == "ok" and body["checks"]["broker"].startswith("unavailable")
    assert "broker" in body["detail"]


def test_database_unreachable_is_503_not_500(settings) -> None:
    broken = settings.model_copy(update={"database_url": "postgresql+psycopg://postgres@127.0.0.1:1/none"})
    # a well-formed key: its lookup meets the outage (503), never a 401 or a 500
    with TestClient(create_app(broken), raise_server_exceptions=False,
                    headers={"Authorization": "Bearer mcd_" + "a" * 43}) as client:
        ready = client.get("/readyz")
        listing = client.get("/v1/runs")
    assert ready.status_code == 503 and ready.json()["checks"]["database"].startswith("unavailable")
    assert listing.status_code == 503
    assert listing.headers["content-type"].startswith("application/problem+json")
    assert "database" in listing.json()["detail"]


def test_openapi_lists_every_route(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    for path in ("/v1/datasets", "/v1/runs", "/v1/runs/{run_id}/predict", "/v1/runs/{run_id}/events",
                 "/v1/runs/{run_id}/evaluation", "/v1/runs/{run_id}/cancel", "/v1/sweeps", "/v1/queue"):
        assert path in spec["paths"], path
    body = spec["paths"]["/v1/datasets"]["post"]["requestBody"]["content"]
    assert {"application/json", "multipart/form-data"} <= set(body)
