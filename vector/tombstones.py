"""Host-local tombstones: an append-only file of erased labels that every worker on the host polls.

Why a file: an erasure must hide a subject from *every* worker before its call returns, even from a
worker whose Redis feed is behind. Asking Redis on every match costs a network round trip on the
hot path; on one host the page cache already is shared memory. The eraser appends the labels
(8-byte little-endian int64 each, one ``write`` with ``O_APPEND``) before it returns; a matcher
compares the file size with what it has read (one ``lseek``, well under a microsecond) after each
search and, if the file grew, reads the new labels and searches again. PostgreSQL and Redis stay
the sources of truth: the file only carries the news faster. Several hosts sharing one database
enable the Redis probe as well (``index_redis_tombstone_probe``).
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np

LABEL = np.dtype("<i8")


class LocalTombstones:
    """One reader/appender of the host's tombstone file; thread-safe; never raises on the match path."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
        self._read = 0  # bytes consumed so far (a multiple of 8)
        self._lock = threading.Lock()

    def append(self, labels: list[int] | np.ndarray) -> None:
        """Publish erased labels to every worker on this host (visible on return, durable with fsync)."""
        data = np.asarray(labels, dtype=LABEL).tobytes()
        if not data:
            return
        written = os.write(self._fd, data)  # O_APPEND: one write lands whole at the end
        if written != len(data):
            raise OSError(f"short write to {self.path}: {written} of {len(data)} bytes")
        os.fsync(self._fd)

    def changed(self) -> bool:
        """Cheap test for the match path: has anyone appended since the last ``read_new``?

        The size comes from ``lseek(SEEK_END)``, one syscall returning an int, where ``fstat`` also
        builds a 20-field result (~4x the cost). Moving the offset is harmless: every write appends
        (``O_APPEND``) and every read says where (``pread``)."""
        try:
            return os.lseek(self._fd, 0, os.SEEK_END) > self._read
        except OSError:
            return False

    def read_new(self) -> np.ndarray:
        """Labels appended since the last call (all of them on the first call)."""
        with self._lock:
            size = os.fstat(self._fd).st_size
            size -= size % LABEL.itemsize  # a write in progress is read whole next time
            if size <= self._read:
                return np.empty(0, LABEL)
            data = os.pread(self._fd, size - self._read, self._read)
            self._read += len(data) - len(data) % LABEL.itemsize
            return np.frombuffer(data[: len(data) - len(data) % LABEL.itemsize], LABEL).astype(np.int64)

    def close(self) -> None:
        os.close(self._fd)
