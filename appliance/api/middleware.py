"""Plain ASGI middlewares (cheaper than BaseHTTPMiddleware on the hot path), one concern each; every
request passes through both:

- ``RequestContext``: the request id, the request body cap (413), per-route metrics and the access log;
- ``DenialAudit``: every 401 and 403 counted for the audit trail (aggregated: ``appliance.audit.denied``).
"""

from __future__ import annotations

import os
import re
import time
from typing import Any

import structlog
from prometheus_client import Counter, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from appliance.api.deps import state_of
from appliance.api.problems import problem_of
from appliance.errors import PayloadTooLarge
from appliance.logs import get_logger

log = get_logger("appliance.access")
REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:-]{8,64}$")
SLOW_SECONDS = 0.05  # a quiet route slower than this is logged anyway: the camera pipelines' budget

REQUESTS = Counter("appliance_http_requests_total", "HTTP requests", ["method", "route", "status"])
LATENCY = Histogram(
    "appliance_http_request_seconds",
    "HTTP request latency",
    ["method", "route"],
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
_METRIC_CHILDREN_MAX = 1024  # (method, route, status) triples kept resolved; methods come from clients


class BodyTooLarge(Exception):
    """Raised from ``receive`` when a streamed body passes its cap."""


class RequestContext:
    """Request id (the caller's ``X-Request-Id`` if well formed), body cap, metrics, access log.

    ``quiet_paths`` are never access-logged; ``quiet_success_paths`` only when they fail or are slow
    (each match is in the audit log already)."""

    def __init__(
        self,
        app: ASGIApp,
        max_body_bytes: int,
        body_limits: dict[str, int] | None = None,
        quiet_paths: tuple[str, ...] = (),
        quiet_success_paths: tuple[str, ...] = (),
    ) -> None:
        self.app = app
        self.max_body = max_body_bytes
        self.body_limits = sorted((body_limits or {}).items(), key=lambda kv: -len(kv[0]))
        self.quiet = quiet_paths
        self.quiet_success = quiet_success_paths
        self._metrics: dict[tuple[str, str, int], tuple[Any, Any]] = {}

    def limit_for(self, path: str) -> int:
        for prefix, limit in self.body_limits:
            if path.startswith(prefix):
                return limit
        return self.max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = declared = None
        for name, value in scope["headers"]:
            if name == b"x-request-id":
                rid = value
            elif name == b"content-length":
                declared = value
        rid_text = rid.decode("latin-1") if rid is not None else ""
        if not REQUEST_ID_RE.match(rid_text):
            rid_text = os.urandom(16).hex()  # the shape of uuid4().hex, a third of the cost
        scope.setdefault("state", {})["request_id"] = rid_text
        structlog.contextvars.bind_contextvars(request_id=rid_text)
        start = time.perf_counter()
        status = 500
        limit = self.limit_for(scope["path"])
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            await _too_large(scope, send, rid_text, limit)
            self._record(scope, 413, start)
            return
        seen = 0

        async def receive_capped() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise BodyTooLarge
            return message

        rid_header = (b"x-request-id", rid_text.encode())

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message.setdefault("headers", []).append(rid_header)
            await send(message)

        try:
            await self.app(scope, receive_capped, send_wrapper)
        except BodyTooLarge:
            status = 413
            await _too_large(scope, send, rid_text, limit)
        finally:
            self._record(scope, status, start)

    def _record(self, scope: Scope, status: int, start: float) -> None:
        elapsed = time.perf_counter() - start
        route = _route(scope)
        method = scope["method"]
        metrics = self._metrics.get((method, route, status))
        if metrics is None:
            metrics = (REQUESTS.labels(method, route, str(status)), LATENCY.labels(method, route))
            if len(self._metrics) < _METRIC_CHILDREN_MAX:
                self._metrics[(method, route, status)] = metrics
        metrics[0].inc()
        metrics[1].observe(elapsed)
        path = scope["path"]
        if path not in self.quiet and (status != 200 or elapsed > SLOW_SECONDS or path not in self.quiet_success):
            log.info("request", method=method, route=route, status=status, ms=round(elapsed * 1000, 3))
        structlog.contextvars.unbind_contextvars("request_id")


async def _too_large(scope: Scope, send: Send, rid: str, limit: int) -> None:
    """413 without reading the rest of the body, so the connection closes."""
    problem = problem_of(PayloadTooLarge(f"request body exceeds {limit} bytes"), scope["path"])
    body = problem.body(scope["path"], rid)
    await send({"type": "http.response.start", "status": problem.status, "headers": [
        *problem.header_list(),
        (b"content-length", str(len(body)).encode()),
        (b"x-request-id", rid.encode()),
        (b"connection", b"close"),
    ]})
    await send({"type": "http.response.body", "body": body})


def _route(scope: Scope) -> str:
    """The route template (``/v1/subjects/{subject_id}``), never the raw path: bounded label set."""
    route = scope.get("route")
    return getattr(route, "path", "unmatched")


class DenialAudit:
    """Every 401 and 403, wherever raised, counted for the audit trail (aggregated: ``appliance.audit.denied``)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def watched(message: Message) -> None:
            if message["type"] == "http.response.start" and message["status"] in (401, 403):
                state = state_of(scope["app"])
                if state is not None:
                    auth = dict(scope["headers"]).get(b"authorization")
                    state.audit.deny(scope["method"], _route(scope), message["status"],
                                     None if auth is None else auth.decode("latin-1"), state.api_keys)
            await send(message)

        await self.app(scope, receive, watched)
