"""The queue between the API process and its audit writer process: a ring in shared memory.

Why: a feeder thread that pickled events and wrote them to a pipe took the API process's GIL a few
hundred times a second at 20,000 events/s, and each of those handoffs could delay a match. Here
``submit`` packs the event in C straight into a memfd both processes map (~0.4 us, no syscall, no
thread); the writer process polls the ring, decodes records in C, and releases their space only
after its COPY has committed them, so a writer that dies leaves every uncommitted record in the ring
for its successor (or for the API process at shutdown). Layout and record format: ``_ring.c``.
"""

from __future__ import annotations

import dataclasses
import mmap
import os
import pickle
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from appliance.audit import AuditEvent
from appliance.audit.chain import event_tuple, sanitize_details

try:  # compiled by setup.py; without it, process mode falls back to the thread writer
    from appliance.audit import _ring
except ImportError:  # pragma: no cover - depends on the build
    _ring = None  # type: ignore[assignment]

HEADER = 192
BYTES_PER_EVENT = 384  # a match event as /v1/match queues it packs to ~310 bytes: queue_size events fit
MAX_RECORD = 65_536


def available() -> bool:
    return _ring is not None


class Ring:
    """One producer side (the API process, under its GIL) and one consumer (the writer process)."""

    def __init__(self, fd: int, *, create: bool, capacity: int = 0) -> None:
        if _ring is None:
            raise RuntimeError("appliance.audit._ring is not built (a C compiler is needed at install)")
        self.fd = fd
        if create:
            os.ftruncate(fd, HEADER + capacity)
        self.buf = mmap.mmap(fd, os.fstat(fd).st_size)
        if create:
            _ring.init(self.buf)
        self._put_event = _ring.put_event
        self._put_pickled = _ring.put_pickled

    @classmethod
    def create(cls, queue_size: int) -> Ring:
        """A new ring sized for ``queue_size`` typical events (at least 1 MiB)."""
        fd = os.memfd_create("appliance-audit-ring", os.MFD_CLOEXEC)
        return cls(fd, create=True, capacity=max(1 << 20, queue_size * BYTES_PER_EVENT))

    @classmethod
    def attach(cls, fd: int) -> Ring:
        """The writer process's view of a ring its parent created (the fd is inherited)."""
        return cls(fd, create=False)

    # --- producer ---------------------------------------------------------------------------------------

    def put(self, event: AuditEvent) -> bool:
        """Append ``event``; False when the ring has no room (nothing written)."""
        done = self._put_event(self.buf, event)
        if done >= 0:
            return bool(done)
        # rare: details C does not pack exactly (nested values, big ints, other time zones): pickle them
        data = pickle.dumps(event_tuple(event), protocol=5)
        if len(data) >= MAX_RECORD - 64:  # oversized details: the writer would truncate them anyway
            details, _ = sanitize_details(event.details or {})
            data = pickle.dumps(event_tuple(dataclasses.replace(event, details=details)), protocol=5)
        return bool(self._put_pickled(self.buf, data))

    def put_marker(self, marker_id: int) -> bool:
        return bool(_ring.put_marker(self.buf, marker_id))

    # --- consumer ---------------------------------------------------------------------------------------

    def take(self, pos: int, limit: int) -> tuple[list[Any], int]:
        """Records from stream position ``pos`` on (event tuples, pickled bytes, marker ids), and the next pos."""
        return _ring.take(self.buf, pos, limit)  # type: ignore[no-any-return]

    def release(self, pos: int, count: int) -> None:
        """Everything before ``pos`` is committed: its space may be reused."""
        _ring.release(self.buf, pos, count)

    # --- both -------------------------------------------------------------------------------------------

    @property
    def read_pos(self) -> int:
        return _ring.state(self.buf)[2]  # type: ignore[no-any-return]

    @property
    def depth(self) -> int:
        """Records written and not yet committed (events and flush markers)."""
        state = _ring.state(self.buf)  # (write_pos, written, read_pos, read, capacity)
        return state[1] - state[3]  # type: ignore[no-any-return]

    def close(self) -> None:
        self.buf.close()
        os.close(self.fd)


def decode(item: Any) -> Any:
    """A pickled record's event tuple (the writer process's side of ``put``'s fallback)."""
    return pickle.loads(item)  # noqa: S301 - written by our own parent process into memory only we map


def from_tuple(item: Any) -> AuditEvent:
    """A ring record (event tuple or pickled tuple) as the AuditEvent it was: for writing it directly."""
    micros, action, actor, outcome, subject, object_id, request_id, details = (
        item if type(item) is tuple else decode(item))
    return AuditEvent(action, actor, outcome, uuid.UUID(int=subject) if type(subject) is int else subject,
                      object_id, request_id, details, _EPOCH + timedelta(microseconds=micros))


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
