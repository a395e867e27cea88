"""Content checks: the format is judged by magic bytes and a real decode, never by name or header.

Images (JPEG, PNG, WebP) are decoded by Pillow behind a pixel cap (decompression-bomb guard) and
come out without metadata: EXIF (GPS, camera serials), XMP, IPTC, comments and trailing data are
dropped. A JPEG whose orientation is already upright is stripped losslessly, segment by segment, so
a forensic capture keeps its exact pixels; any other image is re-encoded after ``exif_transpose``.
Clips (MP4, WebM) are checked by walking their container structure as they stream past
(``media.containers`` through ``ClipCheckingReader``); their bytes are stored as sent.
"""

from __future__ import annotations

import io
import re
import struct
import warnings
from dataclasses import dataclass
from typing import BinaryIO

from PIL import Image, ImageOps

from media.containers import ClipCheck
from media.errors import MalformedMedia, MediaTooLarge, UnsupportedMedia

__all__ = [
    "CLIP_TYPES",
    "IMAGE_TYPES",
    "CleanImage",
    "ClipCheckingReader",
    "check_clip_head",
    "sanitize_image",
    "sniff",
    "strip_jpeg_metadata",
]

IMAGE_TYPES = {"jpeg": "image/jpeg", "png": "image/png", "webp": "image/webp"}
CLIP_TYPES = {"mp4": "video/mp4", "webm": "video/webm"}
SNIFF_BYTES = 64  # enough for every signature below, including a WebM EBML header
_MP4_BRANDS = (b"iso", b"mp4", b"avc1", b"M4V", b"dash", b"mmp4", b"MSNV", b"3gp", b"f4v")
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, IndexError, TypeError)
# JPEG APPn segments that carry no personal data and that decoders need; everything else is dropped.
_KEEP_APP = {0xE2: (b"ICC_PROFILE\0",), 0xEE: (b"Adobe",)}
_PLAIN_JFIF_LENGTH = 16  # an APP0 JFIF segment without an embedded thumbnail
_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")


def sniff(head: bytes) -> str:
    """Name the format from the first bytes (``jpeg``, ``png``, ``webp``, ``mp4``, ``webm``) or raise 415."""
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    if head[4:8] == b"ftyp":
        return "mp4"
    if head.startswith(b"\x1a\x45\xdf\xa3"):
        return "webm"
    raise UnsupportedMedia("content is not JPEG, PNG, WebP, MP4 or WebM (judged by its first bytes)")


def check_clip_head(fmt: str, head: bytes) -> None:
    """Reject clips whose container header is malformed (422) or another ftyp/EBML format (415)."""
    if fmt == "mp4":
        size = int.from_bytes(head[:4], "big")
        if size < 16 or size % 4 or len(head) < 12:
            raise MalformedMedia("MP4 ftyp box is malformed")
        if not head[8:12].startswith(_MP4_BRANDS):
            brand = head[8:12].decode("latin-1")
            raise UnsupportedMedia(f"ftyp brand {brand!r} is not an MP4 video (e.g. HEIC, QuickTime)")
        return
    if fmt == "webm":
        doc_type = head.find(b"\x42\x82")  # EBML DocType element
        if doc_type < 0 or len(head) < doc_type + 3:
            raise MalformedMedia("EBML header has no DocType")
        size = head[doc_type + 2]
        if size & 0x80 == 0:
            raise MalformedMedia("EBML DocType size is malformed")
        value = head[doc_type + 3 : doc_type + 3 + (size & 0x7F)]
        if value != b"webm":
            raise UnsupportedMedia(f"EBML DocType {value!r} is not WebM")
        return
    raise UnsupportedMedia(f"{fmt} is not a clip format")


class ClipCheckingReader:
    """A body reader that parses a clip's container while the upload reads it (``media.containers``).

    A signature alone let a 16-byte ``ftyp`` header plus junk be stored as video/mp4. Wrapping the
    reader keeps clips streamed: ``read`` raises ``MalformedMedia`` at the first impossible box, or
    at the end of the body (the read that returns ``b""``), before the sealed stream's last segment
    is written. Images pass through unchanged (they are decoded in full anyway)."""

    def __init__(self, reader: BinaryIO) -> None:
        self._reader = reader
        self._head = b""
        self._check: ClipCheck | None = None
        self._decided = False

    def read(self, n: int = -1) -> bytes:
        data = self._reader.read(n)
        if not self._decided:
            self._head += data
            if len(self._head) < 12 and data:
                return data
            self._decided = True
            try:
                fmt = sniff(self._head)
            except UnsupportedMedia:
                fmt = ""  # the upload itself answers 415
            if fmt in CLIP_TYPES:
                check_clip_head(fmt, self._head)  # another ftyp brand (HEIC …) is 415 before any box is walked
                self._check = ClipCheck(fmt)
                self._check.feed(self._head)
            self._head = b""
        elif self._check is not None:
            self._check.feed(data)
        if not data and self._check is not None:
            self._check.close()
            self._check = None
        return data


