"""Every error leaves the API as ``application/problem+json`` (RFC 9457), mapped here and only here.

``problem_of`` is the one map from an exception to a problem: the exception handlers installed on the
application use it, and so does the request-context middleware (413).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import psycopg
import psycopg_pool
import redis
import urllib3
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from appliance import errors
from appliance.errors import ApplianceError, DependencyUnavailable
from appliance.logs import get_logger
from crypto.errors import KeyProviderUnavailable
from media.errors import MediaError
from vector.errors import IndexNotReady, InvalidVector, UnknownModel, VectorError

log = get_logger(__name__)
PROBLEM = "application/problem+json"
TYPE_BASE = "https://appliance.invalid/problems/"


@dataclass(frozen=True)
class Problem:
    status: int
    title: str
    detail: str
    slug: str
    extra: dict[str, Any] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)

    def document(self, path: str, request_id: str | None) -> dict[str, Any]:
        """The RFC 9457 body."""
        return {"type": TYPE_BASE + self.slug, "title": self.title, "status": self.status, "detail": self.detail,
                "instance": path, "request_id": request_id, **self.extra}

    def body(self, path: str, request_id: str | None) -> bytes:
        return json.dumps(self.document(path, request_id), separators=(",", ":")).encode()

    def header_list(self) -> list[tuple[bytes, bytes]]:
        """Content type and the status's own headers, as raw ASGI headers."""
        return [(b"content-type", PROBLEM.encode()),
                *((k.lower().encode(), v.encode()) for k, v in self.headers.items())]


def _status_headers(status: int) -> dict[str, str]:
    if status == 401:
        return {"WWW-Authenticate": "Bearer"}
    if status == 503:
        return {"Retry-After": "1"}
    return {}


def _of_error(cls: type[ApplianceError], detail: str, **extra: Any) -> Problem:
    return Problem(cls.status, cls.title, detail, cls.type_slug, extra, _status_headers(cls.status))


# media.errors by status, onto the appliance's problem types (same titles and slugs as appliance.errors).
_MEDIA_STATUS = {cls.status: cls for cls in (
    errors.NotFound, errors.Conflict, errors.Gone, errors.PayloadTooLarge, errors.UnsupportedMediaType,
    errors.Unprocessable, errors.DependencyUnavailable,
)}


def problem_of(exc: Exception, path: str) -> Problem:
    """The problem ``exc`` answers as. Unexpected errors are logged here (the body never says more)."""
    if isinstance(exc, ApplianceError):
        return Problem(exc.status, exc.title, exc.detail, exc.type_slug, exc.extra, _status_headers(exc.status))
    if isinstance(exc, InvalidVector | UnknownModel):  # the caller's input
        return _of_error(errors.Unprocessable, str(exc))
    if isinstance(exc, IndexNotReady):  # still warming: retry
        return _of_error(errors.DependencyUnavailable, str(exc))
    if isinstance(exc, MediaError):
        return _media(exc)
    if isinstance(exc, RequestValidationError):
        return Problem(422, "Unprocessable content", "the request did not validate", "validation",
                       {"errors": _validation_errors(exc)})
    if isinstance(exc, StarletteHTTPException):
        slug = {404: "not-found", 405: "method-not-allowed"}.get(exc.status_code, "http")
        return Problem(exc.status_code, str(exc.detail), str(exc.detail), slug,
                       headers={**_status_headers(exc.status_code), **(exc.headers or {})})
    mapped = _dependency_error(exc)
    if mapped is not None:
        log.warning("dependency_unavailable", error=type(exc).__name__, path=path)
        return _of_error(errors.DependencyUnavailable, mapped.detail)
    log.error("unhandled_error", error=type(exc).__name__, path=path)
    return Problem(500, "Internal error", "an unexpected error occurred; see the request id in logs", "internal")


def _media(exc: MediaError) -> Problem:
    if exc.status == 416:
        return Problem(416, "Range not satisfiable", str(exc), "range-not-satisfiable")
    cls = _MEDIA_STATUS.get(exc.status)
    if cls is None:
        log.error("media_error", error=type(exc).__name__, detail=str(exc))
        return Problem(500, "Internal error", "media could not be processed; see the request id in logs", "internal")
    return _of_error(cls, str(exc))


def _validation_errors(exc: RequestValidationError) -> list[dict[str, Any]]:
    # Never echo the offending input back: it may be a biometric vector.
    return [{"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
            for e in exc.errors()[:20]]


_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


def allowed_methods(request: Request) -> str:
    """The ``Allow`` value of a 405: each method some route fully matches for this path. The router's
    own value names only the first route that matched the path, and ``/v1/subjects/{id}`` has one
    route per method. Probing through ``BaseRoute.matches`` works however the routes are nested."""
    routes = request.app.router.routes
    return ", ".join(m for m in _METHODS
                     if any(route.matches({**request.scope, "method": m})[0] == Match.FULL for route in routes))


def problem_response(request: Request, exc: Exception, headers: dict[str, str] | None = None) -> Response:
    """``exc`` as a problem response to ``request``."""
    p = problem_of(exc, request.url.path)
    extra = dict(headers or {})
    if p.status == 405:
        extra["Allow"] = allowed_methods(request)
    return Response(p.body(request.url.path, getattr(request.state, "request_id", None)), p.status,
                    headers={**p.headers, **extra}, media_type=PROBLEM)


async def _handled(request: Request, exc: Exception) -> Response:
    return problem_response(request, exc)


async def _escaped(request: Request, exc: Exception) -> Response:
    # Starlette runs the handler of ``Exception`` outside every middleware, so RequestContext cannot add
    # the id header to this response: it is added here.
    rid = getattr(request.state, "request_id", None)
    return problem_response(request, exc, {"X-Request-Id": rid} if rid else None)


def install(app: FastAPI) -> None:
    for kind in (ApplianceError, VectorError, MediaError, RequestValidationError, StarletteHTTPException):
        app.add_exception_handler(kind, _handled)
    app.add_exception_handler(Exception, _escaped)


def _dependency_error(exc: Exception) -> DependencyUnavailable | None:
    """Backing-server failures become 503 so callers retry instead of treating them as bugs."""
    if isinstance(exc, psycopg.OperationalError | psycopg_pool.PoolTimeout):
        return DependencyUnavailable("PostgreSQL is unavailable")
    if isinstance(exc, redis.ConnectionError | redis.TimeoutError):
        return DependencyUnavailable("Redis is unavailable")
    if isinstance(exc, urllib3.exceptions.HTTPError):
        return DependencyUnavailable("the object store is unavailable")
    if isinstance(exc, KeyProviderUnavailable):
        return DependencyUnavailable("the key provider (Vault) is unavailable")
    return None
