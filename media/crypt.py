"""How media objects are sealed: ``crypto.stream`` segments under a per-object DEK bound to the row.

The associated data binds each object to its media id and kind, so an object copied over another
key, or a thumbnail served as its parent, fails to open. A per-object DEK is wrapped by the KEK with
a context naming the media id; media linked to a subject use the subject's DEK instead, so the
subject's crypto-shred also makes its media unreadable, in the bucket and in every backup of it.

Per-object DEKs come from a ``DekReserve``: fresh keys wrapped a batch at a time, so an upload does
not pay a Vault round trip of its own (one transit call costs more CPU, client and server, than
sealing a 200 KB image).
"""

from __future__ import annotations

import math
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import NamedTuple

from crypto.errors import KeyProviderUnavailable
from crypto.providers.base import KeyProvider
from crypto.seal import aad, new_dek
from crypto.stream import DEFAULT_SEGMENT_SIZE, seal_stream

__all__ = ["SEGMENT_SIZE", "DekReserve", "ObjectDek", "media_aad", "seal_bytes", "seal_chunks", "wrap_context"]

SEGMENT_SIZE = DEFAULT_SEGMENT_SIZE  # 64 KiB: a Range read fetches and opens at most this much extra
RESERVE_BATCH = 64  # DEKs per transit call: ~20 image uploads (3 keys each) per Vault round trip
RESERVE_MAX_AGE = 5.0  # seconds a wrapped DEK may wait for its upload (bounds the KEK-rotation lag)
RESERVE_RETRY_AFTER = 1.0  # after a failed wrap, seconds during which other uploads fail fast (503)


def media_aad(media_id: uuid.UUID, kind: str) -> bytes:
    return aad("media", media_id.bytes, kind)


def wrap_context(media_id: uuid.UUID) -> bytes:
    """KEK wrap context of a per-object DEK: unwrapping it for another media row fails."""
    return b"media-dek:" + media_id.bytes


def seal_bytes(dek: bytes, plaintext: bytes, media_id: uuid.UUID, kind: str) -> bytes:
    return b"".join(seal_stream(dek, [plaintext], media_aad(media_id, kind), SEGMENT_SIZE))


def seal_chunks(dek: bytes, chunks: Iterable[bytes], media_id: uuid.UUID, kind: str) -> Iterator[bytes]:
    return seal_stream(dek, chunks, media_aad(media_id, kind), SEGMENT_SIZE)


class ObjectDek(NamedTuple):
    """The id of a new media row, the DEK that seals it, and what the row stores about that DEK.

    ``wrapped``/``kek_version`` are None when the DEK is the subject's (stored wrapped in
    ``subject_keys``, so the row stores nothing), as in ``media.wrapped_dek``.
    """

    media_id: uuid.UUID
    dek: bytes
    wrapped: bytes | None
    kek_version: int | None

    def __repr__(self) -> str:  # never print key material
        return f"ObjectDek(media_id={self.media_id}, kek_version={self.kek_version})"


class DekReserve:
    """Per-object DEKs wrapped by the KEK ahead of use, ``batch`` per round trip; thread-safe.

    Nothing about the keys changes: each is 256 fresh random bits, used for exactly one object, and
    wrapped with the context of the media id it is handed out with (which is why the ids are minted
    here, with the keys). The reserve only lives in this process's memory, next to the DEK cache.
    A key older than ``max_age`` seconds is dropped unused, so after a KEK rotation new uploads use
    the new KEK version within ``max_age`` seconds (``appliance keys rotate-kek --resume`` picks up
    any row inserted in that window; ``retire-old`` refuses until none lag).

    Refills are serialised, so while the provider is down the uploads queued behind a failed refill
    fail at once for ``retry_after`` seconds instead of each waiting out its own timeout in turn.
    """

    def __init__(
        self,
        provider: Callable[[], KeyProvider],
        batch: int = RESERVE_BATCH,
        max_age: float = RESERVE_MAX_AGE,
        retry_after: float = RESERVE_RETRY_AFTER,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if batch < 1 or max_age <= 0 or retry_after < 0:
            raise ValueError("batch must be >= 1, max_age > 0 and retry_after >= 0")
        self._provider = provider
        self.batch = batch
        self.max_age = max_age
        self.retry_after = retry_after
        self._clock = clock
        self._lock = threading.Lock()
        self._ready: deque[ObjectDek] = deque()
        self._wrapped_at = -math.inf
        self._failed_at = -math.inf

    def __repr__(self) -> str:
        return f"DekReserve(batch={self.batch}, max_age={self.max_age})"

    def take(self, n: int) -> list[ObjectDek]:
        """``n`` unused keys; wraps a new batch (one provider call, under the lock) when too few are fresh.

        Raises what the provider raises (``KeyProviderUnavailable`` while Vault is down).
        """
        with self._lock:
            now = self._clock()
            if now - self._wrapped_at >= self.max_age:
                self._ready.clear()
            if len(self._ready) < n:
                if now - self._failed_at < self.retry_after:
                    raise KeyProviderUnavailable("the key provider failed to wrap DEKs moments ago; retry shortly")
                try:
                    self._refill(max(n, self.batch))
                except KeyProviderUnavailable:
                    self._failed_at = self._clock()
                    raise
                self._wrapped_at = now
            return [self._ready.popleft() for _ in range(n)]

    def clear(self) -> None:
        """Forget every reserved key (shutdown, or to pick up a rotated KEK at once)."""
        with self._lock:
            self._ready.clear()

    def _refill(self, count: int) -> None:
        """Replace the reserve with ``count`` new keys: mixing batches would let old ones outlive ``max_age``."""
        provider = self._provider()
        ids = [uuid.uuid4() for _ in range(count)]
        deks = [new_dek() for _ in range(count)]
        wrapped = provider.wrap_many(deks, [wrap_context(i) for i in ids])
        fresh = zip(ids, deks, wrapped, strict=True)
        self._ready = deque(ObjectDek(i, d, w, provider.wrapped_version(w)) for i, d, w in fresh)
