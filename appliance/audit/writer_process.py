"""The batch writer in a child process: hashing and COPY leave the API process's GIL and CPU priority.

Why: at tens of thousands of events per second, chaining (three SHA-256 and canonical JSON per
record) and COPY formatting cost more Python time than the matches that cause them; in the API
process that time is taken under the GIL the match path needs. Here the API process only packs each
event into a shared-memory ring (``appliance.audit.ring``, no syscall, no thread); the child, started
with ``nice`` so matches win the CPU under contention, polls the ring, chains, COPYs, and releases the
ring space once the COPY has committed.

The pipe between them carries only control messages. Parent → child: ``("wake", None)`` (a flush
marker is waiting: don't sleep out the poll), ``("stop", None)`` (drain the ring, commit, exit).
Child → parent: ``("done", n)`` once n more events are committed (one message per COPY transaction:
each wakes a thread of the API process, which then takes its GIL), ``("flushed", marker_id)`` once
everything put in the ring before the marker is committed, ``("error", text)`` before the child gives
up, ``("stopped", None)``. A child that dies leaves its uncommitted records in the ring: its
replacement resumes at the released position and continues the same chains from their heads in
``audit_heads`` (no fork, no gap; a batch committed but not yet released is written twice — audit
prefers a duplicate to a loss).
"""

from __future__ import annotations

import contextlib
import gc
import os
import pickle
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from appliance.audit.chain import EventTuple
from appliance.audit.ring import Ring, decode
from appliance.logs import get_logger

log = get_logger(__name__)

@dataclass(frozen=True)
class ChildConfig:
    dsn: str
    chain_base: str
    tx_chains: int
    match_actions: frozenset[str]
    nice: int
    lanes: int = 1
    batch_max: int = 5_000
    flush_interval: float = 0.2
    idle: bool = True  # SCHED_IDLE: any runnable task of normal priority preempts the writer at once


class _Duplex:
    """Two one-way pipe ends as one connection (length-prefixed frames, as multiprocessing uses)."""

    def __init__(self, read_fd: int, write_fd: int) -> None:
        self._r = Connection(read_fd, writable=False)
        self._w = Connection(write_fd, readable=False)

    def recv_bytes(self) -> bytes:
        return self._r.recv_bytes()

    def poll(self, timeout: float = 0) -> bool:
        """Is a message (or the parent's end of file) waiting, within ``timeout`` seconds?"""
        return self._r.poll(timeout)

    def send_bytes(self, data: bytes) -> None:
        self._w.send_bytes(data)

    def close(self) -> None:
        for c in (self._r, self._w):
            with contextlib.suppress(OSError):
                c.close()


# How often the child looks at the ring while events are flowing (decoding as they arrive spreads its
# CPU instead of one burst per batch), and once nothing has arrived for IDLE_AFTER seconds.
POLL_BUSY, IDLE_AFTER = 0.01, 1.0


def child_main(read_fd: int, write_fd: int, ring_fd: int) -> None:
    """Entry point of the writer process: read its config, then the ring until "stop"; write and acknowledge.

    A plain ``python -m`` child on inherited descriptors, not ``multiprocessing``: it must not re-import
    the parent's ``__main__`` (uvicorn, pytest, the CLI); the DSN arrives on the pipe, never in argv.
    """
    from psycopg_pool import ConnectionPool

    from appliance.audit.log import AuditLog

    conn = _Duplex(read_fd, write_fd)
    config: ChildConfig = pickle.loads(conn.recv_bytes())  # noqa: S301 - our own anonymous pipe
    ring = Ring.attach(ring_fd)

    lower_priority(config.nice, config.idle)

    # Each event becomes a fresh tuple and dict that lives only until its batch is formatted: with the
    # default thresholds the young-generation collector walks them ~every 700 allocations. Nothing here
    # builds cycles at that rate, so collect rarely.
    gc.freeze()
    gc.set_threshold(100_000, 50, 100)
    pool = ConnectionPool(config.dsn, min_size=1, max_size=config.lanes + 1, open=True)
    writer = AuditLog(pool, keys=None, tx_chains=config.tx_chains, match_actions=config.match_actions,
                      checkpoint_interval=0, chain_base=config.chain_base, writer_lanes=config.lanes)
    lock = threading.Lock()

    def reply(message: tuple[str, Any]) -> _Reply:
        return _Reply(conn, lock, message)

    put, close = writer.pipeline()
    pos = ring.read_pos
    events: list[EventTuple] = []
    acks: list[Any] = []
    records = 0  # taken from the ring since the last hand-over (events and markers)

    def hand_over() -> None:  # one COPY transaction; its markers fire once it (and every lane) commits
        nonlocal events, acks, records
        if events or acks or records:
            acks.insert(0, _Release(ring, pos, records))  # before the replies: the parent may count on it
            if events:
                acks.insert(1, reply(("done", len(events))))
            put(events, acks)
            events, acks, records = [], [], 0

    stopping = False
    last_handover = last_seen = time.monotonic()
    try:
        writer.resume_chains()
        while True:
            items, pos = ring.take(pos, max(1, config.batch_max - len(events)))
            records += len(items)
            for item in items:
                t = type(item)
                if t is tuple:
                    events.append(item)
                elif t is int:  # a flush marker: acknowledged after what came before it commits
                    acks.append(reply(("flushed", item)))
                else:
                    events.append(decode(item))
            now = time.monotonic()
            if items:
                last_seen = now
            if (acks or len(events) >= config.batch_max
                    or (events and now - last_handover >= config.flush_interval) or (stopping and not items)):
                hand_over()
                last_handover = now
            if stopping and not items:
                close()
                reply(("stopped", None)).set()
                return
            if items and len(items) >= config.batch_max // 2:
                continue  # a backlog: keep reading
            idle = now - last_seen > IDLE_AFTER
            timeout = config.flush_interval if idle else POLL_BUSY
            if events:
                timeout = max(0.0, min(timeout, last_handover + config.flush_interval - now))
            try:
                while conn.poll(timeout):
                    message, _payload = pickle.loads(conn.recv_bytes())  # noqa: S301 - our own anonymous pipe
                    stopping = stopping or message == "stop"
                    timeout = 0
            except (EOFError, OSError):  # the parent is gone: commit what the ring holds, then exit
                writer._stop.set()  # a PostgreSQL outage now ends the retries instead of hanging on
                stopping = True
    except Exception as exc:
        reply(("error", f"{type(exc).__name__}: {exc}")).set()
        raise
    finally:
        pool.close()


