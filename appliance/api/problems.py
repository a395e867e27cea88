"""Every error leaves the API as ``application/problem+json`` (RFC 9457), mapped here and only here."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from appliance.errors import ApplianceError, DependencyUnavailable
from appliance.logs import get_logger

log = get_logger(__name__)
PROBLEM = "application/problem+json"
TYPE_BASE = "https://appliance.invalid/problems/"


def problem_document(status: int, title: str, detail: str, slug: str, path: str, request_id: str | None,
                     **extra: Any) -> dict[str, Any]:
    """The RFC 9457 body; shared by the routed API and the raw ASGI match handler."""
    return {"type": TYPE_BASE + slug, "title": title, "status": status, "detail": detail, "instance": path,
            "request_id": request_id, **extra}


def problem_headers(status: int) -> dict[str, str] | None:
    if status == 401:
        return {"WWW-Authenticate": "Bearer"}
    if status == 503:
        return {"Retry-After": "1"}
    return None


def problem(status: int, title: str, detail: str, slug: str, request: Request, headers: dict[str, str] | None = None,
            **extra: Any) -> JSONResponse:
    body = problem_document(status, title, detail, slug, request.url.path,
                            getattr(request.state, "request_id", None), **extra)
    return JSONResponse(body, status_code=status, media_type=PROBLEM,
                        headers={**(problem_headers(status) or {}), **(headers or {})} or None)


_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


def allowed_methods(request: Request) -> str:
    """The ``Allow`` value of a 405: each method some route fully matches for this path. The router's
    own value names only the first route that matched the path, and ``/v1/subjects/{id}`` has one
    route per method. Probing through ``BaseRoute.matches`` works however the routes are nested."""
    routes = request.app.router.routes
    return ", ".join(m for m in _METHODS
                     if any(route.matches({**request.scope, "method": m})[0] == Match.FULL for route in routes))


def _validation_errors(exc: RequestValidationError) -> list[dict[str, Any]]:
    # Never echo the offending input back: it may be a biometric vector.
    return [{"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
            for e in exc.errors()[:20]]


def install(app: FastAPI) -> None:
    @app.exception_handler(ApplianceError)
    async def _appliance(request: Request, exc: ApplianceError) -> JSONResponse:
        return problem(exc.status, exc.title, exc.detail, exc.type_slug, request, **exc.extra)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return problem(422, "Unprocessable content", "the request did not validate", "validation",
                       request, errors=_validation_errors(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        slug = {404: "not-found", 405: "method-not-allowed"}.get(exc.status_code, "http")
        headers = dict(exc.headers or {})
        if exc.status_code == 405:
            headers["Allow"] = allowed_methods(request)
        return problem(exc.status_code, str(exc.detail), str(exc.detail), slug, request, headers=headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        # Starlette runs this handler outside every middleware, so RequestContext cannot add the id header.
        rid = getattr(request.state, "request_id", None)
        headers = {"X-Request-Id": rid} if rid else None
        mapped = map_dependency_error(exc)
        if mapped is not None:
            log.warning("dependency_unavailable", error=type(exc).__name__, path=request.url.path)
            return problem(503, mapped.title, mapped.detail, mapped.type_slug, request, headers=headers)
        log.error("unhandled_error", error=type(exc).__name__, path=request.url.path)
        return problem(500, "Internal error", "an unexpected error occurred; see the request id in logs",
                       "internal", request, headers=headers)


def map_dependency_error(exc: Exception) -> DependencyUnavailable | None:
    """Backing-server failures become 503 so callers retry instead of treating them as bugs."""
    import psycopg
    import psycopg_pool
    import redis
    import urllib3

    try:
        from crypto.errors import KeyProviderUnavailable
    except ImportError:  # pragma: no cover - crypto always ships with the appliance
        KeyProviderUnavailable = ()  # type: ignore[assignment]
    if isinstance(exc, psycopg.OperationalError | psycopg_pool.PoolTimeout):
        return DependencyUnavailable("PostgreSQL is unavailable")
    if isinstance(exc, redis.ConnectionError | redis.TimeoutError):
        return DependencyUnavailable("Redis is unavailable")
    if isinstance(exc, urllib3.exceptions.HTTPError):
        return DependencyUnavailable("the object store is unavailable")
    if KeyProviderUnavailable and isinstance(exc, KeyProviderUnavailable):
        return DependencyUnavailable("the key provider (Vault) is unavailable")
    return None
