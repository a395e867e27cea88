"""The submitting side of the batched audit trail: chain each event at once, hold it until it is written.

``submit`` hashes the event onto this process's writer chain of its class (``appliance.audit.chain``)
under a lock, so the order of a chain is the order of submission and the writer thread only
packs and COPYs. Hashing here costs the caller a few microseconds per event, paid evenly by each
match instead of in bursts by a thread that would hold the GIL while a match waits for it.

The queue is bounded: it counts records submitted and not yet committed, and at ``limit`` a
submitter waits until the writer has committed some (back-pressure: matches slow down, nothing is
dropped). The wait is counted and logged. ``flush`` waits until what was submitted before it is
committed.
"""

from __future__ import annotations

import threading
import time

from prometheus_client import Counter

from appliance.audit import AuditEvent
from appliance.audit.chain import AUDIT_CLASS, MATCH_CLASS, ChainHead, Record, action_class, append
from appliance.logs import get_logger

log = get_logger(__name__)
BACKPRESSURE = Counter("appliance_audit_backpressure_total", "submit() calls that found the queue full and waited")
REDACTED = Counter("appliance_audit_redacted_total", "Audit events whose details had sensitive keys removed")


def redacted(action: str, removed: list[str]) -> None:
    REDACTED.inc()
    log.warning("audit: sensitive or oversized details removed", action=action, keys=removed[:10])


class AuditQueue:
    """Chained records waiting for the writer: at most ``limit`` of them, in submission order."""

    def __init__(self, chain_base: str, limit: int, batch_max: int) -> None:
        self.heads = {c: ChainHead(f"{chain_base}:{c}", c) for c in (AUDIT_CLASS, MATCH_CLASS)}
        self.limit, self.batch_max = limit, batch_max
        self._pending: list[Record] = []
        self._submitted = 0  # records ever appended here
        self._committed = 0  # of which the writer has committed this many (always a prefix)
        self._closed = False
        self._cond = threading.Condition()
        self.wake = threading.Event()  # set when a batch is full or someone flushes: the writer goes now

    def submit(self, event: AuditEvent, *, wait: bool = True) -> bool:
        """Chain ``event`` and queue it; when ``limit`` records are outstanding, wait for the writer.
        False (nothing queued) once ``close`` was called: the writer is stopping.

        ``wait=False`` is for the writer's own thread (which would wait on itself) and always queues."""
        with self._cond:
            if wait and self._submitted - self._committed >= self.limit and not self._closed:
                self._wait_for_room(event.action)
            if self._closed:
                return False
            self._pending.append(append(self.heads[action_class(event.action)], event, redacted))
            self._submitted += 1
            if len(self._pending) >= self.batch_max:
                self.wake.set()
            return True

    def close(self) -> None:
        """Accept nothing more: what is queued is all the writer has left to write."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def _wait_for_room(self, action: str) -> None:
        """Called with the lock held; ``wait`` releases it while the writer commits."""
        BACKPRESSURE.inc()
        started = time.monotonic()
        warned = False
        while self._submitted - self._committed >= self.limit and not self._closed:
            self.wake.set()
            self._cond.wait(1.0)
            if not warned and time.monotonic() - started > 5:
                log.warning("audit: queue full for 5 s, submitters are waiting (is PostgreSQL down?)",
                            action=action, queued=self._submitted - self._committed)
                warned = True

    def take(self) -> list[Record]:
        """Up to ``batch_max`` records, oldest first; they count against ``limit`` until ``committed``."""
        with self._cond:
            batch, self._pending = self._pending[:self.batch_max], self._pending[self.batch_max:]
            if not self._pending:
                self.wake.clear()
            return batch

    def committed(self, count: int) -> None:
        """The writer committed the ``count`` records it took first: room for submitters, news for flushes."""
        with self._cond:
            self._committed += count
            self._cond.notify_all()

    def flush(self, timeout: float) -> bool:
        """Wait until everything submitted before this call is committed; False on timeout."""
        deadline = time.monotonic() + timeout
        with self._cond:
            target = self._submitted
            while self._committed < target:
                self.wake.set()
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.1))
        return True

    @property
    def depth(self) -> int:
        """Records submitted and not yet committed."""
        return self._submitted - self._committed
