"""How media objects are sealed: ``crypto.stream`` segments under a per-object DEK bound to the row.

The associated data binds each object to its media id and kind, so an object copied over another
key, or a thumbnail served as its parent, fails to open. A per-object DEK is wrapped by the KEK with
a context naming the media id; media linked to a subject use the subject's DEK instead, so the
subject's crypto-shred also makes its media unreadable, in the bucket and in every backup of it.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Iterator

from crypto.seal import aad
from crypto.stream import DEFAULT_SEGMENT_SIZE, seal_stream

__all__ = ["SEGMENT_SIZE", "media_aad", "seal_bytes", "seal_chunks", "wrap_context"]

SEGMENT_SIZE = DEFAULT_SEGMENT_SIZE  # 64 KiB: a Range read fetches and opens at most this much extra


def media_aad(media_id: uuid.UUID, kind: str) -> bytes:
    return aad("media", media_id.bytes, kind)


def wrap_context(media_id: uuid.UUID) -> bytes:
    """KEK wrap context of a per-object DEK: unwrapping it for another media row fails."""
    return b"media-dek:" + media_id.bytes


def seal_bytes(dek: bytes, plaintext: bytes, media_id: uuid.UUID, kind: str) -> bytes:
    return b"".join(seal_stream(dek, [plaintext], media_aad(media_id, kind), SEGMENT_SIZE))


def seal_chunks(dek: bytes, chunks: Iterable[bytes], media_id: uuid.UUID, kind: str) -> Iterator[bytes]:
    return seal_stream(dek, chunks, media_aad(media_id, kind), SEGMENT_SIZE)
