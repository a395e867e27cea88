"""Byte plumbing between HTTP bodies, the S3 SDK and the AEAD stream: full reads, primed iterators, Range.

Kept apart from ``media.service`` because it changes with protocols (HTTP Range, the SDK's read
contract), not with what the appliance stores.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from itertools import chain
from typing import BinaryIO

from crypto.errors import AuthenticationError
from media.errors import MediaError, RangeNotSatisfiable

__all__ = ["FullReader", "parse_range", "primed", "read_up_to"]


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """One ``bytes=`` range as inclusive (first, last); None means "send everything" (RFC 9110 §14.2).

    Multiple ranges and malformed headers are ignored (allowed by the RFC); a well-formed range
    that starts past the end raises ``RangeNotSatisfiable`` (416).
    """
    if not header or not header.startswith("bytes=") or "," in header:
        return None
    first_s, sep, last_s = header[6:].strip().partition("-")
    if not sep or not (first_s.isdigit() or last_s.isdigit()):
        return None
    if not first_s:  # suffix: the last N bytes
        n = int(last_s)
        if n == 0 or size == 0:
            raise RangeNotSatisfiable(f"range {header!r} is outside the {size}-byte content")
        return max(0, size - n), size - 1
    if last_s and not last_s.isdigit():
        return None
    first = int(first_s)
    last = int(last_s) if last_s else size - 1
    if last_s and last < first:
        return None  # syntactically invalid: ignored
    if first >= size:
        raise RangeNotSatisfiable(f"range {header!r} is outside the {size}-byte content")
    return first, min(last, size - 1)


def read_up_to(reader: BinaryIO, n: int) -> bytes:
    """Read until ``n`` bytes or end of input (a socket-backed reader may return short reads)."""
    parts, got = [], 0
    while got < n:
        chunk = reader.read(n - got)
        if not chunk:
            break
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts)


def primed(body: Iterator[bytes]) -> Iterator[bytes]:
    """Pull the first piece now, so a missing object or a failed open is an error response, not a cut stream."""
    try:
        first = next(body)
    except StopIteration:
        return iter(())
    except AuthenticationError as exc:
        raise MediaError(f"stored object failed authentication: {exc}") from None
    return chain((first,), body)


class FullReader:
    """A file-like ``read(n)`` over an iterator of bytes that returns exactly ``n`` bytes until the end.

    Full reads matter: the SDK then takes each multipart part as one buffer, so the upload holds
    about one part in memory instead of a part plus the copies of repeated concatenation.
    """

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks = chunks
        self._pending: deque[bytes] = deque()
        self._have = 0
        self._done = False

    def read(self, n: int = -1) -> bytes:
        while not self._done and (n < 0 or self._have < n):
            try:
                chunk = next(self._chunks)
            except StopIteration:
                self._done = True
                break
            self._pending.append(chunk)
            self._have += len(chunk)
        take = self._have if n < 0 else min(n, self._have)
        parts, got = [], 0
        while got < take:
            chunk = self._pending.popleft()
            if got + len(chunk) > take:
                cut = take - got
                self._pending.appendleft(chunk[cut:])
                chunk = chunk[:cut]
            parts.append(chunk)
            got += len(chunk)
        self._have -= take
        return parts[0] if len(parts) == 1 else b"".join(parts)
