"""Clip containers judged by their structure, not by a magic number: MP4 (ISO BMFF) and WebM (EBML).

Pure and incremental: ``ClipCheck.feed`` takes the bytes as they stream past and ``close`` ends the
body. A clip is never held in memory: media data (``mdat``, clusters) is skipped by its declared size
and only small header structures are buffered (``ftyp``, ``moov``, the EBML header, ``Info``). Both
raise ``MalformedMedia`` (422) as soon as the bytes cannot be a real clip, so a 16-byte ``ftyp``
followed by junk fails at its second "box", not after 256 MiB.

What a clip must have:
- MP4: ``ftyp`` first; every top-level box a four-character type with a size that fits the file
  exactly (a box of size 0 runs to the end and must be last); one ``moov`` holding one ``mvhd`` with
  a positive timescale and duration (or ``mvex`` plus ``moof`` fragments) and at least one ``trak``;
  an ``mdat``.
- WebM: an EBML header with DocType ``webm``; a Segment whose children are Matroska level-1 elements
  fitting its size (unknown sizes only for the Segment and Clusters, as live recorders write them);
  an ``Info`` with a positive Duration, or at least one Cluster; nothing but Void after the Segment.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Generator
from dataclasses import dataclass
from typing import NamedTuple

from media.errors import MalformedMedia, UnsupportedMedia

__all__ = ["ClipCheck", "ClipInfo", "check_clip"]

MAX_MOOV = 32 * 1024 * 1024  # a 256 MiB clip's sample tables take a few MB; more is an attack, not a clip
MAX_SMALL = 1024 * 1024  # ftyp, EBML header, Info: a few dozen bytes in practice
MAX_ITEMS = 1_000_000  # boxes/elements walked per clip: bounds the CPU one upload can cost


@dataclass(frozen=True)
class ClipInfo:
    container: str  # "mp4" | "webm"
    duration: float | None  # seconds, when the container states it (fragmented/live files may not)


class _Read(NamedTuple):
    """Ask for the next ``n`` bytes (b"" back at the end of the file, only where nothing was read yet)."""

    n: int
    what: str


class _Skip(NamedTuple):
    """Pass over ``n`` bytes of media data; ``None``: everything up to the end of the file."""

    n: int | None
    what: str


_Parser = Generator[_Read | _Skip, bytes | None, ClipInfo]


class ClipCheck:
    """Runs one container parser over a streamed body: ``feed`` every chunk, then ``close``."""

    def __init__(self, fmt: str) -> None:
        parsers = {"mp4": _mp4, "webm": _webm}
        if fmt not in parsers:
            raise UnsupportedMedia(f"{fmt} is not a clip format")
        self._gen: _Parser = parsers[fmt]()
        self._buf = bytearray()
        self._left = 0
        self._req: _Read | _Skip = _Read(0, "")
        self._advance(None, first=True)

    def _advance(self, value: bytes | None, first: bool = False) -> None:
        try:
            self._req = next(self._gen) if first else self._gen.send(value)
        except StopIteration:  # the parsers only return once told the file ended
            raise MalformedMedia("data after the end of the clip") from None
        if isinstance(self._req, _Skip) and self._req.n is not None:
            self._left = self._req.n

    def feed(self, data: bytes) -> None:
        view, i, n = memoryview(data), 0, len(data)
        while i < n:
            req = self._req
            if isinstance(req, _Skip):
                if req.n is None:
                    return  # the last box runs to the end: nothing more to check
                take = min(self._left, n - i)
                self._left -= take
                i += take
                if not self._left:
                    self._advance(None)
            else:
                take = min(req.n - len(self._buf), n - i)
                self._buf += view[i : i + take]
                i += take
                if len(self._buf) == req.n:
                    out = bytes(self._buf)
                    self._buf.clear()
                    self._advance(out)

    def close(self) -> ClipInfo:
        """The end of the body: raises if a box or element runs past it or something required is missing."""
        req = self._req
        if isinstance(req, _Skip) and req.n is not None:
            raise MalformedMedia(f"{req.what} runs past the end of the file ({self._left} bytes missing)")
        if isinstance(req, _Read) and self._buf:
            raise MalformedMedia(f"the file ends inside {req.what}")
        try:
            self._gen.send(None if isinstance(req, _Skip) else b"")
        except StopIteration as done:
            return done.value  # type: ignore[no-any-return]
        raise MalformedMedia("the file ends too early")


def check_clip(fmt: str, data: bytes) -> ClipInfo:
    """Check a whole clip held in memory (tests, small bodies)."""
    check = ClipCheck(fmt)
    check.feed(data)
    return check.close()


def _read(n: int, what: str) -> Generator[_Read | _Skip, bytes | None, bytes]:
    """Exactly ``n`` bytes inside a structure: the end of the file here means it is truncated."""
    data = yield _Read(n, what)
    if not data or len(data) != n:
        raise MalformedMedia(f"the file ends inside {what}")
    return data


# --- MP4 (ISO/IEC 14496-12) ------------------------------------------------------------------------


def _fourcc(kind: bytes) -> str:
    """A box type as text for messages; a type that is not four printable characters means "not a box"."""
    if not all(0x20 <= c <= 0x7E for c in kind):
        raise MalformedMedia("MP4 box has no valid four-character type (the data is not an ISO BMFF box)")
    return kind.decode("ascii")


def _mp4() -> _Parser:
    seen: dict[bytes, int] = {}
    moov: tuple[int, int, bool] | None = None
    offset = 0
    while True:
        head = yield _Read(8, "an MP4 box header")
        if not head:
            break  # the file ends at a box boundary
        size, kind = int.from_bytes(head[:4], "big"), head[4:8]
        name = _fourcc(kind)
        header = 8
        if size == 1:
            size = int.from_bytes((yield from _read(8, f"the 64-bit size of box {name!r}")), "big")
            header = 16
        if offset == 0 and kind != b"ftyp":
            raise MalformedMedia("an MP4 file starts with an ftyp box")
        seen[kind] = seen.get(kind, 0) + 1
        if sum(seen.values()) > MAX_ITEMS:
            raise MalformedMedia(f"MP4 has more than {MAX_ITEMS} boxes")
        if size == 0:  # "extends to the end of the file": only ever the last box
            if kind in (b"ftyp", b"moov"):
                raise MalformedMedia(f"box {name!r} must state its size")
            yield _Skip(None, f"box {name!r}")
            break
        if size < header:
            raise MalformedMedia(f"box {name!r} at offset {offset} is smaller than its own header")
        body = size - header
        if kind == b"ftyp":
            if seen[kind] > 1 or body < 8 or body % 4 or body > MAX_SMALL:
                raise MalformedMedia("MP4 ftyp box is malformed (duplicate, or not brand + version + brands)")
            yield from _read(body, "the ftyp box")
        elif kind == b"moov":
            if seen[kind] > 1 or body == 0 or body > MAX_MOOV:
                raise MalformedMedia(f"MP4 moov box is malformed (duplicate, empty, or over {MAX_MOOV} bytes)")
            moov = _moov((yield from _read(body, "the moov box")))
        elif body:
            yield _Skip(body, f"box {name!r} at offset {offset}")
        offset += size
    if moov is None:
        raise MalformedMedia("MP4 has no moov box (no movie header)")
    if not seen.get(b"mdat"):
        raise MalformedMedia("MP4 has no mdat box (no media data)")
    timescale, duration, fragmented = moov
    if fragmented and not seen.get(b"moof"):
        raise MalformedMedia("fragmented MP4 (mvex) has no moof fragment")
    return ClipInfo("mp4", duration / timescale if duration else None)


def _boxes(data: bytes, parent: str) -> list[tuple[bytes, bytes]]:
    """(type, payload) of the boxes filling ``data`` exactly, as children of ``parent``."""
    out, pos, end = [], 0, len(data)
    while pos < end:
        if end - pos < 8:
            raise MalformedMedia(f"{parent} ends inside a box header")
        size, kind = int.from_bytes(data[pos : pos + 4], "big"), data[pos + 4 : pos + 8]
        name, header = _fourcc(kind), 8
        if size == 1:
            if end - pos < 16:
                raise MalformedMedia(f"{parent} ends inside a box header")
            size, header = int.from_bytes(data[pos + 8 : pos + 16], "big"), 16
        if size < header or pos + size > end:
            raise MalformedMedia(f"box {name!r} does not fit in its parent {parent}")
        out.append((kind, data[pos + header : pos + size]))
        pos += size
    return out


def _moov(data: bytes) -> tuple[int, int, bool]:
    """(timescale, duration, fragmented) from the movie box; raises unless it describes a movie."""
    children = _boxes(data, "moov")
    kinds = [k for k, _ in children]
    if kinds.count(b"mvhd") != 1:
        raise MalformedMedia("MP4 moov must hold exactly one mvhd (movie header)")
    if b"trak" not in kinds:
        raise MalformedMedia("MP4 moov has no trak (no track)")
    mvhd = next(p for k, p in children if k == b"mvhd")
    version = mvhd[0] if mvhd else -1
    if version == 0 and len(mvhd) >= 100:
        timescale, duration = struct.unpack_from(">II", mvhd, 12)
        unknown = duration == 0xFFFFFFFF
    elif version == 1 and len(mvhd) >= 112:
        timescale, duration = struct.unpack_from(">IQ", mvhd, 20)
        unknown = duration == 0xFFFFFFFFFFFFFFFF
    else:
        raise MalformedMedia("MP4 mvhd is truncated or of an unknown version")
    duration = 0 if unknown else duration
    fragmented = b"mvex" in kinds
    if timescale == 0:
        raise MalformedMedia("MP4 mvhd has a zero timescale")
    if duration == 0 and not fragmented:
        raise MalformedMedia("MP4 mvhd states no duration")
    return timescale, duration, fragmented


# --- WebM (Matroska subset over EBML, RFC 8794 / RFC 9559) ------------------------------------------

EBML, DOCTYPE, SEGMENT, CLUSTER, INFO = 0x1A45DFA3, 0x4282, 0x18538067, 0x1F43B675, 0x1549A966
DURATION, TIMESTAMP_SCALE, VOID, CRC32 = 0x4489, 0x2AD7B1, 0xEC, 0xBF
# The Segment's children (Matroska level 1): SeekHead, Info, Tracks, Chapters, Cluster, Cues, Attachments, Tags.
_LEVEL1 = frozenset({0x114D9B74, INFO, 0x1654AE6B, 0x1043A770, CLUSTER, 0x1C53BB6B, 0x1941A469, 0x1254C367})
# A Cluster's children: Timestamp, SilentTracks, Position, PrevSize, SimpleBlock, BlockGroup, EncryptedBlock.
_CLUSTER_CHILDREN = frozenset({0xE7, 0x5854, 0xA7, 0xAB, 0xA3, 0xA0, 0xAF})
_GLOBAL = frozenset({VOID, CRC32})


class _Element(NamedTuple):
    id: int
    size: int | None  # None: unknown size (all value bits set)
    header: int  # bytes of ID and size


def _vint_length(first: int, longest: int, what: str) -> int:
    length = 9 - first.bit_length() if first else 9
    if length > longest:
        raise MalformedMedia(f"{what} is not a valid EBML element")
    return length


def _element(what: str) -> Generator[_Read | _Skip, bytes | None, _Element | None]:
    """The next element header from the stream, or None at a clean end of the file."""
    first = yield _Read(1, what)
    if not first:
        return None
    id_len = _vint_length(first[0], 4, what)
    ident = first + (yield from _read(id_len - 1, what)) if id_len > 1 else first
    size_first = yield from _read(1, what)
    size_len = _vint_length(size_first[0], 8, what)
    raw = size_first + (yield from _read(size_len - 1, what)) if size_len > 1 else size_first
    return _Element(int.from_bytes(ident, "big"), _vint_value(raw), id_len + size_len)


def _vint_value(raw: bytes) -> int | None:
    value = int.from_bytes(raw, "big") & ((1 << (7 * len(raw))) - 1)  # drop the length marker bit
    return None if value == (1 << (7 * len(raw))) - 1 else value


def _children(data: bytes, parent: str) -> list[tuple[int, bytes]]:
    """(id, payload) of the known-size elements filling ``data`` exactly."""
    out, pos, end = [], 0, len(data)
    while pos < end:
        id_len = _vint_length(data[pos], 4, f"an element in {parent}")
        if pos + id_len >= end:
            raise MalformedMedia(f"{parent} ends inside an element header")
        size_len = _vint_length(data[pos + id_len], 8, f"an element in {parent}")
        start = pos + id_len + size_len
        size = _vint_value(data[pos + id_len : start]) if start <= end else None
        if size is None or start + size > end:
            raise MalformedMedia(f"an element does not fit in its parent {parent}")
        out.append((int.from_bytes(data[pos : pos + id_len], "big"), data[start : start + size]))
        pos = start + size
    return out


def _doctype(header: bytes) -> None:
    found = [p for i, p in _children(header, "the EBML header") if i == DOCTYPE]
    if not found:
        raise MalformedMedia("EBML header has no DocType")
    value = found[0].rstrip(b"\0")
    if value != b"webm":
        raise UnsupportedMedia(f"EBML DocType {value[:16]!r} is not WebM")


def _info_duration(info: bytes) -> float | None:
    """Seconds from Info's Duration (in TimestampScale units, default 1 ms), None when absent."""
    fields = dict(_children(info, "Info"))
    scale = int.from_bytes(fields.get(TIMESTAMP_SCALE, b"\x0f\x42\x40"), "big")
    raw = fields.get(DURATION)
    if raw is None:
        return None
    if len(raw) not in (4, 8) or not scale:
        raise MalformedMedia("WebM Info has a malformed Duration or TimestampScale")
    (duration,) = struct.unpack(">f" if len(raw) == 4 else ">d", raw)
    if not math.isfinite(duration) or duration <= 0:
        raise MalformedMedia("WebM Info states a duration that is not positive")
    return duration * scale / 1e9


