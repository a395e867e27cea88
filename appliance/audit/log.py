"""Appending to the audit trail: in the caller's transaction, or through a queue and a COPY writer.

Two kinds of chain (each a gap-free ``seq`` with ``prev`` hashes; see ``appliance.audit.chain``):

- **Writer chains** ``w:<host>:<pid>:<nonce>:<class>`` — one per ``AuditLog`` instance and class, owned
  by its single writer (a child process fed through a shared-memory ring, ``appliance.audit.ring``, or
  a thread). ``submit`` only enqueues, so the match path never waits on disk or on another process.
  The head lives in memory and in ``audit_heads``, updated in the same transaction as the COPY of each
  batch. A power loss loses what was still queued (normally under one batch window), never a record
  that was committed. The ring keeps a record until its COPY commits, so a crash of the API process
  (the child drains the ring, then exits) or of the child (its successor resumes) loses nothing; a
  crash of the thread writer's process loses its queue. The next process starts a new chain.
- **Transaction chains** ``tx:<class>:<n>`` — shared by every process. ``record`` locks one head row
  ``FOR UPDATE`` (``SKIP LOCKED`` picks a free chain, so up to n transactions append concurrently),
  inserts the record and moves the head inside the caller's transaction. Invariant: a record with
  ``seq = k`` is inserted only by the transaction holding the head row at ``seq = k - 1``; a rollback
  releases the lock and undoes both, so chains never fork or gap (under REPEATABLE READ a concurrent
  head move is a serialization failure, not a fork).

Every new writer chain is announced by an ``audit.chain.start`` record on a transaction chain, so
removing a whole writer chain from the database is visible too.
"""

from __future__ import annotations

import itertools
import os
import queue
import random
import socket
import threading
import time
import uuid
import weakref
from collections import deque
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from prometheus_client import Counter, Gauge, Histogram
from psycopg import Connection, pq

from appliance.audit import AuditEvent
from appliance.audit.chain import (
    AUDIT_CLASS,
    BLOCK_COLUMNS,
    BLOCK_TYPES,
    COPY_COLUMNS,
    DEFAULT_MATCH_ACTIONS,
    MATCH_CLASS,
    ZERO_HASH,
    ChainHead,
    EventTuple,
    Formatted,
    Head,
    action_class,
    build_record,
    event_tuple,
    format_copy_batch,
    sanitize_details,
)
from appliance.audit.ring import Ring, from_tuple
from appliance.audit.ring import available as ring_available
from appliance.logs import get_logger

if TYPE_CHECKING:
    from psycopg_pool import ConnectionPool

    from appliance.audit.writer_process import WriterProcess
    from crypto.providers.base import KeyProvider

log = get_logger(__name__)

EVENTS = Counter("appliance_audit_events_total", "Audit records written", ["path"])
QUEUE_DEPTH = Gauge("appliance_audit_queue_depth", "Audit events queued and not yet committed")
BACKPRESSURE = Counter("appliance_audit_backpressure_total", "submit() calls that found the queue full and waited")
DROPPED = Counter("appliance_audit_dropped_total", "Audit events lost: queue still full after waiting, or shutdown")
REDACTED = Counter("appliance_audit_redacted_total", "Audit events whose details had sensitive keys removed")
WRITE_ERRORS = Counter("appliance_audit_write_errors_total", "Failed batch writes (retried)")
BATCH_SECONDS = Histogram(
    "appliance_audit_batch_seconds", "Time to COPY one batch", buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 2)
)

_STOP = object()  # ends the copier thread
# The writer threads share the GIL with the match path: they yield it this often (≈ 0.5 ms of work)
# so a waiting request thread runs at once instead of after CPython's 5 ms switch interval.
YIELD_EVERY = 16


def _row(rec: dict[str, Any], ts: datetime, details_json: str) -> tuple[Any, ...]:
    return (
        ts, rec["chain"], rec["seq"], rec["class"], rec["actor"], rec["action"], rec["subject_id"],
        rec["object_id"], rec["outcome"], rec["request_id"], details_json,
        bytes.fromhex(rec["prev_hash"]), bytes.fromhex(rec["hash"]),
    )  # fmt: skip


def _clean_details(event: AuditEvent) -> dict[str, Any]:
    details, removed = sanitize_details(event.details or {})
    if removed:
        _redacted(event.action, removed)
    return details


