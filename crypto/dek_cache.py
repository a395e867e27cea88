"""In-memory cache of unwrapped DEKs, so a busy subject costs one Vault round trip per TTL, not per read.

Bounded LRU with a time-to-live: an unwrapped key lives at most ``ttl`` seconds and at most
``max_size`` keys are held. Erasure calls ``evict`` so a shredded subject's DEK leaves memory at once.
(Python cannot reliably zero ``bytes``; dropping the last reference is the best we can do.)
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable

from prometheus_client import Counter

__all__ = ["DekCache"]

# Registered once per process at import; every DekCache instance shares them.
CACHE_HITS = Counter("appliance_dek_cache_hits", "Unwrapped-DEK cache lookups served from memory")
CACHE_MISSES = Counter("appliance_dek_cache_misses", "Unwrapped-DEK cache lookups that need an unwrap")
CACHE_EVICTIONS = Counter(
    "appliance_dek_cache_evictions", "DEKs dropped from the cache", ["reason"]
)  # reason: lru | ttl | explicit


class DekCache:
    """Thread-safe bounded LRU of ``key_id -> DEK`` with a per-entry TTL; never logs or prints DEKs."""

    def __init__(self, max_size: int = 10000, ttl: float = 300.0, clock: Callable[[], float] = time.monotonic) -> None:
        if max_size < 1 or ttl <= 0:
            raise ValueError("max_size must be >= 1 and ttl > 0")
        self.max_size = max_size
        self.ttl = ttl
        self._clock = clock
        self._lock = threading.Lock()
        self._entries: OrderedDict[Hashable, tuple[float, bytes]] = OrderedDict()

    def __repr__(self) -> str:
        return f"DekCache(size={len(self)}, max_size={self.max_size}, ttl={self.ttl})"

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def get(self, key_id: Hashable) -> bytes | None:
        """Return the cached DEK, or None when absent or expired (an expired entry is dropped)."""
        now = self._clock()
        with self._lock:
            entry = self._entries.get(key_id)
            if entry is not None and entry[0] <= now:
                del self._entries[key_id]
                CACHE_EVICTIONS.labels("ttl").inc()
                entry = None
            if entry is None:
                CACHE_MISSES.inc()
                return None
            self._entries.move_to_end(key_id)
            CACHE_HITS.inc()
            return entry[1]

    def put(self, key_id: Hashable, dek: bytes) -> None:
        """Insert or refresh a DEK; the least recently used entry goes when the cache is full."""
        expires = self._clock() + self.ttl
        with self._lock:
            self._entries[key_id] = (expires, dek)
            self._entries.move_to_end(key_id)
            while len(self._entries) > self.max_size:
                self._entries.popitem(last=False)
                CACHE_EVICTIONS.labels("lru").inc()

    def evict(self, key_id: Hashable) -> None:
        """Forget one DEK now (erasure, key destruction); a missing key is not an error."""
        with self._lock:
            if self._entries.pop(key_id, None) is not None:
                CACHE_EVICTIONS.labels("explicit").inc()

    def clear(self) -> None:
        """Forget every DEK (KEK rotation with retirement, shutdown)."""
        with self._lock:
            count = len(self._entries)
            self._entries.clear()
        if count:
            CACHE_EVICTIONS.labels("explicit").inc(count)
