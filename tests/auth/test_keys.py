"""API keys: 401 without a valid key, keys hashed at rest, shown once, revocable; auth off only
for an embedded server on loopback."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from service.api.app import create_app
from service.auth.models import ApiKeyRow
from service.config import Settings
from service.db import get_sessionmaker
from tests.conftest import make_key


def assert_401(response) -> dict:
    assert response.status_code == 401, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    assert response.headers["www-authenticate"].startswith("Bearer")
    return response.json()


@pytest.fixture(scope="module")
def anonymous(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as test_client:
        yield test_client


def test_requests_without_a_valid_key_are_401(anonymous: TestClient) -> None:
    assert "API key is required" in assert_401(anonymous.get("/v1/runs"))["detail"]
    assert "malformed" in assert_401(anonymous.get("/v1/runs", headers={"Authorization": "Bearer nope"}))["detail"]
    unknown = "mcd_" + "x" * 43
    assert "unknown or revoked" in assert_401(anonymous.get("/v1/datasets", headers={"Authorization": f"Bearer {unknown}"}))["detail"]
    assert_401(anonymous.get("/v1/datasets", headers={"Authorization": "Basic dXNlcjpwYXNz"}))
    assert_401(anonymous.post("/v1/datasets", json={"name": "x", "builtin": "iris"}))
    # probes stay open for orchestrators
    assert anonymous.get("/healthz").status_code == 200


def test_a_key_is_shown_once_and_stored_only_as_a_hash(client: TestClient, settings: Settings) -> None:
    created = client.post("/v1/keys", json={"name": "ci"})
    assert created.status_code == 201, created.text
    body = created.json()
    key = body["key"]
    assert key.startswith("mcd_") and len(key) == 47 and body["tenant_id"] == "default"
    assert key.startswith(body["prefix"]) and len(body["prefix"]) < 16
    with get_sessionmaker(settings.sqlalchemy_url)() as session:
        row = session.scalar(select(ApiKeyRow).where(ApiKeyRow.id == body["id"]))
        stored = [str(getattr(row, column.name)) for column in ApiKeyRow.__table__.columns]
    assert row.secret_hash == hashlib.sha256(key.encode()).hexdigest()
    assert not any(key in value for value in stored)  # the secret itself is nowhere
    listed = client.get("/v1/keys").json()["items"]
    assert body["id"] in [item["id"] for item in listed] and all("key" not in item for item in listed)
    # the new key works
    assert client.get("/v1/runs", headers={"Authorization": f"Bearer {key}"}).status_code == 200


def test_a_revoked_key_stops_working(settings: Settings) -> None:
    key = make_key(settings, "revokers")
    # no cache: the revocation is seen by the very next request
    with TestClient(create_app(settings.model_copy(update={"auth_cache_s": 0.0})),
                    headers={"Authorization": f"Bearer {key}"}) as own:
        key_id = next(item["id"] for item in own.get("/v1/keys").json()["items"] if key.startswith(item["prefix"]))
        revoked = own.post(f"/v1/keys/{key_id}/revoke")
        assert revoked.status_code == 200 and revoked.json()["revoked_at"]
        assert "revoked" in assert_401(own.get("/v1/runs"))["detail"]


def test_keys_of_another_tenant_are_invisible(client: TestClient, settings: Settings) -> None:
    other = make_key(settings, "other-keys")
    with TestClient(create_app(settings), headers={"Authorization": f"Bearer {other}"}) as theirs:
        their_ids = [item["id"] for item in theirs.get("/v1/keys").json()["items"]]
    mine = client.get("/v1/keys").json()["items"]
    assert their_ids and not set(their_ids) & {item["id"] for item in mine}
    assert client.post(f"/v1/keys/{their_ids[0]}/revoke").status_code == 404
    assert client.post("/v1/keys", json={"name": ""}).status_code == 422


@pytest.mark.parametrize(
    ("changes", "allowed"),
    [
        ({"auth": "off"}, True),  # embedded (SQLite + filesystem broker) on loopback
        ({"auth": "off", "host": "0.0.0.0"}, False),
        ({"auth": "off", "database_url": "postgresql+psycopg://postgres@127.0.0.1/x"}, False),
        ({"auth": "off", "broker_url": "redis://127.0.0.1:6379/0"}, False),
        ({"auth": "on", "host": "0.0.0.0", "database_url": "postgresql+psycopg://postgres@127.0.0.1/x"}, True),
    ],
)
def test_auth_may_be_off_only_for_an_embedded_server_on_loopback(tmp_path, changes: dict, allowed: bool) -> None:
    settings = Settings(data_dir=tmp_path, **changes)
    assert (settings.auth_problem() is None) is allowed
    if not allowed:
        with pytest.raises(RuntimeError, match="MCDROP_AUTH=off is only allowed"):
            create_app(settings)


def test_auth_off_makes_every_caller_the_default_tenant(tmp_path) -> None:
    from service.migrate import upgrade

    settings = Settings(data_dir=tmp_path, auth="off", reconcile_interval_s=0)
    upgrade(settings.sqlalchemy_url)
    with TestClient(create_app(settings)) as anonymous:
        created = anonymous.post("/v1/keys", json={"name": "x"})
        assert created.status_code == 201 and created.json()["tenant_id"] == "default"
        assert anonymous.get("/v1/runs").status_code == 200
