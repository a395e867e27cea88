"""The batch writer: one thread per API process that COPYs what ``AuditQueue`` has chained.

Every ``flush_interval`` (sooner when a batch is full or someone flushes) it takes up to
``batch_max`` records and writes them in one transaction: it announces a chain it has not written
before, COPYs the records (match records packed into block rows, see ``appliance.audit.chain``) and
moves each chain's head in ``audit_heads``. A failed transaction is retried with the same records
(never re-hashed) until it commits; the queue counts them until then, so while PostgreSQL is down
submitters wait once ``audit_queue_size`` records are outstanding.

What a crash costs: the records not yet committed, i.e. at most one flush interval of events while
PostgreSQL is up. The chain in the database ends at its last committed record (its head row moved in
the same transaction), so it still verifies; the next process starts a new chain.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from prometheus_client import Counter, Histogram
from psycopg import Connection
from psycopg_pool import ConnectionPool

from appliance.audit import AuditEvent
from appliance.audit.chain import (
    BLOCK_COLUMNS,
    BLOCK_TYPES,
    COPY_COLUMNS,
    COPY_TYPES,
    MATCH_CLASS,
    ZERO_HASH,
    Record,
    block_rows,
)
from appliance.audit.queue import AuditQueue
from appliance.audit.transaction import EVENTS, record_event
from appliance.logs import get_logger

log = get_logger(__name__)
LOST = Counter("appliance_audit_lost_total", "Audit records given up at shutdown because PostgreSQL was unreachable")
WRITE_ERRORS = Counter("appliance_audit_write_errors_total", "Failed batch writes (retried)")
BATCH_SECONDS = Histogram(
    "appliance_audit_batch_seconds", "Time to COPY one batch", buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 2)
)


class BatchWriter:
    """Takes batches from ``queue`` and commits them, in order, on its own thread."""

    def __init__(self, pool: ConnectionPool, queue: AuditQueue, flush_interval: float,
                 before_batch: Callable[[bool], None] | None = None) -> None:
        self.pool, self.queue, self.flush_interval = pool, queue, flush_interval
        self.before_batch = before_batch  # called on the writer thread first (True when stopping)
        self._announced: set[str] = set()
        self._stop = threading.Event()
        self._deadline = float("inf")  # when stopping: give up retrying after this (monotonic)
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="audit-writer", daemon=True)
            self._thread.start()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stop.is_set()

    def stop(self, timeout: float) -> None:
        """Write everything queued, then end the thread; retries stop after ``timeout`` seconds."""
        self._deadline = time.monotonic() + timeout
        self._stop.set()
        self.queue.wake.set()
        if self._thread is not None:
            self._thread.join(timeout + 5)

    def _run(self) -> None:
        while True:
            stopping = self._stop.is_set()
            if self.before_batch is not None:
                self.before_batch(stopping)
            batch = self.queue.take()
            if batch:
                self._write_with_retry(batch)
            elif stopping:
                return
            if not stopping and len(batch) < self.queue.batch_max:
                self.queue.wake.wait(self.flush_interval)  # a partial batch: let more arrive (≤ one interval)

    def _write_with_retry(self, batch: list[Record]) -> None:
        delay = 0.05
        while True:
            try:
                self._write(batch)
                break
            except Exception as exc:  # PostgreSQL down or restarting: keep the batch, retry
                WRITE_ERRORS.inc()
                if time.monotonic() > self._deadline:
                    LOST.inc(len(batch))
                    log.error("audit: records lost at shutdown, PostgreSQL unreachable", records=len(batch),
                              error=str(exc))
                    break
                log.warning("audit: batch write failed, retrying", records=len(batch), error=str(exc))
                time.sleep(delay)
                delay = min(delay * 2, 2.0)
        self.queue.committed(len(batch))

    def _write(self, batch: list[Record]) -> None:
        """One transaction: announce new chains, COPY rows and match blocks, move the heads."""
        t0 = time.perf_counter()
        plain = [r for r in batch if r.cls != MATCH_CLASS]
        heads: dict[str, Record] = {r.chain: r for r in batch}  # the last record of each chain is its head
        with self.pool.connection() as conn, conn.transaction():
            for chain, rec in heads.items():
                if chain not in self._announced:
                    self._announce(conn, chain, rec.cls)
            if plain:
                with conn.cursor().copy(f"COPY audit_log ({COPY_COLUMNS}) FROM STDIN (FORMAT BINARY)") as copy:
                    copy.set_types(COPY_TYPES)
                    for r in plain:
                        copy.write_row(r.row())
            if len(plain) < len(batch):
                with conn.cursor().copy(f"COPY audit_log ({BLOCK_COLUMNS}) FROM STDIN (FORMAT BINARY)") as copy:
                    copy.set_types(BLOCK_TYPES)
                    for row in block_rows([r for r in batch if r.cls == MATCH_CLASS]):
                        copy.write_row(row)
            for chain, rec in heads.items():
                conn.execute("UPDATE audit_heads SET seq = %s, hash = %s, ts = %s, updated_at = now() "
                             "WHERE chain = %s", (rec.seq, rec.hash, rec.ts, chain))
        self._announced.update(heads)
        EVENTS.labels("queue").inc(len(batch))
        BATCH_SECONDS.observe(time.perf_counter() - t0)

    def _announce(self, conn: Connection[Any], chain: str, cls: str) -> None:
        """A new writer chain gets a head row and an ``audit.chain.start`` record on a transaction
        chain, so removing a whole writer chain from the database is visible too."""
        conn.execute(
            "INSERT INTO audit_heads (chain, class, seq, hash) VALUES (%s, %s, 0, %s) ON CONFLICT (chain) DO NOTHING",
            (chain, cls, ZERO_HASH),
        )
        record_event(conn, AuditEvent("audit.chain.start", "system:audit", object_id=chain,
                                      details={"host": socket.gethostname()[:60], "pid": os.getpid()}))
