"""The FastAPI application: every router, middleware and service it runs, named here in the order they act.

Routers stay thin, errors map in one place (``api.problems``), and the process's services live on one
typed ``AppState`` (``app.state.appliance``), built and started in the lifespan, stopped at its end.
"""

from __future__ import annotations

import gc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from appliance import __version__
from appliance.api import audit, enrol, gdpr, health, keys, match, media, models, openapi, problems, subjects, visits
from appliance.api.middleware import DenialAudit, RequestContext
from appliance.calibration import ThresholdRefresher
from appliance.gdpr.erasure import resume_in_background
from appliance.gdpr.upgrade import upgrade_in_background
from appliance.logs import configure_logging, get_logger
from appliance.matching import IndexService, ServiceConfig
from appliance.settings import Settings, get_settings
from appliance.state import AppState, media_limits
from media.errors import StoreUnavailable

log = get_logger(__name__)
MULTIPART_SLACK = 1024 * 1024  # boundaries and form fields around an uploaded file
TAGS = ("operations", "auth", "models", "subjects", "enrolment", "match", "media", "audit", "gdpr")  # OpenAPI sections


def _settle_gc() -> None:
    """Move the start-up heap out of the cyclic collector's view and collect young objects less often.

    The match path allocates only short-lived, acyclic objects (freed by reference counting); full
    collections over the long-lived heap (indexes' metadata, pools, modules) were p99 outliers."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 20, 20)


def _start(state: AppState) -> None:
    """Start the process's services: key cache, audit trail, hot indexes, media bucket, unfinished GDPR work."""
    state.api_keys.start()
    audit_log = state.audit  # created now, not on the first match
    state.matcher = IndexService(state.settings, state.pool, state.redis, lambda: state.keys,
                                 ServiceConfig.from_settings(state.settings))
    state.matcher.start()
    state.thresholds = ThresholdRefresher(state.pool, state.matcher,
                                          {m: spec.threshold for m, spec in state.settings.models.items()},
                                          state.settings.model_threshold_refresh_interval)
    state.thresholds.start()
    try:  # the versioned bucket now if S3 answers; otherwise the first upload retries it
        state.media.ensure_bucket()
    except StoreUnavailable as exc:
        log.warning("media_bucket_not_ready", error=str(exc))
    try:
        audit_log.ensure_partitions(int(state.settings.audit_partitions_ahead))
    except Exception as exc:  # PostgreSQL may be down at start; the default partition catches rows meanwhile
        log.warning("audit: could not ensure partitions", error=str(exc))
    audit_log.start()
    state.visits.start()  # its first batch creates the day partitions it needs
    upgrade_in_background(state)
    resume_in_background(state)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    configure_logging(settings.log_level, settings.log_json)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state = AppState.build(settings)
        app.state.appliance = state
        _start(state)
        _settle_gc()
        log.info("started", port=settings.port, key_provider=settings.key_provider)
        try:
            yield
        finally:
            state.close(checkpoint=True)  # drains the audit queue and signs the chain heads
            log.info("stopped")

    app = FastAPI(
        title="Edge biometric storage appliance",
        version=__version__,
        lifespan=lifespan,
        description="Sealed face templates, millisecond matching, audited access, provable erasure.",
        openapi_tags=[{"name": tag} for tag in TAGS],
    )
    problems.install(app)
    # The router tries routes in this order: the match routes, the hot path, come first. The document
    # lists its sections in the order of ``TAGS``.
    for router in (match.router, health.router, keys.router, models.router, subjects.router, enrol.router,
                   media.router, audit.router, visits.router, gdpr.router):
        app.include_router(router)
    openapi.install(app)
    # Middlewares, innermost first (each add wraps the previous ones).
    app.add_middleware(DenialAudit)
    app.add_middleware(
        RequestContext,
        max_body_bytes=settings.max_body_bytes,
        body_limits={"/v1/encodings:bulk": settings.bulk_max_body_bytes,
                     "/v1/media": media_limits(settings).largest + MULTIPART_SLACK},
        quiet_paths=("/healthz", "/readyz", "/metrics"),
        quiet_success_paths=() if settings.access_log_matches else ("/v1/match", "/v1/match:batch"),
    )
    return app
