"""/v1/keys: the caller's tenant's API keys (the first key comes from `mcdrop keys create`)."""

from __future__ import annotations

import uuid

from fastapi import APIRouter

from service.api.deps import CurrentTenant, SessionDep
from service.auth import service as auth
from service.auth.schemas import KeyCreate, KeyCreated, KeyList, KeyRead

router = APIRouter(prefix="/v1/keys", tags=["keys"])


@router.post("", status_code=201, response_model=KeyCreated)
def create_key(data: KeyCreate, session: SessionDep, tenant: CurrentTenant) -> KeyCreated:
    """A new key for the caller's tenant. The secret is in this response only; it is stored hashed."""
    return auth.create_key(session, tenant, data.name)


@router.get("", response_model=KeyList)
def list_keys(session: SessionDep, tenant: CurrentTenant) -> KeyList:
    """The tenant's keys (never their secrets)."""
    return KeyList(items=auth.list_keys(session, tenant))


@router.post("/{key_id}/revoke", response_model=KeyRead,
             responses={404: {"description": "no such key"}, 409: {"description": "already revoked"}})
def revoke_key(key_id: uuid.UUID, session: SessionDep, tenant: CurrentTenant) -> KeyRead:
    """Revoke a key: it stops working within `MCDROP_AUTH_CACHE_S` seconds on every replica."""
    return auth.revoke_key(session, key_id, tenant)
