"""A process-wide budget of memory for image decodes: a semaphore weighted in bytes, first come first served.

A count of decode slots cannot bound memory: one 50 MP RGBA PNG decodes to 200 MB and a
WebP of the same size to 800 MB, while a camera JPEG decoded at thumbnail scale needs 2 MB. So each
decode reserves its estimate (``media.validate.decode_cost``) before Pillow allocates anything,
waits while the budget is spent, and is refused (413) when it alone would exceed it. Concurrent
uploads therefore share one peak instead of multiplying it.

After a large decode the freed pages go back to the kernel (``malloc_trim``): glibc keeps freed
heap memory in its arenas, and a 200 MB image left ~400 MB of resident memory behind in every worker.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import threading
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from media.errors import DecodeBusy, MediaTooLarge

__all__ = ["DecodeBudget", "release_free_memory"]

MiB = 1024 * 1024
TRIM_FROM = 16 * MiB  # smaller decodes come from, and return to, ordinary malloc churn


def _malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None  # type: ignore[no-any-return]
    except (OSError, AttributeError):  # not glibc (musl has no malloc_trim)
        return None


_TRIM = _malloc_trim()


def release_free_memory() -> None:
    """Return freed heap pages to the kernel (glibc only; a no-op elsewhere)."""
    if _TRIM is not None:
        _TRIM(0)


class DecodeBudget:
    """``reserve(cost)`` around every image decode; thread-safe, FIFO so a large image is not starved."""

    def __init__(self, limit: int, wait: float) -> None:
        self.limit = limit
        self.wait = wait
        self._used = 0
        self._queue: deque[object] = deque()
        self._cond = threading.Condition()

    @property
    def used(self) -> int:
        return self._used

    @contextmanager
    def reserve(self, cost: int) -> Iterator[None]:
        """Hold ``cost`` bytes of the budget; raises ``MediaTooLarge`` (over the whole budget) or
        ``DecodeBusy`` (not free within ``wait`` seconds: the caller retries, 503)."""
        if cost > self.limit:
            raise MediaTooLarge(f"decoding this image needs about {cost // MiB} MiB, over the "
                                f"{self.limit // MiB} MiB image decode budget (media_decode_budget_bytes)")
        ticket = object()
        with self._cond:
            self._queue.append(ticket)
            try:
                if not self._cond.wait_for(lambda: self._queue[0] is ticket and self._used + cost <= self.limit,
                                           timeout=self.wait):
                    raise DecodeBusy(f"other uploads hold the image decode budget for more than {self.wait:g}s")
            finally:
                self._queue.remove(ticket)
                self._cond.notify_all()  # the next in line may fit now, or may be first now
            self._used += cost
        try:
            yield
        finally:
            with self._cond:
                self._used -= cost
                self._cond.notify_all()
            if cost >= TRIM_FROM:
                release_free_memory()