def _redacted(action: str, removed: list[str]) -> None:
    REDACTED.inc()
    log.warning("audit: sensitive or oversized details removed", action=action, keys=removed[:10])


def _event_ts(event: AuditEvent) -> datetime:
    ts = event.ts
    return ts.replace(tzinfo=UTC) if ts.tzinfo is None else ts


def record_event(
    conn: Connection[Any],
    event: AuditEvent,
    tx_chains: int = 8,
    match_actions: frozenset[str] = DEFAULT_MATCH_ACTIONS,
) -> dict[str, Any]:
    """Append ``event`` to a transaction chain inside ``conn``'s current transaction; returns the record."""
    if conn.autocommit and conn.info.transaction_status == pq.TransactionStatus.IDLE:
        with conn.transaction():
            return record_event(conn, event, tx_chains, match_actions)
    cls = action_class(event.action, match_actions)
    names = [f"tx:{cls}:{i}" for i in range(tx_chains)]
    random.shuffle(names)
    row = conn.execute(
        "SELECT chain, seq, hash, ts FROM audit_heads WHERE chain = ANY(%s) LIMIT 1 FOR UPDATE SKIP LOCKED",
        (names,),
    ).fetchone()
    if row is None:  # every chain is held by another transaction: wait for one
        row = conn.execute(
            "SELECT chain, seq, hash, ts FROM audit_heads WHERE chain = %s FOR UPDATE", (names[0],)
        ).fetchone()
        if row is None:
            raise RuntimeError(f"audit chain {names[0]} has no head row; is migration 0004 applied?")
    chain, seq, head, head_ts = row
    ts = max(_event_ts(event), head_ts)  # ts never decreases along a chain
    rec, details_json = build_record(event, chain, seq + 1, ts, cls, _clean_details(event), bytes(head))
    conn.execute(
        f"""WITH moved AS (UPDATE audit_heads SET seq = %s, hash = %s, ts = %s, updated_at = now() WHERE chain = %s)
            INSERT INTO audit_log ({COPY_COLUMNS}) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)""",  # noqa: S608
        (rec["seq"], bytes.fromhex(rec["hash"]), ts, chain, *_row(rec, ts, details_json)),
    )
    EVENTS.labels("tx").inc()
    return rec


class _AfterAll:
    """Markers released once each of ``n`` lanes has reached this point (``done.set()`` n times)."""

    def __init__(self, markers: list[Any], n: int) -> None:
        self.markers, self.left = markers, n
        self.lock = threading.Lock()
        self.done = self

    def set(self) -> None:
        with self.lock:
            self.left -= 1
            last = self.left == 0
        if last:
            for m in self.markers:
                m.done.set()


class _Flush:
    """A marker in the queue: ``done`` is set once everything queued before it is committed."""

    __slots__ = ("done",)

    def __init__(self) -> None:
        self.done = threading.Event()


