"""API-key administration over HTTP (scope ``admin``) and ``/v1/whoami`` for any valid key."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Depends, Request, status
from pydantic import BaseModel, Field

from appliance import auth
from appliance.api.deps import AdminKey, StateDep, app_state
from appliance.api.openapi import requires
from appliance.audit import AuditEvent
from appliance.auth import ApiKey, Scope
from appliance.errors import NotFound

router = APIRouter(prefix="/v1", tags=["auth"])


def any_key(request: Request) -> ApiKey:
    key = app_state(request).api_keys.authenticate(request.headers.get("authorization"))
    request.state.api_key = key
    return key


class KeyInfo(BaseModel):
    id: uuid.UUID
    name: str
    prefix: str
    scopes: list[Scope]
    created_at: datetime | None = None
    revoked_at: datetime | None = None

    @classmethod
    def of(cls, key: ApiKey) -> KeyInfo:
        return cls(id=key.id, name=key.name, prefix=key.prefix, scopes=sorted(key.scopes),
                   created_at=key.created_at, revoked_at=key.revoked_at)


class KeyCreate(BaseModel):
    name: str = Field(min_length=1, max_length=100, pattern=r"^[\w .@:-]+$")
    scopes: list[Scope] = Field(min_length=1, max_length=5)


class KeyCreated(KeyInfo):
    token: str = Field(description="The bearer token. Shown once; only its hash is stored.")


@router.get("/whoami", response_model=KeyInfo, summary="The calling API key and its scopes",
            openapi_extra=requires(None))
def whoami(key: Annotated[ApiKey, Depends(any_key)]) -> KeyInfo:
    return KeyInfo.of(key)


@router.get("/apikeys", response_model=list[KeyInfo], summary="List API keys (never secrets)")
def list_keys(_: AdminKey, state: StateDep) -> list[KeyInfo]:
    with state.pool.connection() as conn:
        return [KeyInfo.of(k) for k in auth.list_keys(conn)]


@router.post("/apikeys", response_model=KeyCreated, status_code=status.HTTP_201_CREATED,
             summary="Create an API key")
def create_key(body: KeyCreate, caller: AdminKey, state: StateDep, request: Request) -> KeyCreated:
    with state.pool.connection() as conn, conn.transaction():
        key, token = auth.create_key(conn, body.name, sorted({s.value for s in body.scopes}))
        state.audit.record(conn, AuditEvent(
            action="apikey.create", actor=caller.actor, object_id=str(key.id),
            request_id=request.state.request_id, details={"scopes": sorted(key.scopes), "name": key.name}))
    return KeyCreated(**KeyInfo.of(key).model_dump(), token=token)


@router.delete("/apikeys/{key_id}", status_code=status.HTTP_204_NO_CONTENT, summary="Revoke an API key")
def revoke_key(key_id: uuid.UUID, caller: AdminKey, state: StateDep, request: Request) -> None:
    with state.pool.connection() as conn, conn.transaction():
        if auth.revoke_key(conn, str(key_id)) is None:
            raise NotFound(f"no active API key {key_id}")
        state.audit.record(conn, AuditEvent(action="apikey.revoke", actor=caller.actor,
                                                 object_id=str(key_id), request_id=request.state.request_id))
