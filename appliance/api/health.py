"""Liveness, readiness (each backing server checked on its own thread, in parallel, with a deadline) and metrics."""

from __future__ import annotations

import asyncio
import contextvars
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, Gauge, generate_latest
from pydantic import BaseModel

from appliance.api.deps import StateDep
from appliance.api.state import AppState
from appliance.db.pool import BoundedConnection, connect_bounded

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


class _PostgresCheck:
    """``SELECT 1`` on a connection of its own, not the pool's: requests stuck on another frozen server
    (media deletes hold their transaction while S3 answers) can exhaust the pool, and PostgreSQL
    must not look down for it. Request bounds (``appliance.db.pool``), reconnects after a failure."""

    def __init__(self) -> None:
        self._conn: BoundedConnection | None = None

    def __call__(self, state: AppState) -> None:
        conn = self._conn
        if conn is None or conn.closed:
            conn = self._conn = connect_bounded(state.settings)
            conn.autocommit = True  # idle between polls, never idle in a transaction
        try:
            conn.execute("SELECT 1")
        except BaseException:
            conn.close()
            self._conn = None
            raise


def _redis(state: AppState) -> None:
    state.redis.ping()


def _s3(state: AppState) -> None:
    state.s3.bucket_exists(state.settings.s3_bucket)


def _vault(state: AppState) -> None:
    state.keys.health()


class _Probe:
    """One dependency's check on a thread of its own, at most one in flight.

    The checks used to share the event loop's default executor (cores + 4 threads): checks of a
    frozen S3 piled up there until Vault's queued behind them and timed out too. Now a stuck check
    holds only its own thread, and later polls wait on that same check instead of adding more."""

    def __init__(self, name: str, check: Callable[[AppState], None]) -> None:
        self.name = name
        self._check = check
        self._lock = threading.Lock()
        self._running: Future[None] | None = None
        self._started = 0.0

    def start(self, state: AppState) -> tuple[Future[None], float]:
        """The check in flight (started now if none is); and when it started."""
        with self._lock:
            if self._running is None or self._running.done():
                future: Future[None] = Future()
                context = contextvars.copy_context()  # the request's database bounds

                def run() -> None:
                    try:
                        context.run(self._check, state)
                    except BaseException as exc:
                        future.set_exception(exc)
                    else:
                        future.set_result(None)

                threading.Thread(target=run, name=f"readyz-{self.name}", daemon=True).start()
                self._running, self._started = future, time.monotonic()
            return self._running, self._started


def _probes(state: AppState) -> dict[str, _Probe]:
    found = state.extras.get("readiness")
    if found is None:
        checks: dict[str, Callable[[AppState], None]] = {
            "postgres": _PostgresCheck(), "redis": _redis, "s3": _s3, "vault": _vault,
        }
        found = state.extras["readiness"] = {name: _Probe(name, check) for name, check in checks.items()}
    return found  # type: ignore[no-any-return]


async def _run(probe: _Probe, state: AppState) -> DependencyCheck:
    start = time.perf_counter()
    running, started = probe.start(state)
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
    probes = _probes(state)
    results = await asyncio.gather(*(_run(probe, state) for probe in probes.values()))
    checks = dict(zip(probes, results, strict=True))
    ready = all(c.ok for c in checks.values())
    body = Readiness(status="ok" if ready else "unavailable", checks=checks)
    return JSONResponse(body.model_dump(), status_code=200 if ready else 503)


@router.get("/metrics", summary="Prometheus metrics", response_class=Response,
            responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}})
async def metrics() -> Response:
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
