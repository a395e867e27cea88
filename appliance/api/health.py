"""Liveness, readiness (each backing server checked on its own thread, in parallel, with a deadline) and metrics.

The probes themselves live in ``appliance.readiness``."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, Gauge, generate_latest
from pydantic import BaseModel

from appliance.api.deps import StateDep
from appliance.readiness import Probe

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


async def _run(probe: Probe) -> DependencyCheck:
    start = time.perf_counter()
    running, started = probe.start()
    try:
        # shield: a timeout here must not cancel the check that other polls are waiting on
        await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(running)), timeout=CHECK_TIMEOUT)
        ok, error = True, None
    except TimeoutError:
        ok, error = False, f"no answer for {time.monotonic() - started:.0f}s"
    except Exception as exc:
        ok, error = False, f"{type(exc).__name__}: {str(exc)[:200]}"
    DEPENDENCY_UP.labels(probe.name).set(1 if ok else 0)
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
    probes = state.readiness.probes
    results = await asyncio.gather(*(_run(probe) for probe in probes.values()))
    checks = dict(zip(probes, results, strict=True))
    ready = all(c.ok for c in checks.values())
    body = Readiness(status="ok" if ready else "unavailable", checks=checks)
    return JSONResponse(body.model_dump(), status_code=200 if ready else 503)


@router.get("/metrics", summary="Prometheus metrics", response_class=Response,
            responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}})
async def metrics() -> Response:
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
