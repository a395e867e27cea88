"""FastAPI dependencies: the process state and the API-key check per scope."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated

from fastapi import Depends, Header, Request

from appliance.api.state import AppState
from appliance.auth import ApiKey, Scope, require


def get_state(request: Request) -> AppState:
    return request.app.state.appliance  # type: ignore[no-any-return]


def authorized(scope: Scope) -> Callable[..., ApiKey]:
    """A dependency that authenticates the bearer key (cached) and checks one scope."""

    def dependency(
        request: Request,
        authorization: Annotated[str | None, Header(include_in_schema=False)] = None,
    ) -> ApiKey:
        state: AppState = request.app.state.appliance
        key = state.api_keys.authenticate(authorization)
        require(key, scope)
        request.state.api_key = key
        return key

    dependency.__name__ = f"require_{scope.value}"
    return dependency


StateDep = Annotated[AppState, Depends(get_state)]
MatchKey = Annotated[ApiKey, Depends(authorized(Scope.MATCH))]
EnrollKey = Annotated[ApiKey, Depends(authorized(Scope.ENROLL))]
MediaKey = Annotated[ApiKey, Depends(authorized(Scope.MEDIA))]
AuditKey = Annotated[ApiKey, Depends(authorized(Scope.AUDIT))]
AdminKey = Annotated[ApiKey, Depends(authorized(Scope.ADMIN))]
