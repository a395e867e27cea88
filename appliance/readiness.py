"""Is each backing server answering? One probe per server, each on a thread of its own (``GET /readyz``)."""

from __future__ import annotations

import contextvars
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future

from minio import Minio
from redis import Redis

from appliance.db.pool import BoundedConnection, connect_bounded
from appliance.settings import Settings
from crypto.providers.base import KeyProvider


class _PostgresCheck:
    """``SELECT 1`` on a connection of its own, not the pool's: requests stuck on another frozen server
    (media deletes hold their transaction while S3 answers) can exhaust the pool, and PostgreSQL
    must not look down for it. Request bounds (``appliance.db.pool``), reconnects after a failure."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._conn: BoundedConnection | None = None

    def __call__(self) -> None:
        conn = self._conn
        if conn is None or conn.closed:
            conn = self._conn = connect_bounded(self.settings)
            conn.autocommit = True  # idle between polls, never idle in a transaction
        try:
            conn.execute("SELECT 1")
        except BaseException:
            conn.close()
            self._conn = None
            raise


class Probe:
    """One dependency's check on a thread of its own, at most one in flight.

    The checks used to share the event loop's default executor (cores + 4 threads): checks of a
    frozen S3 piled up there until Vault's queued behind them and timed out too. Now a stuck check
    holds only its own thread, and later polls wait on that same check instead of adding more."""

    def __init__(self, name: str, check: Callable[[], object]) -> None:
        self.name = name
        self._check = check
        self._lock = threading.Lock()
        self._running: Future[None] | None = None
        self._started = 0.0

    def start(self) -> tuple[Future[None], float]:
        """The check in flight (started now if none is); and when it started."""
        with self._lock:
            if self._running is None or self._running.done():
                future: Future[None] = Future()
                context = contextvars.copy_context()  # the request's database bounds

                def run() -> None:
                    try:
                        context.run(self._check)
                    except BaseException as exc:
                        future.set_exception(exc)
                    else:
                        future.set_result(None)

                threading.Thread(target=run, name=f"readyz-{self.name}", daemon=True).start()
                self._running, self._started = future, time.monotonic()
            return self._running, self._started


class Readiness:
    """The probes of PostgreSQL, Redis, the object store and the key provider (logged in lazily)."""

    def __init__(self, settings: Settings, redis: Redis, s3: Minio, keys: Callable[[], KeyProvider]) -> None:
        checks: dict[str, Callable[[], object]] = {
            "postgres": _PostgresCheck(settings),
            "redis": lambda: redis.ping(),
            "s3": lambda: s3.bucket_exists(settings.s3_bucket),
            "vault": lambda: keys().health(),
        }
        self.probes = {name: Probe(name, check) for name, check in checks.items()}
