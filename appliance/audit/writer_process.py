"""The batch writer in a child process: hashing and COPY leave the API process's GIL and CPU priority.

Why: at tens of thousands of events per second, chaining (three SHA-256 and canonical JSON per
record) and COPY formatting cost more Python time than the matches that cause them; in the API
process that time is taken under the GIL the match path needs. Here the API process only pickles
each batch as plain tuples (a few microseconds per event) and sends it down a pipe; the child,
started with ``nice`` so matches win the CPU under contention, chains, COPYs and acknowledges.

Protocol (parent → child): ``("batch", (id, events))``, ``("flush", marker_id)``, ``("stop", None)``;
(child → parent): ``("done", [(id, count), ...])`` once the batches are committed (one message per
COPY transaction: each wakes a thread of the API process, which then takes its GIL), ``("flushed", marker_id)``
once everything sent before the marker is, ``("error", text)`` before the child gives up. The
child continues its chains from their heads in ``audit_heads``, so a restarted child extends the
same chains without a fork or a gap; batches not yet acknowledged when a child died are sent again
(audit prefers a duplicate to a loss).
"""

from __future__ import annotations

import contextlib
import gc
import os
import pickle
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from appliance.audit import AuditEvent
from appliance.audit.chain import EventTuple, event_tuple
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


class _Duplex:
    """Two one-way pipe ends as one connection (length-prefixed frames, as multiprocessing uses)."""

    def __init__(self, read_fd: int, write_fd: int) -> None:
        self._r = Connection(read_fd, writable=False)
        self._w = Connection(write_fd, readable=False)

    def recv_bytes(self) -> bytes:
        return self._r.recv_bytes()

    def poll(self) -> bool:
        """Is another message already waiting?"""
        return self._r.poll(0)

    def send_bytes(self, data: bytes) -> None:
        self._w.send_bytes(data)

    def close(self) -> None:
        for c in (self._r, self._w):
            with contextlib.suppress(OSError):
                c.close()


def child_main(read_fd: int, write_fd: int) -> None:
    """Entry point of the writer process: read its config, then batches until "stop"; write and acknowledge.

    A plain ``python -m`` child on inherited pipes, not ``multiprocessing``: it must not re-import the
    parent's ``__main__`` (uvicorn, pytest, the CLI); the DSN arrives on the pipe, never in argv.
    """
    from psycopg_pool import ConnectionPool

    from appliance.audit.log import AuditLog

    conn = _Duplex(read_fd, write_fd)
    config: ChildConfig = pickle.loads(conn.recv_bytes())  # noqa: S301 - our own anonymous pipe

    if config.nice:
        with contextlib.suppress(OSError):
            os.nice(config.nice)
    # Each event arrives as a fresh tuple and dict that lives only until its batch is formatted: with
    # the default thresholds the young-generation collector walks them ~every 700 allocations (~1/3 of
    # the unpickling time, measured). Nothing here builds cycles at that rate, so collect rarely.
    gc.freeze()
    gc.set_threshold(100_000, 50, 100)
    pool = ConnectionPool(config.dsn, min_size=1, max_size=config.lanes + 1, open=True)
    writer = AuditLog(pool, keys=None, tx_chains=config.tx_chains, match_actions=config.match_actions,
                      checkpoint_interval=0, chain_base=config.chain_base, writer_lanes=config.lanes)
    lock = threading.Lock()

    def reply(message: tuple[str, Any]) -> _Reply:
        return _Reply(conn, lock, message)

    put, close = writer.pipeline()
    events: list[EventTuple] = []
    acks: list[_Reply] = []
    done: list[tuple[int, int]] = []

    def hand_over() -> None:  # one COPY transaction for everything that arrived together
        nonlocal events, acks, done
        if done:
            acks.append(reply(("done", done)))  # sent once the COPY commits, like every marker here
        if events or acks:
            put(events, acks)
            events, acks, done = [], [], []

    try:
        writer.resume_chains()
        while True:
            try:
                kind, payload = pickle.loads(conn.recv_bytes())  # noqa: S301 - our own anonymous pipe
            except (EOFError, OSError):  # the parent is gone: commit what we hold, then exit
                writer._stop.set()  # a PostgreSQL outage now ends the retries instead of hanging on
                kind, payload = "stop", None
            if kind == "batch":
                batch_id, tuples = payload
                events.extend(tuples)
                done.append((batch_id, len(tuples)))
            elif kind == "flush":
                if done:  # the batches before this marker are acknowledged before it
                    acks.append(reply(("done", done)))
                    done = []
                acks.append(reply(("flushed", payload)))
            elif kind == "stop":
                hand_over()
                close()
                reply(("stopped", None)).done.set()
                return
            if len(events) >= writer.batch_max or not conn.poll():
                hand_over()
    except Exception as exc:
        reply(("error", f"{type(exc).__name__}: {exc}")).done.set()
        raise
    finally:
        pool.close()


