"""Chunked AEAD for large media (STREAM construction), so sealing and opening keep memory flat.

The plaintext is cut into fixed-size segments; each is sealed with AES-256-GCM on its own nonce, so a
reader can verify and release one segment at a time and can decrypt any byte range (HTTP Range)
from just the segments that cover it.

Sealed object layout (integers big-endian)::

    header (12 bytes, authenticated as part of every segment's associated data)
      offset 0   1 byte   format version, 0x01
      offset 1   4 bytes  plaintext segment size S (uint32, 1 .. 16 MiB; default 64 KiB)
      offset 5   7 bytes  random nonce prefix P (fresh per object, os.urandom)
    segment i = 0 .. N-1, each ``len(plaintext_i) + 16`` bytes: AES-256-GCM ciphertext and tag
      nonce_i = P || uint32(i) || last_flag   (last_flag = 0x01 only for segment N-1, else 0x00)
      associated data = header || aad

N = max(1, ceil(plaintext_size / S)); every segment but the last holds exactly S plaintext bytes,
the last holds 1..S bytes (0 only for an empty plaintext). The counter stops reordering, the last
flag stops truncation at a segment boundary and extension, the header in the associated data stops
splicing segments between objects or changing S.

Random access (e.g. serving ``Range: bytes=a-b`` from S3)::

    span = segment_span(a, b + 1, S, plaintext_size)           # end is exclusive
    header = s3_get(key, 0, HEADER_SIZE)                          # or cache it beside the row
    body = s3_get(key, span.cipher_start, span.cipher_end - span.cipher_start)
    yield from open_range(dek, header, [body], a, b + 1, plaintext_size, aad)
"""

from __future__ import annotations

import io
import math
import os
import struct
from collections.abc import Iterable, Iterator
from typing import NamedTuple

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from crypto.errors import AuthenticationError
from crypto.seal import DEK_SIZE, TAG_SIZE

__all__ = [
    "DEFAULT_SEGMENT_SIZE",
    "HEADER_SIZE",
    "SegmentSpan",
    "StreamHeader",
    "open_range",
    "open_segments",
    "open_stream",
    "open_stream_into",
    "parse_header",
    "seal_stream",
    "sealed_size",
    "segment_count",
    "segment_span",
]

FORMAT_VERSION = 1
DEFAULT_SEGMENT_SIZE = 64 * 1024
MAX_SEGMENT_SIZE = 16 * 1024 * 1024
_HEADER = struct.Struct(">BI7s")
HEADER_SIZE = _HEADER.size
_MAX_SEGMENTS = 2**32


class StreamHeader(NamedTuple):
    """The parsed 12-byte header; ``raw`` is kept because it is part of every segment's associated data."""

    segment_size: int
    nonce_prefix: bytes
    raw: bytes


class SegmentSpan(NamedTuple):
    """Segments covering a plaintext range and the ciphertext byte range [cipher_start, cipher_end)."""

    first_segment: int
    last_segment: int
    cipher_start: int
    cipher_end: int


def _check_segment_size(segment_size: int) -> None:
    """Bound S: the reader allocates one segment, and S comes from an untrusted header."""
    if not 1 <= segment_size <= MAX_SEGMENT_SIZE:
        raise ValueError(f"segment_size must be within 1..{MAX_SEGMENT_SIZE}")


def _cipher(dek: bytes) -> AESGCM:
    if len(dek) != DEK_SIZE:
        raise ValueError(f"a DEK must be {DEK_SIZE} bytes, got {len(dek)}")
    return AESGCM(dek)


def segment_count(plaintext_size: int, segment_size: int = DEFAULT_SEGMENT_SIZE) -> int:
    """Number of segments N for a plaintext: an empty plaintext still has one (empty, final) segment."""
    _check_segment_size(segment_size)
    return max(1, math.ceil(plaintext_size / segment_size))


def sealed_size(plaintext_size: int, segment_size: int = DEFAULT_SEGMENT_SIZE) -> int:
    """Exact size of the sealed object, so callers can set Content-Length before sealing."""
    return HEADER_SIZE + plaintext_size + TAG_SIZE * segment_count(plaintext_size, segment_size)


