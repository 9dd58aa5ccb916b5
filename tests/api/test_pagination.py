"""Cursor pagination, filters and sorting of the list endpoints."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from fastapi.testclient import TestClient

from service.api.app import create_app
from service.config import Settings
from tests.conftest import make_key
from tests.factories import TEXTBOOK_TRAINING


def test_runs_page_by_cursor_newest_first_then_oldest_first(settings: Settings) -> None:
    key = make_key(settings, "pager")  # a tenant of its own: its lists hold only what we make
    with TestClient(create_app(settings), headers={"Authorization": f"Bearer {key}"}) as client:
        dataset = client.post("/v1/datasets", json={"name": "iris", "builtin": "iris"}).json()
        other = client.post("/v1/datasets", json={"name": "wine", "builtin": "wine"}).json()
        body = {"model": {"hidden_layers": [8], "dropout": 0.1}, "training": {**TEXTBOOK_TRAINING, "epochs": 1}}
        made = [client.post("/v1/runs", json={"dataset_id": dataset["id"], **body}).json()["id"] for _ in range(5)]
        made.append(client.post("/v1/runs", json={"dataset_id": other["id"], **body}).json()["id"])

        seen, cursor, pages = [], None, 0
        while True:
            page = client.get("/v1/runs", params={"limit": 2, **({"cursor": cursor} if cursor else {})})
            assert page.status_code == 200, page.text
            seen += [item["id"] for item in page.json()["items"]]
            cursor, pages = page.json()["next_cursor"], pages + 1
            if cursor is None:
                break
        assert seen == made[::-1] and pages == 3

        oldest_first = client.get("/v1/runs", params={"limit": 4, "sort": "created_at"}).json()
        assert [item["id"] for item in oldest_first["items"]] == made[:4]
        rest = client.get("/v1/runs", params={"limit": 4, "sort": "created_at", "cursor": oldest_first["next_cursor"]}).json()
        assert [item["id"] for item in rest["items"]] == made[4:] and rest["next_cursor"] is None

        by_dataset = client.get("/v1/runs", params={"dataset_id": other["id"]}).json()["items"]
        assert [item["id"] for item in by_dataset] == [made[-1]]
        assert client.get("/v1/runs", params={"status": "succeeded"}).json()["items"] == []
        assert len(client.get("/v1/runs", params={"status": "queued"}).json()["items"]) == 6

        future = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
        assert client.get("/v1/runs", params={"created_after": future}).json()["items"] == []
        assert len(client.get("/v1/runs", params={"created_before": future}).json()["items"]) == 6

        datasets = client.get("/v1/datasets", params={"limit": 1}).json()
        assert [item["id"] for item in datasets["items"]] == [other["id"]] and datasets["next_cursor"]
        assert client.get("/v1/datasets", params={"task": "regression"}).json()["items"] == []


def test_bad_cursors_and_parameters_are_422_with_their_location(client: TestClient) -> None:
    for params, loc in [
        ({"cursor": "not-a-cursor"}, ["query", "cursor"]),
        ({"cursor": "eyJzIjoiY3JlYXRlZF9hdCJ9"}, ["query", "cursor"]),  # {"s":"created_at"}: wrong sort
        ({"limit": 0}, ["query", "limit"]),
        ({"sort": "name"}, ["query", "sort"]),
        ({"created_after": "yesterday"}, ["query", "created_after"]),
    ]:
        response = client.get("/v1/runs", params=params)
        assert response.status_code == 422, (params, response.text)
        assert loc in [error["loc"] for error in response.json()["errors"]], response.json()
