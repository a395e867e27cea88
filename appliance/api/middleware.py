"""A plain ASGI middleware (cheaper than BaseHTTPMiddleware on the hot path) for request ids,
per-route latency metrics, access logs and the request body cap."""

from __future__ import annotations

import json
import re
import time
import uuid
from typing import Any

import structlog
from prometheus_client import Counter, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from appliance.api.problems import problem_document
from appliance.logs import get_logger

log = get_logger("appliance.access")
REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:-]{8,64}$")

REQUESTS = Counter("appliance_http_requests_total", "HTTP requests", ["method", "route", "status"])
LATENCY = Histogram(
    "appliance_http_request_seconds",
    "HTTP request latency",
    ["method", "route"],
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)


class BodyTooLarge(Exception):
    """Raised from ``receive`` when a streamed body passes its cap."""


class RequestContext:
    def __init__(
        self,
        app: ASGIApp,
        max_body_bytes: int,
        body_limits: dict[str, int] | None = None,
        quiet_paths: tuple[str, ...] = (),
    ) -> None:
        self.app = app
        self.max_body = max_body_bytes
        self.body_limits = sorted((body_limits or {}).items(), key=lambda kv: -len(kv[0]))
        self.quiet = quiet_paths

    def limit_for(self, path: str) -> int:
        for prefix, limit in self.body_limits:
            if path.startswith(prefix):
                return limit
        return self.max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        rid = headers.get(b"x-request-id", b"").decode("latin-1")
        if not REQUEST_ID_RE.match(rid):
            rid = uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = rid
        structlog.contextvars.bind_contextvars(request_id=rid)
        start = time.perf_counter()
        status = 500
        limit = self.limit_for(scope["path"])
        declared = headers.get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            await _too_large(scope, send, rid, limit)
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

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message.setdefault("headers", []).append((b"x-request-id", rid.encode()))
            await send(message)

        try:
            await self.app(scope, receive_capped, send_wrapper)
        except BodyTooLarge:
            status = 413
            await _too_large(scope, send, rid, limit)
        finally:
            self._record(scope, status, start)

    def _record(self, scope: Scope, status: int, start: float) -> None:
        elapsed = time.perf_counter() - start
        route = _route(scope)
        method = scope["method"]
        REQUESTS.labels(method, route, str(status)).inc()
        LATENCY.labels(method, route).observe(elapsed)
        if scope["path"] not in self.quiet:
            log.info("request", method=method, route=route, status=status, ms=round(elapsed * 1000, 3))
        structlog.contextvars.unbind_contextvars("request_id")


async def _too_large(scope: Scope, send: Send, rid: str, limit: int) -> None:
    body = json.dumps(problem_document(413, "Payload too large", f"request body exceeds {limit} bytes",
                                       "payload-too-large", scope["path"], rid)).encode()
    await send({"type": "http.response.start", "status": 413, "headers": [
        (b"content-type", b"application/problem+json"),
        (b"content-length", str(len(body)).encode()),
        (b"x-request-id", rid.encode()),
        (b"connection", b"close"),
    ]})
    await send({"type": "http.response.body", "body": body})


def _route(scope: dict[str, Any]) -> str:
    """The route template (``/v1/subjects/{subject_id}``), never the raw path: bounded label set."""
    route = scope.get("route")
    return getattr(route, "path", "unmatched")
