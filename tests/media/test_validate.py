"""Pure checks of content sniffing, metadata stripping, Range parsing and retention (no servers)."""

from __future__ import annotations

import io
from datetime import UTC, datetime, timedelta

import pytest
from PIL import Image

from media.errors import MalformedMedia, MediaTooLarge, RangeNotSatisfiable, UnsupportedMedia
from media.retention import Retention
from media.streams import FullReader, parse_range
from media.validate import check_clip_head, sanitize_image, sniff, strip_jpeg_metadata
from tests.media import samples


@pytest.mark.parametrize(("body", "fmt"), [
    (samples.jpeg(gps=False), "jpeg"), (samples.png(gps=False), "png"), (samples.webp(), "webp"),
    (samples.MP4_HEAD, "mp4"), (samples.WEBM_HEAD, "webm"),
])
def test_formats_are_recognised_by_their_bytes(body, fmt):
    assert sniff(body[:64]) == fmt


@pytest.mark.parametrize("body", [b"", b"GIF89a....", b"%PDF-1.7", b"<svg xmlns=", b"BM\x00\x00", b"\x00" * 64])
def test_anything_else_is_unsupported(body):
    with pytest.raises(UnsupportedMedia):
        sniff(body)


def test_clip_headers_are_checked():
    check_clip_head("mp4", samples.MP4_HEAD)
    check_clip_head("webm", samples.WEBM_HEAD)
    with pytest.raises(MalformedMedia):
        check_clip_head("mp4", b"\x00\x00\x00\x03ftypisom")
    with pytest.raises(UnsupportedMedia):
        check_clip_head("mp4", b"\x00\x00\x00\x18ftypheic" + b"\x00" * 12)
    with pytest.raises(UnsupportedMedia):
        check_clip_head("webm", samples.WEBM_HEAD.replace(b"webm", b"mkvx"))


def test_jpeg_strip_drops_exif_comments_and_trailers_but_keeps_pixels_and_icc():
    icc = b"\x00" * 128  # any bytes: the strip only keeps the segment, never parses it
    out = io.BytesIO()
    exif = Image.Exif()
    exif[0x8825] = samples.GPS
    samples.photo(64, 48).save(out, "JPEG", exif=exif, icc_profile=icc, comment=b"secret place")
    original = out.getvalue() + b"MPF trailing image with its own EXIF"
    stripped = strip_jpeg_metadata(original)
    assert b"Exif" not in stripped and b"secret place" not in stripped and b"MPF" not in stripped
    assert b"ICC_PROFILE" in stripped and stripped.endswith(b"\xff\xd9")
    assert Image.open(io.BytesIO(stripped)).tobytes() == Image.open(io.BytesIO(original)).tobytes()


def test_truncated_jpeg_is_malformed():
    body = samples.jpeg()
    with pytest.raises(MalformedMedia):
        sanitize_image(body[:-5000], "jpeg", 10**8)


def test_pixel_cap_guards_against_decompression_bombs():
    with pytest.raises(MediaTooLarge):
        sanitize_image(samples.bomb_png(3000), "png", 1_000_000)
    with pytest.raises(MediaTooLarge):  # beyond Pillow's own hard limit too
        sanitize_image(samples.bomb_png(), "png", 10**12)


def test_png_is_reencoded_without_exif():
    clean = sanitize_image(samples.png(gps=True), "png", 10**8)
    assert not Image.open(io.BytesIO(clean.data)).getexif() and b"eXIf" not in clean.data


@pytest.mark.parametrize(("header", "expected"), [
    (None, None), ("", None), ("items=0-1", None), ("bytes=0-1,5-6", None), ("bytes=5-1", None),
    ("bytes=abc", None), ("bytes=0-0", (0, 0)), ("bytes=0-", (0, 99)), ("bytes=10-20", (10, 20)),
    ("bytes=90-1000", (90, 99)), ("bytes=-10", (90, 99)), ("bytes=-1000", (0, 99)),
])
def test_range_header_parsing(header, expected):
    assert parse_range(header, 100) == expected


@pytest.mark.parametrize("header", ["bytes=100-", "bytes=-0", "bytes=200-300"])
def test_unsatisfiable_ranges_raise(header):
    with pytest.raises(RangeNotSatisfiable):
        parse_range(header, 100)


def test_retention_per_kind():
    t = datetime(2026, 1, 1, tzinfo=UTC)
    r = Retention()
    assert r.expires_at("image", t) == t + timedelta(days=30)
    assert r.expires_at("clip", t) == t + timedelta(days=7)
    assert r.expires_at("enrolment", t) is None


def test_iter_reader_returns_full_reads_across_chunk_boundaries():
    reader = FullReader(iter([b"abc", b"defgh", b"", b"ij"]))
    assert reader.read(4) == b"abcd"
    assert reader.read(5) == b"efghi"
    assert reader.read(5) == b"j"
    assert reader.read(5) == b""
