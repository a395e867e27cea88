"""The FastAPI application: routers stay thin, errors map in one place, state lives on app.state."""

from __future__ import annotations

import gc
import importlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from appliance import __version__
from appliance.api import health, openapi, problems
from appliance.api.middleware import RequestContext
from appliance.api.state import AppState
from appliance.audit.log import audit_log
from appliance.logs import configure_logging, get_logger
from appliance.settings import Settings, get_settings

log = get_logger(__name__)


def _settle_gc() -> None:
    """Move the start-up heap out of the cyclic collector's view and collect young objects less often.

    The match path allocates only short-lived, acyclic objects (freed by reference counting); full
    collections over the long-lived heap (indexes' metadata, pools, modules) were p99 outliers."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 20, 20)


class ApplianceAPI(FastAPI):
    """FastAPI plus a dispatch table of raw ASGI handlers that run before routing and middleware.

    Only the hot match endpoints use it (``app.state.fast_routes``, filled by their feature module);
    their FastAPI routes stay as the documented definition and the fallback when it is switched off.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        # (method, path) -> raw ASGI handler, set by features (the match path). The same dict is
        # app.state.fast_routes; this attribute spares every request a State.__getattr__ call.
        self.fast_routes: dict[tuple[str, str], ASGIApp] = {}
        self.state.fast_routes = self.fast_routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            handler: ASGIApp | None = self.fast_routes.get((scope["method"], scope["path"]))
            if handler is not None:
                await handler(scope, receive, send)
                return
            send = self._audit_denials(scope, send)
        await super().__call__(scope, receive, send)

    def _audit_denials(self, scope: Scope, send: Send) -> Send:
        """Every 401 and 403 the routes answer, wherever raised, counted for the audit trail
        (aggregated: ``appliance.audit.denied``). The fast match door counts its own."""

        async def watched(message: Message) -> None:
            if message["type"] == "http.response.start" and message["status"] in (401, 403):
                state = getattr(self.state, "appliance", None)
                if state is not None:
                    auth = dict(scope["headers"]).get(b"authorization")
                    route = getattr(scope.get("route"), "path", "unmatched")  # the template: a bounded set
                    audit_log(state).deny(scope["method"], route, message["status"],
                                          None if auth is None else auth.decode("latin-1"), state.api_keys)
            await send(message)

        return watched


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    configure_logging(settings.log_level, settings.log_json)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state = AppState.build(settings)
        app.state.appliance = state
        state.api_keys.start()
        for hook in app.state.startup_hooks:
            hook(state)
        _settle_gc()
        log.info("started", port=settings.port, key_provider=settings.key_provider)
        try:
            yield
        finally:
            for hook in reversed(app.state.shutdown_hooks):
                hook(state)
            state.close()
            log.info("stopped")

    app = ApplianceAPI(
        title="Edge biometric storage appliance",
        version=__version__,
        lifespan=lifespan,
        description="Sealed face templates, millisecond matching, audited access, provable erasure.",
    )
    app.state.settings = settings  # features size their body limits from it in register()
    app.state.startup_hooks = []
    app.state.shutdown_hooks = []
    app.state.body_limits = {}  # path prefix -> max request bytes, set by features (e.g. media uploads)
    problems.install(app)
    app.include_router(health.router)
    for register in _feature_routers():
        register(app)
    openapi.install(app)
    app.add_middleware(
        RequestContext,
        max_body_bytes=settings.max_body_bytes,
        body_limits=app.state.body_limits,
        quiet_paths=("/healthz", "/readyz", "/metrics"),
    )
    return app


# Feature modules under appliance/api/, in the order their routes appear in the OpenAPI document.
# Each exposes ``register(app)`` (routers, startup/shutdown hooks, body limits).
FEATURES = ("keys", "subjects", "enrol", "match", "media", "audit", "gdpr")


def _feature_routers() -> list:  # type: ignore[type-arg]
    registers = []
    for name in FEATURES:
        try:
            module = importlib.import_module(f"appliance.api.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"appliance.api.{name}":
                continue  # feature not built into this version
            raise
        registers.append(module.register)
    return registers
