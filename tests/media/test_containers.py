"""The clip container parser (``media.containers``), pure: valid MP4/WebM structures pass whatever the chunking,
fakes and truncations fail with 422-class errors, and the streaming reader wrapper checks what it passes."""

from __future__ import annotations

import io
import random
import struct

import pytest

from media.containers import MAX_MOOV, ClipCheck, check_clip
from media.errors import MalformedMedia, UnsupportedMedia
from media.validate import ClipCheckingReader
from tests.media import samples
from tests.media.samples import box, ebml

JUNK = random.Random(17).randbytes(4096)
FTYP_MP42 = (16).to_bytes(4, "big") + b"ftypmp42" + b"\x00\x00\x00\x00"


def _chunked(fmt: str, data: bytes, size: int) -> object:
    check = ClipCheck(fmt)
    for i in range(0, len(data), size):
        check.feed(data[i : i + size])
    return check.close()


@pytest.mark.parametrize("chunk", [1, 7, 4096, 1 << 20])
def test_valid_clips_pass_whatever_the_chunking(chunk):
    for fmt, data in (("mp4", samples.mp4(20_000)), ("mp4", samples.mp4(20_000, moov_first=False)),
                      ("webm", samples.webm(20_000)), ("webm", samples.webm(20_000, None, live=True))):
        assert _chunked(fmt, data, chunk) == check_clip(fmt, data)


def test_durations_come_from_the_container():
    assert check_clip("mp4", samples.mp4(5000)).duration == 10.0
    assert check_clip("webm", samples.webm(5000, duration_ms=2500.0)).duration == 2.5
    assert check_clip("webm", samples.webm(5000, None, live=True)).duration is None


def test_an_ftyp_header_followed_by_junk_is_not_an_mp4():
    """The probe's fake clip: a 16-byte ftypmp42 box then random bytes."""
    with pytest.raises(MalformedMedia):
        check_clip("mp4", FTYP_MP42 + JUNK)


def test_junk_fails_while_streaming_not_only_at_the_end():
    check = ClipCheck("mp4")
    with pytest.raises(MalformedMedia, match="four-character type"):
        check.feed(FTYP_MP42 + b"\x00\x00\x10\x00\x01\x02\x03\x04" + JUNK)


def test_mp4_box_sizes_must_match_the_file():
    good = samples.mp4(8000)
    with pytest.raises(MalformedMedia, match="runs past the end"):
        check_clip("mp4", good[:-10])
    with pytest.raises(MalformedMedia, match="ends inside"):
        check_clip("mp4", good + b"\x00\x00\x00")
    with pytest.raises(MalformedMedia, match="smaller than its own header"):
        check_clip("mp4", good + (4).to_bytes(4, "big") + b"free")


def test_mp4_largesize_and_to_the_end_boxes_are_understood():
    payload = b"\x00" * 100
    large = (1).to_bytes(4, "big") + b"mdat" + (16 + len(payload)).to_bytes(8, "big") + payload
    assert check_clip("mp4", samples.MP4_HEAD + samples.moov() + large).container == "mp4"
    to_end = (0).to_bytes(4, "big") + b"mdat" + payload
    assert check_clip("mp4", samples.MP4_HEAD + samples.moov() + to_end).container == "mp4"


@pytest.mark.parametrize(("body", "message"), [
    (samples.MP4_HEAD + box(b"mdat", b"x" * 64), "no moov"),
    (samples.MP4_HEAD + samples.moov(), "no mdat"),
    (samples.MP4_HEAD + box(b"moov", box(b"trak", b"")) + box(b"mdat", b"x"), "exactly one mvhd"),
    (samples.MP4_HEAD + box(b"moov", samples.mvhd()) + box(b"mdat", b"x"), "no trak"),
    (samples.MP4_HEAD + samples.moov(timescale=0) + box(b"mdat", b"x"), "zero timescale"),
    (samples.MP4_HEAD + samples.moov(duration=0) + box(b"mdat", b"x"), "no duration"),
    (samples.MP4_HEAD + samples.moov() + samples.moov() + box(b"mdat", b"x"), "moov box is malformed"),
    (box(b"free", b"") + samples.MP4_HEAD + samples.moov() + box(b"mdat", b"x"), "starts with an ftyp"),
    (samples.MP4_HEAD + box(b"moov", box(b"mvhd", b"\x00" * 40) + box(b"trak", b"")) + box(b"mdat", b"x"),
     "mvhd is truncated"),
    (samples.MP4_HEAD + box(b"moov", samples.mvhd() + b"\x00\x00\x00\x30trak") + box(b"mdat", b"x"),
     "does not fit"),
])
def test_an_mp4_must_describe_a_movie(body, message):
    with pytest.raises(MalformedMedia, match=message):
        check_clip("mp4", body)