def parse_header(header: bytes) -> StreamHeader:
    """Parse and sanity-check the header; a bad one raises ``AuthenticationError`` (it is untrusted)."""
    if len(header) < HEADER_SIZE:
        raise AuthenticationError("sealed stream is truncated (incomplete header)")
    version, segment_size, prefix = _HEADER.unpack_from(header)
    if version != FORMAT_VERSION:
        raise AuthenticationError(f"unknown sealed stream format version {version}")
    if not 1 <= segment_size <= MAX_SEGMENT_SIZE:
        raise AuthenticationError("sealed stream header has an invalid segment size")
    return StreamHeader(segment_size, prefix, bytes(header[:HEADER_SIZE]))


def _nonce(prefix: bytes, index: int, last: bool) -> bytes:
    if index >= _MAX_SEGMENTS:
        raise ValueError("stream too long: segment counter would wrap")
    return prefix + struct.pack(">IB", index, 1 if last else 0)


def seal_stream(
    dek: bytes, chunks: Iterable[bytes], aad: bytes, segment_size: int = DEFAULT_SEGMENT_SIZE
) -> Iterator[bytes]:
    """Yield the header, then one sealed segment per S plaintext bytes; holds at most one segment.

    A full segment is only sealed once more input arrives, because the final segment (full or not)
    must carry the last flag.
    """
    _check_segment_size(segment_size)
    cipher = _cipher(dek)
    header = _HEADER.pack(FORMAT_VERSION, segment_size, os.urandom(7))
    prefix, associated = header[5:], header + aad
    yield header
    pending = bytearray()
    index = 0
    for chunk in chunks:
        view = memoryview(chunk).cast("B")
        pos = 0
        while pos < len(view):
            if len(pending) == segment_size:
                yield cipher.encrypt(_nonce(prefix, index, False), bytes(pending), associated)
                pending.clear()
                index += 1
            take = min(segment_size - len(pending), len(view) - pos)
            pending += view[pos : pos + take]
            pos += take
    yield cipher.encrypt(_nonce(prefix, index, True), bytes(pending), associated)


def _open_segment(cipher: AESGCM, header: StreamHeader, index: int, last: bool, sealed: bytes, aad: bytes) -> bytes:
    try:
        return cipher.decrypt(_nonce(header.nonce_prefix, index, last), sealed, header.raw + aad)
    except InvalidTag:
        raise AuthenticationError(
            f"sealed stream segment {index} failed authentication "
            "(wrong key or context, tampered, reordered, truncated or extended)"
        ) from None


def _open_from(
    cipher: AESGCM,
    header: StreamHeader,
    buf: bytearray,
    rest: Iterator[bytes],
    first_segment: int,
    total_segments: int | None,
    aad: bytes,
) -> Iterator[bytes]:
    """Open consecutive segments; the final one present is 'last' iff it is segment N-1 (or N unknown)."""
    sealed_len = header.segment_size + TAG_SIZE
    index = first_segment
    exhausted = False
    while True:
        # Keep at least one byte beyond a full segment before opening it, so we know it is not final.
        while not exhausted and len(buf) <= sealed_len:
            try:
                buf += next(rest)
            except StopIteration:
                exhausted = True
        if len(buf) > sealed_len:
            if total_segments is not None and index >= total_segments - 1:
                raise AuthenticationError("sealed stream has data after its final segment")
            yield _open_segment(cipher, header, index, False, bytes(buf[:sealed_len]), aad)
            del buf[:sealed_len]
            index += 1
            continue
        if len(buf) < TAG_SIZE:
            raise AuthenticationError("sealed stream is truncated")
        last = total_segments is None or index == total_segments - 1
        yield _open_segment(cipher, header, index, last, bytes(buf), aad)
        return


def _header_and_rest(chunks: Iterable[bytes]) -> tuple[StreamHeader, bytearray, Iterator[bytes]]:
    buf = bytearray()
    rest = iter(chunks)
    for chunk in rest:
        buf += chunk
        if len(buf) >= HEADER_SIZE:
            break
    header = parse_header(bytes(buf))
    del buf[:HEADER_SIZE]
    return header, buf, rest


def open_stream(dek: bytes, chunks: Iterable[bytes], aad: bytes) -> Iterator[bytes]:
    """Yield verified plaintext segment by segment; raises ``AuthenticationError`` on any tampering.

    Each yielded piece is authentic, but truncation is only detectable at the end: a consumer that
    forwards pieces (e.g. an HTTP response) must abort, not complete, when the iterator raises.
    """
    cipher = _cipher(dek)
    header, buf, rest = _header_and_rest(chunks)
    yield from _open_from(cipher, header, buf, rest, 0, None, aad)


