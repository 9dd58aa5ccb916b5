"""Datasets over HTTP: built-ins, CSV uploads, and every bad input answered with a clear 4xx."""

from __future__ import annotations

import uuid

import pytest
from fastapi.testclient import TestClient

from tests.factories import make_dataset

PROBLEM = "application/problem+json"


def assert_problem(response, status: int, *, loc: list | None = None) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith(PROBLEM)
    body = response.json()
    assert body["status"] == status and body["detail"] and body["title"]
    if loc is not None:
        locations = [error["loc"] for error in body.get("errors", [])]
        assert loc in locations, f"{loc} not in {locations}"
    return body


def upload(client: TestClient, content: bytes, *, target: str = "y", task: str = "classification", name: str = "up"):
    return client.post(
        "/v1/datasets",
        data={"name": name, "target": target, "task": task},
        files={"file": ("data.csv", content, "text/csv")},
    )


@pytest.mark.parametrize(
    ("builtin", "task", "n_rows", "n_features", "n_classes"),
    [("digits", "classification", 1797, 64, 10), ("iris", "classification", 150, 4, 3),
     ("wine", "classification", 178, 13, 3), ("breast_cancer", "classification", 569, 30, 2),
     ("diabetes", "regression", 442, 10, None)],
)
def test_builtin_datasets(client: TestClient, builtin, task, n_rows, n_features, n_classes) -> None:
    body = make_dataset(client, builtin)
    assert (body["task"], body["n_rows"], body["n_features"], body["n_classes"]) == (task, n_rows, n_features, n_classes)
    assert client.get(f"/v1/datasets/{body['id']}").json() == body
    assert body["id"] in [item["id"] for item in client.get("/v1/datasets").json()["items"]]


def test_csv_upload_classification_with_text_labels(client: TestClient) -> None:
    rows = ["a,b,y"] + [f"{i},{i % 3 * 0.5},{'cat' if i % 2 else 'dog'}" for i in range(20)]
    body = upload(client, "\n".join(rows).encode())
    assert body.status_code == 201, body.text
    data = body.json()
    assert data["n_rows"] == 20 and data["n_features"] == 2 and data["n_classes"] == 2
    assert data["class_names"] == ["cat", "dog"] and data["feature_names"] == ["a", "b"]


def test_csv_upload_regression(client: TestClient) -> None:
    rows = ["y,x1,x2"] + [f"{i * 1.5},{i},{-i}" for i in range(10)]
    response = upload(client, "\n".join(rows).encode(), task="regression")
    assert response.status_code == 201, response.text
    assert response.json()["task"] == "regression" and response.json()["n_classes"] is None


def test_csv_not_a_number_says_line_and_column(client: TestClient) -> None:
    content = b"a,b,y\n1,2,0\n3,oops,1\n4,5,0\n"
    body = assert_problem(upload(client, content), 422, loc=["body", "file", "line", 3, "column", "b"])
    assert "oops" in body["errors"][0]["msg"]


@pytest.mark.parametrize(
    ("content", "kwargs", "loc"),
    [
        (b"a,b,y\n1,2,0\n3,4,1\n", {"target": "missing"}, ["body", "target"]),
        (b"\xff\xfe\x00bad", {}, ["body", "file"]),
        (b"", {}, ["body", "file"]),
        (b"a,b,y\n1,2,0\n3,4\n5,6,1\n", {}, ["body", "file", "line", 3]),
        (b"a,b,y\n1,2,0\n3,4,0\n", {}, ["body", "file", "column", "y"]),
        (b"a,b,y\n1,2,0\n3,nan,1\n", {}, ["body", "file", "line", 3, "column", "b"]),
        (b"a,b,y\n1,2,x\n3,4,1\n", {"task": "regression"}, ["body", "file", "line", 2, "column", "y"]),
        (b"a,a,y\n1,2,0\n3,4,1\n", {}, ["body", "file", "header"]),
        (b"a,b,y\n1,2,0\n3,4,1\n", {"task": "clustering"}, ["body", "task"]),
    ],
    ids=["unknown-target", "not-utf8", "empty", "ragged-row", "one-class", "nan", "bad-regression-target",
         "duplicate-columns", "unknown-task"],
)
def test_bad_csv_uploads(client: TestClient, content: bytes, kwargs: dict, loc: list) -> None:
    assert_problem(upload(client, content, **kwargs), 422, loc=loc)


def test_form_missing_fields(client: TestClient) -> None:
    response = client.post("/v1/datasets", data={"name": "x"}, files={"file": ("d.csv", b"a,y\n1,0\n", "text/csv")})
    assert_problem(response, 422, loc=["body", "target"])


def test_upload_size_limit(settings, postgres_url, auth_headers) -> None:
    from service.api.app import create_app

    small = settings.model_copy(update={"max_upload_bytes": 1000})
    with TestClient(create_app(small), headers=auth_headers) as limited:
        content = b"a,y\n" + b"1.0,0\n" * 400
        assert_problem(upload(limited, content, target="y"), 413)


@pytest.mark.parametrize(
    ("body", "loc"),
    [({"name": "x", "builtin": "mnist"}, ["body", "builtin"]), ({"builtin": "iris"}, ["body", "name"]),
     ({"name": "", "builtin": "iris"}, ["body", "name"]), ({"name": "x", "builtin": "iris", "extra": 1}, ["body", "extra"])],
)
def test_bad_json_bodies(client: TestClient, body: dict, loc: list) -> None:
    assert_problem(client.post("/v1/datasets", json=body), 422, loc=loc)


def test_malformed_json_and_content_type(client: TestClient) -> None:
    assert_problem(client.post("/v1/datasets", content=b"{not json", headers={"content-type": "application/json"}), 422)
    assert_problem(client.post("/v1/datasets", content=b"x", headers={"content-type": "text/plain"}), 422,
                   loc=["header", "content-type"])


def test_unknown_and_malformed_dataset_ids(client: TestClient) -> None:
    body = assert_problem(client.get(f"/v1/datasets/{uuid.uuid4()}"), 404)
    assert "does not exist" in body["detail"]
    assert_problem(client.get("/v1/datasets/not-a-uuid"), 422, loc=["path", "dataset_id"])
    assert_problem(client.get("/v1/nowhere"), 404)