def test_fragmented_mp4_needs_its_fragments():
    moov = box(b"moov", samples.mvhd(duration=0) + box(b"trak", b"") + box(b"mvex", b""))
    frag = box(b"moof", b"\x00" * 16) + box(b"mdat", b"x" * 32)
    assert check_clip("mp4", samples.MP4_HEAD + moov + frag).duration is None
    with pytest.raises(MalformedMedia, match="no moof"):
        check_clip("mp4", samples.MP4_HEAD + moov + box(b"mdat", b"x"))


def test_an_oversized_moov_is_refused_before_it_is_buffered():
    check = ClipCheck("mp4")
    with pytest.raises(MalformedMedia, match="moov"):
        check.feed(samples.MP4_HEAD + (MAX_MOOV + 9).to_bytes(4, "big") + b"moov")


def _segment(*children: bytes, unknown: bool = False) -> bytes:
    return samples.WEBM_HEAD + ebml(0x18538067, b"".join(children), unknown_size=unknown)


INFO = ebml(0x1549A966, ebml(0x4489, struct.pack(">d", 1000.0)))
CLUSTER = ebml(0x1F43B675, ebml(0xE7, b"\x00") + ebml(0xA3, b"\x81\x00\x00\x80data"))


def test_webm_needs_info_and_a_duration_or_clusters():
    assert check_clip("webm", _segment(INFO)).duration == 1.0
    assert check_clip("webm", _segment(ebml(0x1549A966, b""), CLUSTER)).duration is None
    with pytest.raises(MalformedMedia, match="no Info"):
        check_clip("webm", _segment(CLUSTER))
    with pytest.raises(MalformedMedia, match="no duration and has no cluster"):
        check_clip("webm", _segment(ebml(0x1549A966, b"")))
    with pytest.raises(MalformedMedia, match="not positive"):
        check_clip("webm", _segment(ebml(0x1549A966, ebml(0x4489, struct.pack(">d", -1.0))), CLUSTER))


@pytest.mark.parametrize(("body", "message"), [
    (samples.WEBM_HEAD + b"\x00" * 4096, "not a valid EBML element"),  # the old test's "clip"
    (samples.WEBM_HEAD, "no Segment"),
    (samples.WEBM_HEAD + ebml(0x1549A966, b""), "no Segment"),
    (_segment(INFO, CLUSTER)[:-3], "runs past the end"),
    (_segment(INFO, CLUSTER) + ebml(0x1F43B675, b""), "after the end of its Segment"),
    (_segment(INFO, ebml(0x4286, b"\x01")), "unexpected element"),
    (_segment(INFO, ebml(0x1654AE6B, b"", unknown_size=True)), "unknown size"),
    (ebml(0x18538067, INFO), "starts with an EBML header"),
])
def test_malformed_webm_is_rejected(body, message):
    with pytest.raises(MalformedMedia, match=message):
        check_clip("webm", body)


def test_live_webm_clusters_of_unknown_size_end_at_the_next_cluster():
    live = ebml(0x1F43B675, ebml(0xE7, b"\x00") + ebml(0xA3, b"\x81\x00\x00\x80abc"), unknown_size=True)
    assert check_clip("webm", _segment(INFO, live, live, unknown=True)).container == "webm"
    with pytest.raises(MalformedMedia, match="unexpected element"):
        check_clip("webm", _segment(INFO, live + ebml(0x4286, b"\x01"), unknown=True))


def test_matroska_is_not_webm():
    mkv = samples.webm(3000).replace(b"webm", b"mkvx", 1)
    with pytest.raises(UnsupportedMedia):
        check_clip("webm", mkv)


def _read_all(reader: ClipCheckingReader, size: int = 1000) -> bytes:
    out = b""
    while chunk := reader.read(size):
        out += chunk
    return out


def test_checking_reader_passes_clips_and_images_through_unchanged():
    for body in (samples.mp4(30_000), samples.webm(30_000), samples.jpeg()):
        assert _read_all(ClipCheckingReader(io.BytesIO(body))) == body


def test_checking_reader_fails_a_fake_clip_at_the_end_of_its_body():
    fake = FTYP_MP42 + b"\x00\x01\x00\x00mdat" + JUNK  # a plausible box that claims more than is sent
    reader = ClipCheckingReader(io.BytesIO(fake))
    with pytest.raises(MalformedMedia, match="runs past the end"):
        _read_all(reader)


def test_checking_reader_leaves_other_ftyp_brands_to_415():
    heic = b"\x00\x00\x00\x18ftypheic" + b"\x00" * 100
    with pytest.raises(UnsupportedMedia):
        ClipCheckingReader(io.BytesIO(heic)).read(64)
