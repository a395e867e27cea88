"""The process's audit trail: one object with three ways in.

- ``record(conn, event)`` appends inside the caller's transaction, on a shared transaction chain
  (``appliance.audit.transaction``): the change and its record commit together.
- ``submit(event)`` is for the match path and other reads: the event is chained at once on this
  process's writer chain of its class (``w:<host>:<pid>:<nonce>:<class>``, ``appliance.audit.queue``)
  and committed within ``flush_interval`` by the writer thread (``appliance.audit.writer``).
- ``deny(...)`` counts a refused request; the writer turns the counts into ``auth.denied`` records
  (``appliance.audit.denied``).

It also signs checkpoints of the chain heads every ``checkpoint_interval`` seconds and at shutdown.
"""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from prometheus_client import Gauge
from psycopg import Connection

from appliance.audit import AuditEvent
from appliance.audit.chain import ChainHead
from appliance.audit.checkpoints import write_checkpoints
from appliance.audit.denied import DeniedRequests, caller_of
from appliance.audit.queue import AuditQueue
from appliance.audit.transaction import record_event
from appliance.audit.writer import LOST, BatchWriter
from appliance.logs import get_logger

if TYPE_CHECKING:
    from psycopg_pool import ConnectionPool

    from crypto.providers.base import KeyProvider

__all__ = ["AuditLog", "record_event"]
log = get_logger(__name__)
QUEUE_DEPTH = Gauge("appliance_audit_queue_depth", "Audit events queued and not yet committed")


class AuditLog:
    """``record`` (in-transaction), ``submit`` (queued, batched COPY), ``deny`` (aggregated refusals)."""

    def __init__(
        self,
        pool: ConnectionPool,
        keys: Callable[[], KeyProvider] | None = None,
        *,
        queue_size: int = 100_000,
        batch_max: int = 5_000,
        flush_interval: float = 0.2,
        checkpoint_interval: float = 60.0,
        chain_base: str | None = None,
    ) -> None:
        self.pool = pool
        self.keys = keys
        self.checkpoint_interval = checkpoint_interval
        base = chain_base or f"w:{socket.gethostname()[:60]}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.queue = AuditQueue(base, queue_size, batch_max)
        self.writer = BatchWriter(pool, self.queue, flush_interval, before_batch=self._queue_denials)
        self.denied = DeniedRequests()
        self._started = self._stopped = False
        self._checkpointer: threading.Thread | None = None
        self._stop = threading.Event()
        self._start_lock = threading.Lock()
        _LOGS.add(self)

    @property
    def chains(self) -> dict[str, ChainHead]:
        """This process's writer chains, by class (``audit``, ``match``)."""
        return self.queue.heads

    def record(self, conn: Connection[Any], event: AuditEvent) -> None:
        """Append inside ``conn``'s transaction: the caller's write and this record commit together."""
        record_event(conn, event)

    def submit(self, event: AuditEvent) -> None:
        """Chain and queue ``event``; waits while the queue is full (back-pressure, never a drop)."""
        if not self._started:
            self.start_writer()
        if not self.queue.submit(event):  # the writer is stopping: slow but sure
            self._write_direct(event)

    def deny(self, method: str, route: str, status: int, authorization: str | None, keys: Any = None) -> None:
        """Count a refused request (401/403) for the aggregated ``auth.denied`` records."""
        self.denied.note(method, route, status, caller_of(authorization, status, keys))
        if self._stopped:  # no writer to collect it: written directly
            self._queue_denials(True)

    def _queue_denials(self, everything: bool) -> None:
        """On the writer thread, before each batch: the finished minutes' counts become records."""
        for event in self.denied.take(everything):
            if not self.queue.submit(event, wait=False):
                self._write_direct(event)

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until everything submitted (and every refusal counted) before this call is committed."""
        self._queue_denials(True)
        if not self.writer.running:
            return self.queue.depth == 0
        return self.queue.flush(timeout)

    @property
    def queue_depth(self) -> int:
        return self.queue.depth

    def _write_direct(self, event: AuditEvent) -> None:
        """On a transaction chain, for events that arrive while the writer stops."""
        try:
            with self.pool.connection() as conn:
                record_event(conn, event)
                conn.commit()
        except Exception as exc:  # PostgreSQL down at shutdown: count and say so
            LOST.inc()
            log.error("audit: record lost at shutdown", action=event.action, error=str(exc))

    # --- lifecycle ---------------------------------------------------------------------------------

    def start_writer(self) -> None:
        with self._start_lock:
            if not self._started and not self._stopped:
                self.writer.start()
                self._started = True

    def start(self) -> None:
        """Start the batch writer and the periodic checkpointer (startup hook)."""
        self.start_writer()
        with self._start_lock:
            if self._checkpointer is None and self.keys is not None and self.checkpoint_interval > 0:
                self._checkpointer = threading.Thread(target=self._run_checkpoints, name="audit-checkpoints",
                                                      daemon=True)
                self._checkpointer.start()

    def stop(self, checkpoint: bool = True, timeout: float = 10.0) -> None:
        """Write what is queued, stop the writer and sign a shutdown checkpoint (shutdown hook)."""
        with self._start_lock:
            self._stopped = True
        self._queue_denials(True)
        self.queue.close()  # from here on submit() writes directly
        self._stop.set()
        if self._started:
            self.writer.stop(timeout)
        self._queue_denials(True)  # noted meanwhile: written directly
        if self._checkpointer is not None:
            self._checkpointer.join(timeout)
        if checkpoint and self.keys is not None:
            try:
                self.checkpoint("shutdown")
            except Exception as exc:  # shutdown must go on; the next process signs on its next period
                log.error("audit: shutdown checkpoint failed", error=str(exc))

    def checkpoint(self, kind: str = "periodic") -> int:
        """Sign the head of every chain that moved since its last checkpoint; returns how many."""
        if self.keys is None:
            raise RuntimeError("this AuditLog has no key provider to sign checkpoints with")
        with self.pool.connection() as conn:
            return write_checkpoints(conn, self.keys(), kind)

    def _run_checkpoints(self) -> None:
        last_ensure = time.monotonic()
        while not self._stop.wait(self.checkpoint_interval):
            try:
                self.checkpoint("periodic")
                if time.monotonic() - last_ensure > 86_400:  # keep monthly partitions ahead on long uptimes
                    self.ensure_partitions()
                    last_ensure = time.monotonic()
            except Exception as exc:  # Vault or PostgreSQL down: try again next period
                log.warning("audit: periodic checkpoint failed", error=str(exc))

    def ensure_partitions(self, months_ahead: int = 3) -> None:
        """Create this month's and the next months' partitions (a SECURITY DEFINER function of 0004)."""
        with self.pool.connection() as conn:
            conn.execute("SELECT audit_ensure_partitions(date_trunc('month', now())::date, %s)", (months_ahead + 1,))
            conn.commit()


_LOGS: weakref.WeakSet[AuditLog] = weakref.WeakSet()
QUEUE_DEPTH.set_function(lambda: float(sum(a.queue_depth for a in list(_LOGS))))  # read at scrape time