def open_stream_into(dek: bytes, source: io.BufferedIOBase, aad: bytes, out: memoryview | bytearray) -> None:
    """Open a whole sealed stream of exactly ``len(out)`` plaintext bytes from ``source`` into ``out``.

    For large objects opened in one piece (index snapshots): each segment is read into one reused
    buffer and decrypted straight into its place in ``out``, so the plaintext is written once. Raises
    ``AuthenticationError`` on tampering or if the stream is longer or shorter than ``out``; ``out``
    then holds unverified bytes and must be discarded.
    """
    cipher = _cipher(dek)
    header = parse_header(source.read(HEADER_SIZE))
    associated = header.raw + aad
    target = memoryview(out).cast("B")
    size, segment = len(target), header.segment_size
    total = segment_count(size, segment)
    sealed = memoryview(bytearray(segment + TAG_SIZE))
    for index in range(total):
        start = index * segment
        length = min(segment, size - start) + TAG_SIZE
        if source.readinto(sealed[:length]) != length:
            raise AuthenticationError("sealed stream is truncated")
        last = index == total - 1
        try:
            cipher.decrypt_into(_nonce(header.nonce_prefix, index, last), sealed[:length], associated,
                                target[start : start + length - TAG_SIZE])
        except InvalidTag:
            raise AuthenticationError(
                f"sealed stream segment {index} failed authentication "
                "(wrong key or context, tampered, reordered, truncated or extended)"
            ) from None
    if source.read(1):
        raise AuthenticationError("sealed stream has data after its final segment")


def segment_span(plain_start: int, plain_end: int, segment_size: int, plaintext_size: int | None = None) -> SegmentSpan:
    """Map the plaintext range [plain_start, plain_end) to the segments and ciphertext bytes holding it.

    ``plain_end`` is exclusive (HTTP ``bytes=a-b`` is ``a, b + 1``). Offsets are absolute in the sealed
    object, header included. Pass ``plaintext_size`` to clamp to the object and size the final segment
    exactly; without it the last segment is assumed full (S3 clamps a range past the end anyway).
    """
    _check_segment_size(segment_size)
    if plaintext_size is not None:
        plain_end = min(plain_end, plaintext_size)
    if not 0 <= plain_start < plain_end:
        raise ValueError("need 0 <= plain_start < plain_end (within the plaintext)")
    first, last = plain_start // segment_size, (plain_end - 1) // segment_size
    stride = segment_size + TAG_SIZE
    last_len = segment_size
    if plaintext_size is not None:
        last_len = min(segment_size, plaintext_size - last * segment_size)
    return SegmentSpan(first, last, HEADER_SIZE + first * stride, HEADER_SIZE + last * stride + last_len + TAG_SIZE)


def open_segments(
    dek: bytes,
    header: bytes,
    cipher_bytes: bytes | Iterable[bytes],
    first_segment: int,
    total_segments: int,
    aad: bytes,
) -> Iterator[bytes]:
    """Open consecutive segments starting at ``first_segment`` from a ciphertext range (see module doc).

    ``total_segments`` (``segment_count(plaintext_size, S)``) tells which segment must carry the last
    flag, so a range ending at the object's end is checked for truncation like a full read.
    """
    cipher = _cipher(dek)
    parsed = parse_header(header)
    chunks = [cipher_bytes] if isinstance(cipher_bytes, bytes | bytearray | memoryview) else cipher_bytes
    if not 0 <= first_segment < total_segments:
        raise ValueError("first_segment must be within 0..total_segments-1")
    yield from _open_from(cipher, parsed, bytearray(), iter(chunks), first_segment, total_segments, aad)


def open_range(
    dek: bytes,
    header: bytes,
    cipher_bytes: bytes | Iterable[bytes],
    plain_start: int,
    plain_end: int,
    plaintext_size: int,
    aad: bytes,
) -> Iterator[bytes]:
    """Yield exactly plaintext[plain_start:plain_end] from the ciphertext range ``segment_span`` named."""
    parsed = parse_header(header)
    span = segment_span(plain_start, plain_end, parsed.segment_size, plaintext_size)
    total = segment_count(plaintext_size, parsed.segment_size)
    skip = plain_start - span.first_segment * parsed.segment_size
    remaining = min(plain_end, plaintext_size) - plain_start
    for piece in open_segments(dek, header, cipher_bytes, span.first_segment, total, aad):
        piece = piece[skip:]
        skip = 0
        if len(piece) >= remaining:
            yield piece[:remaining]
            return
        remaining -= len(piece)
        yield piece
    raise AuthenticationError("sealed stream range is truncated")