def lower_priority(nice: int, idle: bool) -> None:
    """Make this process (and the threads it starts later) yield the CPU to the match path.

    Why SCHED_IDLE on top of nice: the kernel's EEVDF scheduler lets a running task finish its slice
    (about a millisecond) before a woken task of *any* weight takes its CPU, so a nice-19 writer that
    holds a core when a match request arrives still delays it; a SCHED_IDLE task is preempted at once.
    Lowering a priority needs no privilege; where it is refused (a seccomp filter), nice still applies.
    """
    if nice:
        with contextlib.suppress(OSError):
            os.nice(nice)
    if idle and hasattr(os, "SCHED_IDLE"):
        try:
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
        except OSError as exc:
            log.warning("audit: writer process could not switch to SCHED_IDLE; nice only", error=str(exc))


class _Release:
    """A copier marker: once its batch (and every lane's before it) commits, free its ring space."""

    def __init__(self, ring: Ring, pos: int, count: int) -> None:
        self.ring, self.pos, self.count = ring, pos, count
        self.done = self

    def set(self) -> None:
        self.ring.release(self.pos, self.count)


class _Reply:
    """A copier marker whose ``done.set()`` sends ``message`` to the parent (after its batch commits)."""

    def __init__(self, conn: _Duplex, lock: threading.Lock, message: tuple[str, Any]) -> None:
        self.conn, self.lock, self.message = conn, lock, message
        self.done = self

    def set(self) -> None:
        with self.lock, contextlib.suppress(OSError):  # a parent that is gone needs no answer
            self.conn.send_bytes(pickle.dumps(self.message))


class WriterProcess:
    """The parent's handle: start, wake, restart after a crash, stop.

    The ring holds every record until the child has committed it, so a child that dies (seen as end of
    file on its replies, or a failed send) is simply replaced: the new one resumes at the ring's
    released position."""

    def __init__(self, config: ChildConfig, ring: Ring, on_flushed: Callable[[int], None],
                 on_written: Callable[[int], None]) -> None:
        self.config = config
        self.ring = ring
        self.on_flushed = on_flushed
        self.on_written = on_written
        self._lock = threading.RLock()  # sends and restarts
        self._stopping = False
        self._proc: subprocess.Popen[bytes] | None = None
        self._conn: Any = None
        self._reader: threading.Thread | None = None
        self.restarts = 0

    def start(self) -> None:
        with self._lock:
            self._start_locked()

    def _start_locked(self) -> None:
        to_child_r, to_child_w = os.pipe()
        from_child_r, from_child_w = os.pipe()
        ring_fd = self.ring.fd
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "appliance.audit.writer_process", str(to_child_r), str(from_child_w), str(ring_fd)],
            pass_fds=(to_child_r, from_child_w, ring_fd), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            close_fds=True,  # stderr stays: the child's error logs go where the service's go
        )
        os.close(to_child_r)
        os.close(from_child_w)
        conn = self._conn = _Duplex(from_child_r, to_child_w)
        conn.send_bytes(pickle.dumps(self.config))
        self._reader = threading.Thread(target=self._read, args=(conn,), name="audit-writer-acks", daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    def wake(self) -> None:
        """A flush marker is in the ring: have the child look now rather than at its next poll."""
        with self._lock:
            try:
                self._conn.send_bytes(pickle.dumps(("wake", None)))
            except (BrokenPipeError, EOFError, OSError):
                self._restart_locked()

    def _restart_locked(self) -> None:
        log.error("audit: writer process died, restarting it", exitcode=None if self._proc is None
                  else self._proc.poll())
        self.restarts += 1
        with contextlib.suppress(Exception):
            self._conn.close()
        if self._proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(5)
        self._start_locked()  # resumes at the ring's released position, on the same chains

    def _read(self, conn: Any) -> None:
        while True:
            try:
                kind, payload = pickle.loads(conn.recv_bytes())  # noqa: S301 - our own anonymous pipe
            except (EOFError, OSError):
                with self._lock:
                    if not self._stopping and conn is self._conn:
                        self._restart_locked()  # nobody else would notice
                return
            if kind == "done":
                self.on_written(payload)
            elif kind == "flushed":
                self.on_flushed(payload)
            elif kind == "error":
                log.error("audit: writer process failed", error=payload)
            elif kind == "stopped":
                return

    def stop(self, timeout: float) -> bool:
        """Ask the child to commit what the ring holds and exit; True if it did within ``timeout``."""
        with self._lock:
            self._stopping = True
            if self._proc is None:
                return True
            with contextlib.suppress(Exception):
                self._conn.send_bytes(pickle.dumps(("stop", None)))
        try:
            self._proc.wait(timeout)
            stopped = True
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait(5)
            stopped = False
        if self._reader is not None:
            self._reader.join(5)
        self._conn.close()
        return stopped


if __name__ == "__main__":
    child_main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))
