"""API-key administration over HTTP (scope ``admin``) and ``/v1/whoami`` for any valid key."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Depends, Request, status
from pydantic import BaseModel, Field

from appliance import auth
from appliance.api.deps import AdminKey, StateDep
from appliance.auth import ApiKey, Scope
from appliance.errors import NotFound

router = APIRouter(prefix="/v1", tags=["auth"])


def any_key(request: Request) -> ApiKey:
    key = request.app.state.appliance.api_keys.authenticate(request.headers.get("authorization"))
    request.state.api_key = key
    return key  # type: ignore[no-any-return]


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


@router.get("/whoami", response_model=KeyInfo, summary="The calling API key and its scopes")
def whoami(key: Annotated[ApiKey, Depends(any_key)]) -> KeyInfo:
    return KeyInfo.of(key)


@router.get("/apikeys", response_model=list[KeyInfo], summary="List API keys (never secrets)")
def list_keys(_: AdminKey, state: StateDep) -> list[KeyInfo]:
    return [KeyInfo.of(k) for k in auth.list_keys(state.pool)]


@router.post("/apikeys", response_model=KeyCreated, status_code=status.HTTP_201_CREATED,
             summary="Create an API key")
def create_key(body: KeyCreate, _: AdminKey, state: StateDep) -> KeyCreated:
    key, token = auth.create_key(state.pool, body.name, sorted({s.value for s in body.scopes}))
    return KeyCreated(**KeyInfo.of(key).model_dump(), token=token)


@router.delete("/apikeys/{key_id}", status_code=status.HTTP_204_NO_CONTENT, summary="Revoke an API key")
def revoke_key(key_id: uuid.UUID, _: AdminKey, state: StateDep) -> None:
    if not auth.revoke_key(state.pool, str(key_id)):
        raise NotFound(f"no active API key {key_id}")


def register(app) -> None:  # type: ignore[no-untyped-def]
    app.include_router(router)