@dataclass(frozen=True)
class CleanImage:
    """A validated image without metadata; ``preview`` is decoded (possibly downscaled) for thumbnails."""

    data: bytes
    content_type: str
    width: int
    height: int
    preview: Image.Image


def sanitize_image(data: bytes, fmt: str, max_pixels: int, preview_size: int = 256) -> CleanImage:
    """Decode behind the pixel cap and return the metadata-free bytes to store (see module doc)."""
    if fmt not in IMAGE_TYPES:
        raise UnsupportedMedia(f"{fmt} is not an image format")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return _sanitize(data, fmt, max_pixels, preview_size)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise MediaTooLarge(f"image exceeds the decompression-bomb guard: {exc}") from None
    except _DECODE_ERRORS as exc:
        raise MalformedMedia(f"{fmt} image does not decode: {exc}") from None


def _open(data: bytes, fmt: str, max_pixels: int) -> Image.Image:
    im = Image.open(io.BytesIO(data), formats=[fmt.upper()])
    if im.width * im.height > max_pixels:
        raise MediaTooLarge(
            f"image is {im.width}x{im.height} pixels, over the {max_pixels}-pixel cap (decompression-bomb guard)"
        )
    if getattr(im, "n_frames", 1) > 1:
        raise UnsupportedMedia("animated images are not accepted; upload the sequence as a clip")
    return im


def _sanitize(data: bytes, fmt: str, max_pixels: int, preview_size: int) -> CleanImage:
    im = _open(data, fmt, max_pixels)
    if fmt == "png":
        im.verify()  # chunk CRCs; verify() leaves the image unusable, so open again
        im = _open(data, fmt, max_pixels)
    orientation = im.getexif().get(0x0112, 1)
    if fmt == "jpeg" and orientation in (0, 1):
        stripped = strip_jpeg_metadata(data)
        im = _open(stripped, fmt, max_pixels)  # decode what will be stored, not what was sent
        width, height = im.size
        # Scaled IDCT (1/2..1/8) down to no less than the largest thumbnail; still reads every scan.
        scale = preview_size / max(width, height)
        im.draft("RGB", (max(1, int(width * scale)), max(1, int(height * scale))))
        im.load()
        return CleanImage(stripped, IMAGE_TYPES[fmt], width, height, im)
    im.load()
    icc = im.info.get("icc_profile")
    upright = ImageOps.exif_transpose(im)
    keep = {k: im.info[k] for k in ("transparency",) if k in im.info}
    upright.info = keep  # Pillow may copy info["exif"/"xmp"] into the output: start clean
    out = io.BytesIO()
    options: dict[str, object] = {"icc_profile": icc} if icc else {}
    if fmt == "jpeg":
        upright.save(out, "JPEG", quality=92, **options)
    elif fmt == "png":
        upright.save(out, "PNG", **options, **keep)
    else:
        upright.save(out, "WEBP", quality=90, **options)
    return CleanImage(out.getvalue(), IMAGE_TYPES[fmt], upright.width, upright.height, upright)


def strip_jpeg_metadata(data: bytes) -> bytes:
    """Copy a JPEG without APPn/COM segments (except ICC and Adobe colour info) and without trailing data.

    Lossless: the entropy-coded scans are copied byte for byte. Dropping bytes after EOI also drops
    MPF/vendor trailers, which can hold further images with their own EXIF.
    """
    n = len(data)
    if data[:2] != b"\xff\xd8":
        raise MalformedMedia("JPEG does not start with SOI")
    out = [b"\xff\xd8"]
    pos = 2
    while True:
        if pos + 2 > n or data[pos] != 0xFF:
            raise MalformedMedia("JPEG is truncated or has a broken marker")
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0xD9:
            out.append(b"\xff\xd9")
            return b"".join(out)
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:
            out.append(data[pos : pos + 2])
            pos += 2
            continue
        if pos + 4 > n:
            raise MalformedMedia("JPEG is truncated")
        end = pos + 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
        if end - pos < 4 or end > n:
            raise MalformedMedia("JPEG segment length runs past the end")
        if marker == 0xFE or 0xE0 <= marker <= 0xEF:
            body = data[pos + 4 : end]
            jfif = marker == 0xE0 and body.startswith(b"JFIF\0") and end - pos - 2 == _PLAIN_JFIF_LENGTH
            if jfif or any(body.startswith(sig) for sig in _KEEP_APP.get(marker, ())):
                out.append(data[pos:end])
        else:
            out.append(data[pos:end])
        pos = end
        if marker == 0xDA:  # start of scan: entropy-coded bytes until a real marker
            pos = _scan_end(data, pos)
            out.append(data[end:pos])


def _scan_end(data: bytes, pos: int) -> int:
    """Index of the first marker after entropy-coded data: 0xFF not followed by 0x00 (stuffing), RSTn or 0xFF."""
    found = _MARKER.search(data, pos)
    if found is None:
        raise MalformedMedia("JPEG scan is truncated (no end-of-image marker)")
    return found.start()