class AuditLog:
    """The process's audit trail: ``record`` (in-transaction) and ``submit`` (queued, batched COPY)."""

    def __init__(
        self,
        pool: ConnectionPool,
        keys: Callable[[], KeyProvider] | None = None,
        *,
        queue_size: int = 100_000,
        batch_max: int = 5_000,
        flush_interval: float = 0.2,
        block_seconds: float = 0.25,
        tx_chains: int = 8,
        match_actions: frozenset[str] = DEFAULT_MATCH_ACTIONS,
        checkpoint_interval: float = 60.0,
        chain_base: str | None = None,
        writer_process: bool = False,
        writer_nice: int = 19,
        writer_idle: bool = True,
        writer_lanes: int = 1,
    ) -> None:
        self.pool = pool
        self.keys = keys
        self.batch_max = batch_max
        self.flush_interval = flush_interval
        self.block_seconds = block_seconds
        self.tx_chains = tx_chains
        self.match_actions = frozenset(match_actions)
        self.checkpoint_interval = checkpoint_interval
        self.chain_base = chain_base or f"w:{socket.gethostname()[:60]}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        if writer_process and not ring_available():
            log.warning("audit: appliance.audit._ring is not built; batches are written by a thread instead")
        self.writer_process = writer_process and ring_available()
        _LOGS.add(self)
        self.writer_nice = writer_nice
        self.writer_idle = writer_idle
        self.writer_lanes = max(1, writer_lanes)
        self.child: WriterProcess | None = None
        self._ring: Ring | None = None  # process mode: set once the writer process is started
        self._markers: dict[int, _Flush] = {}
        self._marker_ids = itertools.count(1)
        # The writer process's COPY lanes: lane 0 writes ``<base>:<class>``, lane k its own ``<base>:l<k>:<class>``
        # chains, each in order on its own connection, so one PostgreSQL backend is not the ceiling.
        self.lanes = [
            {c: ChainHead(f"{self.chain_base}{f':l{k}' if k else ''}:{c}", c) for c in (AUDIT_CLASS, MATCH_CLASS)}
            for k in range(self.writer_lanes)
        ]
        self.chains = self.lanes[0]  # the thread writer's chains
        # A deque, not queue.Queue: append/popleft are atomic without a lock, so submit costs ~0.1 µs on
        # the match path; the bound is checked by len() (approximate under races, which is fine).
        self._queue: deque[AuditEvent | _Flush] = deque()
        self.queue_size = queue_size
        self._wake = threading.Event()
        self._batches: queue.Queue[Any] = queue.Queue(maxsize=2)  # hashed batches waiting for the copier
        self._writer: threading.Thread | None = None
        self._checkpointer: threading.Thread | None = None
        self._stop = threading.Event()
        self._start_lock = threading.Lock()

    # --- in the caller's transaction -----------------------------------------------------------

    def record(self, conn: Connection[Any], event: AuditEvent) -> None:
        """Append inside ``conn``'s transaction: the caller's write and this record commit together."""
        record_event(conn, event, self.tx_chains, self.match_actions)

    # --- queued ------------------------------------------------------------------------------------

    def submit(self, event: AuditEvent) -> None:
        """Enqueue without touching the database; when the queue is full, wait briefly (counted)."""
        ring = self._ring
        try:
            if ring is not None and ring.put(event):  # the match path: one C call, no lock, no syscall
                return
        except ValueError:  # a record that can never fit the ring (or a ring closed by stop()): write it directly
            self._write_direct(event)
            return
        self._submit_slow(event, ring)

    def _submit_slow(self, event: AuditEvent, ring: Ring | None) -> None:
        if self._stop.is_set():  # after shutdown began (a late hook): write it directly, slowly but surely
            self._write_direct(event)
            return
        if ring is None and self._writer is None:
            self.start_writer()
            if self._ring is not None:
                self.submit(event)
                return
        if ring is None and len(self._queue) < self.queue_size:
            self._queue.append(event)
            return
        BACKPRESSURE.inc()  # full: wait for room; a negative block_seconds waits forever (audit over availability)
        deadline = time.monotonic() + self.block_seconds if self.block_seconds >= 0 else float("inf")
        while True:
            if ring is not None:
                if ring.put(event):
                    return
            elif len(self._queue) < self.queue_size:
                self._queue.append(event)
                return
            if time.monotonic() >= deadline:
                DROPPED.inc()
                log.error("audit: queue full, event dropped", action=event.action, queue=self.queue_size)
                return
            time.sleep(0.001)

    def _write_direct(self, event: AuditEvent) -> None:
        """Slow but sure (a transaction chain): for late events at shutdown and records no ring can hold."""
        with self.pool.connection() as conn:
            record_event(conn, event, self.tx_chains, self.match_actions)
            conn.commit()

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until everything submitted before this call is committed; False on timeout."""
        ring, child = self._ring, self.child
        if ring is not None and child is not None:
            marker, marker_id = _Flush(), next(self._marker_ids)
            self._markers[marker_id] = marker
            deadline = time.monotonic() + timeout
            while not ring.put_marker(marker_id):  # the ring is full: the marker waits for room like an event
                if time.monotonic() >= deadline:
                    return False
                time.sleep(0.001)
            child.wake()
            return marker.done.wait(max(0.0, deadline - time.monotonic()))
        if self._writer is None or not self._writer.is_alive():
            return not self._queue
        marker = _Flush()
        self._queue.append(marker)  # the copier sets it once every batch queued before it is committed
        self._wake.set()
        return marker.done.wait(timeout)

    @property
    def queue_depth(self) -> int:
        ring = self._ring
        if ring is None:
            return len(self._queue)
        try:
            return ring.depth
        except ValueError:  # stop() closed the ring meanwhile
            return 0

    # --- lifecycle ---------------------------------------------------------------------------------

    def start_writer(self) -> None:
        with self._start_lock:
            if self._writer is not None or self.child is not None or self._stop.is_set():
                return
            if self.writer_process:
                try:
                    self._start_process()
                    return
                except OSError as exc:  # no memfd (a seccomp filter?) or no fork: audit must go on
                    log.error("audit: writer process unavailable; batches are written by a thread", error=str(exc))
                    self.writer_process = False
            self._writer = threading.Thread(target=self._run_writer, name="audit-writer", daemon=True)
            self._writer.start()

    def _start_process(self) -> None:
        from appliance.audit.writer_process import ChildConfig, WriterProcess

        ring = Ring.create(self.queue_size)
        child = WriterProcess(
            ChildConfig(self.pool.conninfo, self.chain_base, self.tx_chains, self.match_actions, self.writer_nice,
                        self.writer_lanes, self.batch_max, self.flush_interval, self.writer_idle),
            ring, on_flushed=self._flushed, on_written=self._written)
        child.start()
        self.child = child
        self._ring = ring  # from here on submit() writes into the ring

    def _written(self, count: int) -> None:
        EVENTS.labels("queue").inc(count)

    def start(self) -> None:
        """Start the batch writer and the periodic checkpointer (startup hook)."""
        if self.tx_chains > 8:  # migration 0004 creates tx:<class>:0..7
            with self.pool.connection() as conn:
                conn.execute(
                    """INSERT INTO audit_heads (chain, class, seq, hash)
                       SELECT format('tx:%%s:%%s', c, i), c, 0, %s
                       FROM unnest(ARRAY['audit', 'match']) AS c, generate_series(0, %s - 1) AS i
                       ON CONFLICT (chain) DO NOTHING""",
                    (ZERO_HASH, self.tx_chains),
                )
        self.start_writer()
        with self._start_lock:
            if self._checkpointer is None and self.keys is not None and self.checkpoint_interval > 0:
                self._checkpointer = threading.Thread(target=self._run_checkpoints, name="audit-checkpoints",
                                                      daemon=True)
                self._checkpointer.start()

    def stop(self, checkpoint: bool = True, timeout: float = 10.0) -> None:
        """Drain the queue, stop the writer and sign a shutdown checkpoint (shutdown hook)."""
        ring, self._ring = self._ring, None  # new events now take the slow path, which sees _stop
        self._stop.set()
        if self._writer is not None:
            self._wake.set()
            self._writer.join(timeout)
        if self.child is not None:
            if not self.child.stop(timeout):
                log.error("audit: writer process did not stop in time; it was killed")
            if ring is not None:
                self._write_ring_leftovers(ring)
                ring.close()
            for m in list(self._markers.values()):  # anything unacknowledged is as committed as it will get
                m.done.set()
        self._write_leftovers()
        if self._checkpointer is not None:
            self._checkpointer.join(timeout)
        if checkpoint and self.keys is not None:
            try:
                self.checkpoint("shutdown")
            except Exception as exc:  # shutdown must go on; the next process signs on its next period
                log.error("audit: shutdown checkpoint failed", error=str(exc))

    def _write_ring_leftovers(self, ring: Ring) -> None:
        """What a writer process left uncommitted (it was killed, or PostgreSQL was down): written directly."""
        items, _ = ring.take(ring.read_pos, 1 << 30)
        events = [from_tuple(i) for i in items if type(i) is not int]
        if self._write_at_shutdown(events):
            log.warning("audit: the writer process left events behind; written directly", events=len(events))

    def _write_leftovers(self) -> None:
        """Events appended while the writer was stopping: written directly, on a transaction chain."""
        leftovers, markers = [], []
        while self._queue:
            item = self._queue.popleft()
            (markers if isinstance(item, _Flush) else leftovers).append(item)
        self._write_at_shutdown(leftovers)
        for m in markers:
            m.done.set()

    def _write_at_shutdown(self, events: list[AuditEvent]) -> bool:
        """One transaction on the transaction chains; True if there were events and they committed."""
        if not events:
            return False
        try:
            with self.pool.connection() as conn, conn.transaction():
                for event in events:
                    record_event(conn, event, self.tx_chains, self.match_actions)
            return True
        except Exception as exc:  # PostgreSQL down at shutdown: count and say so
            DROPPED.inc(len(events))
            log.error("audit: events lost at shutdown", events=len(events), error=str(exc))
            return False

    def checkpoint(self, kind: str = "periodic") -> int:
        """Sign the head of every chain that moved since its last checkpoint; returns how many."""
        from appliance.audit.checkpoints import write_checkpoints

        if self.keys is None:
            raise RuntimeError("this AuditLog has no key provider to sign checkpoints with")
        with self.pool.connection() as conn:
            return write_checkpoints(conn, self.keys(), kind)

    # --- the writer thread ---------------------------------------------------------------------------

    def _run_writer(self) -> None:
        """Hash batches here while the copier thread writes the previous one (CPU and I/O overlap)."""
        copier = threading.Thread(target=self._run_copier, name="audit-copier", daemon=True)
        copier.start()
        while True:
            stopping = self._stop.is_set()
            batch, markers = self._take()
            if batch or markers:
                self._batches.put((self._chain(batch), markers))  # hashes are fixed from here on
            elif stopping:
                break
            if len(batch) < self.batch_max and not stopping:
                self._wake.wait(self.flush_interval)  # a partial batch: let more arrive (≤ one window)
                self._wake.clear()
        self._batches.put(_STOP)
        copier.join()

    def _take(self) -> tuple[list[AuditEvent], list[_Flush]]:
        """Up to ``batch_max`` queued events, and the flush markers among them."""
        pop = self._queue.popleft
        batch: list[AuditEvent] = []
        markers: list[_Flush] = []
        try:
            while len(batch) < self.batch_max:
                item = pop()
                (markers if type(item) is _Flush else batch).append(item)  # type: ignore[arg-type]
        except IndexError:
            pass
        return batch, markers

    def _flushed(self, marker_id: int) -> None:
        marker = self._markers.pop(marker_id, None)
        if marker is not None:
            marker.done.set()

    def pipeline(self) -> tuple[Callable[[list[EventTuple], list[Any]], None], Callable[[], None]]:
        """For the writer process: ``put(events, markers)`` hashes now and queues the COPY on the next
        lane in turn, whose copier thread writes it (hashing the next batch overlaps PostgreSQL's work on
        this one). Each marker's ``done.set()`` runs once every batch put before it, on every lane, is
        committed. ``close()`` drains and stops the copiers."""
        queues: list[queue.Queue[Any]] = [queue.Queue(maxsize=4) for _ in self.lanes]
        copiers = [threading.Thread(target=self._run_copier, args=(q,), name=f"audit-copier-{k}", daemon=True)
                   for k, q in enumerate(queues)]
        for c in copiers:
            c.start()

        turn = itertools.cycle(range(len(queues)))

        def put(events: list[EventTuple], markers: list[Any]) -> None:
            lane = next(turn)
            if events:
                formatted = format_copy_batch(events, self.lanes[lane], self.match_actions, _redacted)
                queues[lane].put((formatted, []))  # blocks are compressed on the copier thread (zstd drops the GIL)
            if markers:
                barrier = _AfterAll(markers, len(queues))
                for q in queues:
                    q.put((None, [barrier]))

        def close() -> None:
            for q in queues:
                q.put(_STOP)
            for c in copiers:
                c.join()

        return put, close

    def resume_chains(self) -> None:
        """Continue this instance's chains from their stored heads (a restarted writer process)."""
        chains = [c for lane in self.lanes for c in lane.values()]
        with self.pool.connection() as conn:
            rows = conn.execute("SELECT chain, seq, hash, ts FROM audit_heads WHERE chain = ANY(%s)",
                                ([c.name for c in chains],)).fetchall()
        heads = {r[0]: r for r in rows}
        for chain in chains:
            if chain.name in heads:
                _, chain.seq, head, chain.ts = heads[chain.name]
                chain.hash, chain.announced = bytes(head), True

    def _run_copier(self, batches: queue.Queue[Any] | None = None) -> None:
        batches = self._batches if batches is None else batches
        while (item := batches.get()) is not _STOP:
            formatted, markers = item
            if formatted is not None:
                self._write_with_retry(formatted)
            for m in markers:
                m.done.set()

    def _write_with_retry(self, formatted: Formatted) -> None:
        """COPY one batch, retrying the same rows while PostgreSQL is unavailable (never re-hashed)."""
        delay, failures_while_stopping = 0.05, 0
        blocks = formatted.blocks()
        count = len(formatted)
        while True:
            try:
                self._copy(formatted.lines, blocks, list(formatted.heads.values()))
                EVENTS.labels("queue").inc(count)
                break
            except Exception as exc:  # PostgreSQL down or restarting: keep the batch, retry
                WRITE_ERRORS.inc()
                failures_while_stopping += self._stop.is_set()
                if failures_while_stopping > 3:
                    DROPPED.inc(count)
                    log.error("audit: batch lost at shutdown", events=count, error=str(exc))
                    break
                log.warning("audit: batch write failed, retrying", events=count, error=str(exc))
                time.sleep(delay)
                delay = min(delay * 2, 2.0)

    def _chain(self, batch: list[AuditEvent]) -> Formatted | None:
        """Hash each event onto its chain (COPY lines and block material), yielding the GIL every few
        events; None for an empty batch."""
        if not batch:
            return None
        formatted = Formatted()
        for start in range(0, len(batch), YIELD_EVERY):
            time.sleep(0)  # hand the GIL to request threads now, not after the 5 ms switch interval
            format_copy_batch([event_tuple(e) for e in batch[start:start + YIELD_EVERY]], self.chains,
                              self.match_actions, _redacted, into=formatted)
        return formatted

    def _copy(self, lines: list[str], blocks: list[tuple[Any, ...]], heads: list[Head]) -> None:
        """One transaction: announce new chains, COPY the records and the match blocks, move the heads."""
        t0 = time.perf_counter()
        with self.pool.connection() as conn, conn.transaction():
            for chain, *_ in heads:
                if not chain.announced:
                    self._announce(conn, chain)
            if lines:
                data = "".join(lines).encode()
                with conn.cursor().copy(f"COPY audit_log ({COPY_COLUMNS}) FROM STDIN") as copy:
                    for start in range(0, len(data), 1 << 20):
                        copy.write(data[start:start + (1 << 20)])
            if blocks:  # binary COPY: PostgreSQL neither parses nor re-compresses the packed records
                with conn.cursor().copy(f"COPY audit_log ({BLOCK_COLUMNS}) FROM STDIN (FORMAT BINARY)") as copy:
                    copy.set_types(BLOCK_TYPES)
                    for row in blocks:
                        copy.write_row(row)
            for chain, seq, digest, ts in heads:  # the last record of each chain in this batch is its new head
                conn.execute(
                    "UPDATE audit_heads SET seq = %s, hash = %s, ts = %s, updated_at = now() WHERE chain = %s",
                    (seq, digest, ts, chain.name),
                )
        for chain, *_ in heads:
            chain.announced = True
        BATCH_SECONDS.observe(time.perf_counter() - t0)

    def _announce(self, conn: Connection[Any], chain: ChainHead) -> None:
        conn.execute(
            "INSERT INTO audit_heads (chain, class, seq, hash) VALUES (%s, %s, 0, %s) ON CONFLICT (chain) DO NOTHING",
            (chain.name, chain.cls, ZERO_HASH),
        )
        start = AuditEvent("audit.chain.start", "system:audit", object_id=chain.name,
                           details={"host": socket.gethostname()[:60], "pid": os.getpid()})
        record_event(conn, start, self.tx_chains, self.match_actions)

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


