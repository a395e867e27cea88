"""Liveness, readiness (each backing server checked, in parallel, with a deadline) and metrics."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, Gauge, generate_latest
from pydantic import BaseModel

from appliance.api.deps import StateDep
from appliance.api.state import AppState

router = APIRouter(tags=["operations"])
DEPENDENCY_UP = Gauge("appliance_dependency_up", "1 when the backing server answered", ["dependency"])
CHECK_TIMEOUT = 2.0


class DependencyCheck(BaseModel):
    ok: bool
    latency_ms: float
    error: str | None = None


class Readiness(BaseModel):
    status: str
    checks: dict[str, DependencyCheck]


class Liveness(BaseModel):
    status: str


def _postgres(state: AppState) -> None:
    with state.pool.connection(timeout=CHECK_TIMEOUT) as conn:
        conn.execute("SELECT 1")


def _redis(state: AppState) -> None:
    state.redis.ping()


def _s3(state: AppState) -> None:
    state.s3.bucket_exists(state.settings.s3_bucket)


def _vault(state: AppState) -> None:
    state.keys.health()


CHECKS: dict[str, Callable[[AppState], None]] = {
    "postgres": _postgres,
    "redis": _redis,
    "s3": _s3,
    "vault": _vault,
}


async def _run(name: str, check: Callable[[AppState], None], state: AppState) -> DependencyCheck:
    start = time.perf_counter()
    try:
        await asyncio.wait_for(asyncio.to_thread(check, state), timeout=CHECK_TIMEOUT)
        ok, error = True, None
    except TimeoutError:
        ok, error = False, f"no answer within {CHECK_TIMEOUT:.0f}s"
    except Exception as exc:
        ok, error = False, f"{type(exc).__name__}: {str(exc)[:200]}"
    DEPENDENCY_UP.labels(name).set(1 if ok else 0)
    return DependencyCheck(ok=ok, latency_ms=round((time.perf_counter() - start) * 1000, 2), error=error)


@router.get("/healthz", response_model=Liveness, summary="The process is alive")
async def healthz() -> Liveness:
    return Liveness(status="ok")


@router.get(
    "/readyz",
    response_model=Readiness,
    summary="Every backing server answers",
    responses={503: {"model": Readiness, "description": "at least one dependency is down"}},
)
async def readyz(state: StateDep) -> Any:
    results = await asyncio.gather(*(_run(n, c, state) for n, c in CHECKS.items()))
    checks = dict(zip(CHECKS, results, strict=True))
    ready = all(c.ok for c in checks.values())
    body = Readiness(status="ok" if ready else "unavailable", checks=checks)
    return JSONResponse(body.model_dump(), status_code=200 if ready else 503)


@router.get("/metrics", summary="Prometheus metrics", response_class=Response,
            responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}})
async def metrics() -> Response:
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