class _Reply:
    """A copier marker whose ``done.set()`` sends ``message`` to the parent (after its batch commits)."""

    def __init__(self, conn: _Duplex, lock: threading.Lock, message: tuple[str, Any]) -> None:
        self.conn, self.lock, self.message = conn, lock, message
        self.done = self

    def set(self) -> None:
        with self.lock, contextlib.suppress(OSError):  # a parent that is gone needs no answer
            self.conn.send_bytes(pickle.dumps(self.message))


class WriterProcess:
    """The parent's handle: start, send batches and flush markers, restart after a crash, stop.

    Every message stays in ``_pending`` until the child acknowledges it; a child that dies (seen as a
    failed send or as end-of-file on its replies) is replaced and the pending messages are sent again
    in order, so a flush marker is never lost with its child."""

    def __init__(self, config: ChildConfig, on_flushed: Callable[[int], None],
                 on_written: Callable[[int], None]) -> None:
        self.config = config
        self.on_flushed = on_flushed
        self.on_written = on_written
        self._pending: dict[tuple[str, int], bytes] = {}  # insertion order = send order
        self._lock = threading.RLock()  # sends and restarts (held while a send blocks on a busy child)
        self._table = threading.Lock()  # the pending table only: acks never wait behind a blocked send
        self._next_id = 0
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
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "appliance.audit.writer_process", str(to_child_r), str(from_child_w)],
            pass_fds=(to_child_r, from_child_w), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
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

    def send_batch(self, events: list[AuditEvent]) -> None:
        """Blocks while the child is busy (the pipe is the back-pressure)."""
        tuples = [event_tuple(e) for e in events]
        with self._lock:
            self._next_id += 1
            self._send(("b", self._next_id), pickle.dumps(("batch", (self._next_id, tuples)), protocol=5))

    def send_flush(self, marker_id: int) -> None:
        with self._lock:
            self._send(("f", marker_id), pickle.dumps(("flush", marker_id)))

    def _send(self, key: tuple[str, int], data: bytes) -> None:
        with self._table:
            self._pending[key] = data
        try:
            self._conn.send_bytes(data)
        except (BrokenPipeError, EOFError, OSError):
            self._restart_locked()  # sends every pending message again, this one included

    def _restart_locked(self) -> None:
        log.error("audit: writer process died, restarting it", exitcode=None if self._proc is None
                  else self._proc.poll())
        self.restarts += 1
        with contextlib.suppress(Exception):
            self._conn.close()
        if self._proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(5)
        self._start_locked()  # the new child continues the same chains from audit_heads
        with self._table:
            again = list(self._pending.values())
        for data in again:
            self._conn.send_bytes(data)

    def _read(self, conn: Any) -> None:
        while True:
            try:
                kind, payload = pickle.loads(conn.recv_bytes())  # noqa: S301 - our own anonymous pipe
            except (EOFError, OSError):
                with self._lock:
                    if not self._stopping and conn is self._conn:
                        self._restart_locked()  # died between sends: nobody else would notice
                return
            if kind == "done":
                with self._table:
                    for batch_id, _count in payload:
                        self._pending.pop(("b", batch_id), None)
                self.on_written(sum(count for _id, count in payload))
            elif kind == "flushed":
                with self._table:
                    self._pending.pop(("f", payload), None)
                self.on_flushed(payload)
            elif kind == "error":
                log.error("audit: writer process failed", error=payload)
            elif kind == "stopped":
                return

    def stop(self, timeout: float) -> bool:
        """Ask the child to finish what it has and exit; True if it did within ``timeout``."""
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
    child_main(int(sys.argv[1]), int(sys.argv[2]))