def _webm() -> _Parser:
    el = yield from _element("the EBML header")
    if el is None or el.id != EBML or el.size is None or not 0 < el.size <= MAX_SMALL:
        raise MalformedMedia("a WebM file starts with an EBML header")
    _doctype((yield from _read(el.size, "the EBML header")))
    pos = el.header + el.size
    el = yield from _element("the Segment")
    while el is not None and el.id == VOID and el.size is not None:  # padding before the Segment
        yield _Skip(el.size, "a Void element")
        pos += el.header + el.size
        el = yield from _element("the Segment")
    if el is None or el.id != SEGMENT:
        raise MalformedMedia("WebM has no Segment after its EBML header")
    pos += el.header
    end = None if el.size is None else pos + el.size
    duration: float | None = None
    info = clusters = items = 0
    in_cluster = False  # inside a Cluster of unknown size: it ends at the next level-1 element
    while end is None or pos < end:
        el = yield from _element("an element of the Segment")
        if el is None:
            if end is not None:
                raise MalformedMedia(f"the WebM Segment runs past the end of the file ({end - pos} bytes missing)")
            break
        items += 1
        if items > MAX_ITEMS:
            raise MalformedMedia(f"WebM has more than {MAX_ITEMS} elements")
        pos += el.header
        if el.size is not None and end is not None and pos + el.size > end:
            raise MalformedMedia(f"WebM element 0x{el.id:X} runs past the end of its Segment")
        if el.id in _LEVEL1:
            in_cluster = False
            if el.id == CLUSTER:
                clusters += 1
                if el.size is None:
                    in_cluster = True
                    continue
        elif not (el.id in _GLOBAL or (in_cluster and el.id in _CLUSTER_CHILDREN)):
            raise MalformedMedia(f"unexpected element 0x{el.id:X} in the WebM Segment")
        if el.size is None:
            raise MalformedMedia(f"WebM element 0x{el.id:X} has an unknown size (only Segment and Cluster may)")
        if el.id == INFO:
            info += 1
            if info > 1 or el.size > MAX_SMALL:
                raise MalformedMedia("WebM Info is duplicated or too large")
            duration = _info_duration((yield from _read(el.size, "the Info element"))) if el.size else None
        elif el.size:
            yield _Skip(el.size, f"WebM element 0x{el.id:X}")
        pos += el.size
    while end is not None and (el := (yield from _element("data after the Segment"))) is not None:
        if el.id != VOID or el.size is None:
            raise MalformedMedia("WebM has data after the end of its Segment")
        if el.size:
            yield _Skip(el.size, "a Void element")
    if not info:
        raise MalformedMedia("WebM has no Info element (segment information)")
    if duration is None and not clusters:
        raise MalformedMedia("WebM states no duration and has no cluster")
    return ClipInfo("webm", duration)