_LOCK = threading.Lock()
_LOGS: weakref.WeakSet[AuditLog] = weakref.WeakSet()


def _queued() -> float:
    """Read at scrape time, not pushed by the writer: right even while nothing commits (PostgreSQL down)."""
    return float(sum(log.queue_depth for log in list(_LOGS)))


QUEUE_DEPTH.set_function(_queued)


def audit_log(state: Any) -> AuditLog:
    """The process's AuditLog from ``state.extras["audit"]``, created on first use if no hook ran."""
    found = state.extras.get("audit")
    if found is None:
        with _LOCK:
            found = state.extras.get("audit")
            if found is None:
                found = state.extras["audit"] = new_audit_log(state)
    return found  # type: ignore[no-any-return]


def new_audit_log(state: Any) -> AuditLog:
    s = state.settings
    return AuditLog(
        state.pool,
        keys=lambda: state.keys,
        queue_size=s.audit_queue_size,
        batch_max=s.audit_batch_max,
        flush_interval=s.audit_flush_interval,
        block_seconds=s.audit_block_seconds,
        tx_chains=s.audit_tx_chains,
        match_actions=frozenset(s.audit_match_actions),
        checkpoint_interval=s.audit_checkpoint_interval,
        writer_process=s.audit_writer_process,
        writer_nice=s.audit_writer_nice,
        writer_idle=s.audit_writer_idle,
        writer_lanes=s.audit_writer_lanes,
    )
