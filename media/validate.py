"""Content checks: the format is judged by magic bytes and a real decode, never by name or header.

Images (JPEG, PNG, WebP) are decoded by Pillow behind a pixel cap (decompression-bomb guard) and a
memory budget (``media.decode_budget``: headers are read, the decode's peak estimated and reserved,
then pixels allocated), and come out without metadata: EXIF (GPS, camera serials), XMP, IPTC,
comments and trailing data are dropped. An image whose orientation is upright is stripped
losslessly, segment by segment (JPEG) or chunk by chunk (PNG, WebP), so a forensic capture keeps its
exact bytes of pixels and no encoder runs; a turned one is re-encoded after ``exif_transpose``.
Clips (MP4, WebM) are checked by walking their container structure as they stream past
(``media.containers`` through ``ClipCheckingReader``); their bytes are stored as sent.
"""

from __future__ import annotations

import contextlib
import io
import re
import struct
import warnings
from dataclasses import dataclass
from typing import BinaryIO

from PIL import Image, ImageOps

from media.containers import ClipCheck
from media.decode_budget import DecodeBudget
from media.errors import MalformedMedia, MediaTooLarge, UnsupportedMedia
from media.thumbs import shrink

__all__ = [
    "CLIP_TYPES",
    "IMAGE_TYPES",
    "CleanImage",
    "ClipCheckingReader",
    "check_clip_head",
    "decode_cost",
    "sanitize_image",
    "sniff",
    "strip_jpeg_metadata",
    "strip_png_metadata",
    "strip_webp_metadata",
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
_TURNED = (2, 3, 4, 5, 6, 7, 8)  # EXIF orientations that exif_transpose turns or mirrors
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# PNG chunks of pixels and colour; everything else (text, eXIf, time, private data) is dropped.
_PNG_KEEP = {b"IHDR", b"PLTE", b"tRNS", b"cHRM", b"gAMA", b"iCCP", b"sBIT", b"sRGB", b"cICP", b"mDCV",
             b"cLLI", b"bKGD", b"pHYs", b"IDAT", b"IEND"}
_WEBP_KEEP = {b"VP8 ", b"VP8L", b"ALPH", b"ICCP", b"ANIM", b"ANMF"}
_VP8X_METADATA = 0x08 | 0x04  # the EXIF and XMP flags of the VP8X header


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
    """A validated image without metadata; ``preview`` is small (``thumbs.shrink``), for thumbnails."""

    data: bytes
    content_type: str
    width: int
    height: int
    preview: Image.Image


def sanitize_image(data: bytes, fmt: str, max_pixels: int, preview_size: int = 256,
                   budget: DecodeBudget | None = None) -> CleanImage:
    """Decode behind the pixel cap and the decode budget; return the metadata-free bytes to store (module doc).

    Only headers are read before ``budget.reserve(decode_cost(...))``: Pillow allocates pixels after it."""
    if fmt not in IMAGE_TYPES:
        raise UnsupportedMedia(f"{fmt} is not an image format")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            head, stripped, turned = _inspect(data, fmt, max_pixels)
            cost = decode_cost(head, fmt, turned, len(data), preview_size)
            del head
            with budget.reserve(cost) if budget is not None else contextlib.nullcontext():
                if turned:
                    return _reencode_upright(data, fmt, max_pixels, preview_size)
                return _decode_stripped(stripped, fmt, max_pixels, preview_size)
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


def _inspect(data: bytes, fmt: str, max_pixels: int) -> tuple[Image.Image, bytes, bool]:
    """Headers only: the opened (not decoded) image that will be decoded, the stripped bytes, and
    whether the EXIF orientation asks for a turn (then the image is re-encoded upright instead)."""
    if fmt == "png":
        stripped, exif = strip_png_metadata(data)
        im = _open(data, fmt, max_pixels)
        im.verify()  # chunk CRCs, without inflating; verify() leaves the image unusable
        # Not im.getexif(): for a PNG it decodes the whole image first (eXIf may follow the pixels).
        orientation = _orientation(exif)
        im = _open(stripped, fmt, max_pixels)
    elif fmt == "jpeg":
        im = _open(data, fmt, max_pixels)
        orientation = im.getexif().get(0x0112, 1)
        stripped = strip_jpeg_metadata(data) if orientation not in _TURNED else data
        if orientation not in _TURNED:
            im = _open(stripped, fmt, max_pixels)
    else:
        im = _open(data, fmt, max_pixels)
        orientation = im.getexif().get(0x0112, 1)
        stripped = strip_webp_metadata(data)
    return im, stripped, orientation in _TURNED


def _orientation(exif: bytes | None) -> int:
    if not exif:
        return 1
    parsed = Image.Exif()
    try:
        parsed.load(exif)
    except _DECODE_ERRORS:
        return 1  # unreadable: nothing to honour, and the chunk is dropped anyway
    return int(parsed.get(0x0112, 1))


def _draft(im: Image.Image, preview_size: int) -> tuple[int, int]:
    """Scaled IDCT (1/2..1/8) down to no less than the largest thumbnail; still reads every scan.
    Returns the size the JPEG will decode to."""
    width, height = im.size
    scale = preview_size / max(width, height)
    im.draft("RGB", (max(1, int(width * scale)), max(1, int(height * scale))))
    return im.size


def _bytes_per_pixel(mode: str) -> int:
    """Pillow's storage: 1 byte for 1/L/P, 2 for 16-bit grey, 4 for everything else (RGB is RGBX)."""
    if mode in ("1", "L", "P"):
        return 1
    return 2 if mode.startswith("I;16") else 4


def decode_cost(im: Image.Image, fmt: str, turned: bool, size: int, preview_size: int = 256) -> int:
    """Bytes the decode of ``im`` (opened, not loaded; a JPEG gets drafted here) holds at its peak, from
    measurements (tests/media/test_image_memory.py); Python's own overhead is not in it."""
    pixels = im.width * im.height
    if fmt == "jpeg":
        # A progressive JPEG keeps every DCT coefficient (2 bytes per sample) until the last scan.
        coefficients = _jpeg_coefficients(im) if im.info.get("progressive") else 0
        if turned:
            return max(coefficients + pixels * 4, 2 * pixels * 4) + 2 * size
        width, height = _draft(im, preview_size)
        return coefficients + width * height * 4 + size
    # Pillow's WebP decoder holds libwebp's canvas, a copy of it and the image: four images' worth.
    per_pixel = 4 if fmt == "webp" else _bytes_per_pixel(im.mode)
    decoded = pixels * (16 if fmt == "webp" else per_pixel)
    if not turned:
        return decoded + size
    # Then the transposed copy and the encoder; libwebp's RGBA encode peaked at ~35 bytes per pixel.
    encoder = pixels * (36 if im.mode == "RGBA" else 4) if fmt == "webp" else 2 * size
    return decoded + pixels * per_pixel + encoder


def _jpeg_coefficients(im: Image.Image) -> int:
    layers = getattr(im, "layer", None) or [("", 1, 1, 0)] * 3
    h_max = max(layer[1] for layer in layers) or 1
    v_max = max(layer[2] for layer in layers) or 1
    return sum(2 * -(-im.width * layer[1] // h_max) * -(-im.height * layer[2] // v_max) for layer in layers)


def _decode_stripped(stripped: bytes, fmt: str, max_pixels: int, preview_size: int) -> CleanImage:
    """Store the losslessly stripped bytes; decode them (what will be stored, not what was sent) to
    prove they are an image and to make the preview."""
    im = _open(stripped, fmt, max_pixels)
    width, height = im.size
    if fmt == "jpeg":
        _draft(im, preview_size)
    im.load()
    return CleanImage(stripped, IMAGE_TYPES[fmt], width, height, shrink(im, preview_size))


def _reencode_upright(data: bytes, fmt: str, max_pixels: int, preview_size: int) -> CleanImage:
    im = _open(data, fmt, max_pixels)
    im.load()
    icc = im.info.get("icc_profile")
    keep = {k: im.info[k] for k in ("transparency",) if k in im.info}
    upright = ImageOps.exif_transpose(im)
    del im  # one full-size original less while encoding
    upright.info = dict(keep)  # Pillow may copy info["exif"/"xmp"] into the output: start clean
    out = io.BytesIO()
    options: dict[str, object] = {"icc_profile": icc} if icc else {}
    if fmt == "jpeg":
        upright.save(out, "JPEG", quality=92, **options)
    elif fmt == "png":
        upright.save(out, "PNG", **options, **keep)
    else:
        upright.save(out, "WEBP", quality=90, **options)
    preview = shrink(upright, preview_size)  # small: the full-size image is freed when this returns
    return CleanImage(out.getvalue(), IMAGE_TYPES[fmt], upright.width, upright.height, preview)


def strip_png_metadata(data: bytes) -> tuple[bytes, bytes | None]:
    """Copy a PNG with only its pixel and colour chunks; also return the eXIf payload (for the orientation).

    Lossless: kept chunks are copied byte for byte with their CRCs. Text (tEXt/zTXt/iTXt: XMP, comments),
    eXIf, tIME, private chunks (C2PA manifests, vendor data) and bytes after IEND are dropped.
    """
    if not data.startswith(_PNG_SIGNATURE):
        raise MalformedMedia("PNG does not start with its signature")
    out, exif, pos, n = [_PNG_SIGNATURE], None, len(_PNG_SIGNATURE), len(data)
    while True:
        if pos + 12 > n:
            raise MalformedMedia("PNG is truncated (no IEND chunk)")
        end = pos + 12 + int.from_bytes(data[pos : pos + 4], "big")
        kind = data[pos + 4 : pos + 8]
        if end > n:
            raise MalformedMedia("PNG chunk length runs past the end")
        if kind in _PNG_KEEP:
            out.append(data[pos:end])
        elif kind == b"eXIf":
            exif = data[pos + 8 : end - 4]
        pos = end
        if kind == b"IEND":
            return b"".join(out), exif


def strip_webp_metadata(data: bytes) -> bytes:
    """Copy a WebP with only its image, alpha, colour-profile and animation chunks (EXIF, XMP and unknown
    chunks dropped, the VP8X flags for them cleared, the RIFF size fixed); lossless, like the PNG strip."""
    if data[:4] != b"RIFF" or data[8:12] != b"WEBP":
        raise MalformedMedia("WebP does not start with a RIFF/WEBP header")
    end_of_riff = 8 + int.from_bytes(data[4:8], "little")
    if end_of_riff > len(data):
        raise MalformedMedia("WebP is truncated (shorter than its RIFF size)")
    chunks, pos = [], 12
    while pos + 8 <= end_of_riff:
        kind, size = data[pos : pos + 4], int.from_bytes(data[pos + 4 : pos + 8], "little")
        end = min(pos + 8 + size + (size & 1), end_of_riff)  # the last chunk's pad byte may be missing
        if pos + 8 + size > end_of_riff:
            raise MalformedMedia("WebP chunk length runs past the end")
        if kind == b"VP8X" and size >= 1:
            chunks.append(data[pos : pos + 8] + bytes([data[pos + 8] & ~_VP8X_METADATA]) + data[pos + 9 : end])
        elif kind in _WEBP_KEEP:
            chunks.append(data[pos:end])
        pos = end
    body = b"WEBP" + b"".join(chunks)
    return b"RIFF" + len(body).to_bytes(4, "little") + body


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
