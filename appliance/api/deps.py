"""FastAPI dependencies: the process state and the API-key check per scope."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated

from fastapi import Depends, Header, Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.applications import Starlette

from appliance.auth import ApiKey, Scope, require
from appliance.db.pool import serve_requests
from appliance.errors import DependencyUnavailable
from appliance.state import AppState


def state_of(app: Starlette) -> AppState | None:
    """The process's state, once the application's lifespan has built it (the one place it is kept)."""
    return getattr(app.state, "appliance", None)


async def get_state(request: Request) -> AppState:
    """``async`` so FastAPI calls it on the event loop: a sync dependency costs a thread-pool hop.

    Also marks the request's context, so its database waits get the request bounds (``appliance.db.pool``)."""
    serve_requests()
    return app_state(request)


def app_state(request: Request) -> AppState:
    """The process's state; 503 before the lifespan has built it."""
    state = state_of(request.app)
    if state is None:
        raise DependencyUnavailable("the service is starting")
    return state


def _check(request: Request, authorization: str | None, scope: Scope) -> ApiKey:
    serve_requests()  # before authenticate: a key unseen since the last refresh is looked up in PostgreSQL
    key = app_state(request).api_keys.authenticate(authorization)
    require(key, scope)
    request.state.api_key = key
    return key


# The API keys as an OpenAPI security scheme: FastAPI lists it, with the scope, on each operation that
# depends on ``authorized(scope)``. ``auto_error=False``: it only declares; ``_check`` decides.
BEARER = HTTPBearer(
    scheme_name="apiKey", bearerFormat="apl_<prefix>_<secret>", auto_error=False,
    description="An API key (`appliance apikey create`, or `POST /v1/apikeys`). Each operation's security "
    "requirement names the scope it needs: `match`, `enroll`, `media`, `audit` or `admin`; `admin` implies "
    "every other scope, and an empty list means any valid key.",
)


def authorized(scope: Scope) -> Callable[..., Awaitable[ApiKey]]:
    """A dependency that authenticates the bearer key (cached) and checks one scope.

    ``async``: a cache hit is a dict lookup and a hash compare, cheaper than the thread-pool hop a
    sync dependency costs; it runs before query validation, so a bad key is 401 before any 422."""

    async def dependency(
        request: Request,
        authorization: Annotated[str | None, Header(include_in_schema=False)] = None,
        # A default, not Annotated: annotations are strings here, resolved without this closure's ``scope``.
        _: HTTPAuthorizationCredentials | None = Security(BEARER, scopes=[scope.value]),
    ) -> ApiKey:
        return _check(request, authorization, scope)

    dependency.__name__ = f"require_{scope.value}"
    return dependency


StateDep = Annotated[AppState, Depends(get_state)]
MatchKey = Annotated[ApiKey, Depends(authorized(Scope.MATCH))]
EnrollKey = Annotated[ApiKey, Depends(authorized(Scope.ENROLL))]
MediaKey = Annotated[ApiKey, Depends(authorized(Scope.MEDIA))]
AuditKey = Annotated[ApiKey, Depends(authorized(Scope.AUDIT))]
AdminKey = Annotated[ApiKey, Depends(authorized(Scope.ADMIN))]
