"""Chunked AEAD for media: round trips, tampering of every kind, HTTP-range reads, flat memory."""

from __future__ import annotations

import io
import subprocess
import sys
import textwrap

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from crypto import AuthenticationError, new_dek, open_stream, seal_stream, sealed_size
from crypto.stream import HEADER_SIZE, open_range, open_segments, open_stream_into, segment_count, segment_span

TAG = 16
# No per-example deadline: CI machines are shared, and these tests prove correctness, not speed.
relaxed = settings(deadline=None)
keys = st.binary(min_size=32, max_size=32)
payloads = st.binary(max_size=3000)
segment_sizes = st.integers(1, 700)


def _chunks(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(c, len(data)) for c in cuts})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]


def _seal(key: bytes, data: bytes, context: bytes, segment_size: int) -> bytes:
    return b"".join(seal_stream(key, [data], context, segment_size))


def _open(key: bytes, sealed: bytes, context: bytes) -> bytes:
    return b"".join(open_stream(key, [sealed], context))


def _segments(sealed: bytes, segment_size: int) -> list[bytes]:
    body, stride = sealed[HEADER_SIZE:], segment_size + TAG
    return [body[i : i + stride] for i in range(0, len(body), stride)]


@relaxed
@given(keys, payloads, segment_sizes, st.lists(st.integers(0, 3000)), st.lists(st.integers(0, 4000)))
def test_open_inverts_seal_for_any_chunking(
    key: bytes, data: bytes, segment_size: int, cuts: list[int], read_cuts: list[int]
) -> None:
    sealed = b"".join(seal_stream(key, _chunks(data, cuts), b"ctx", segment_size))
    assert len(sealed) == sealed_size(len(data), segment_size)
    assert b"".join(open_stream(key, _chunks(sealed, read_cuts), b"ctx")) == data


@relaxed
@given(keys, payloads, segment_sizes, st.data())
def test_any_flipped_bit_fails(key: bytes, data: bytes, segment_size: int, draw: st.DataObject) -> None:
    sealed = bytearray(_seal(key, data, b"ctx", segment_size))
    bit = draw.draw(st.integers(0, len(sealed) * 8 - 1))
    sealed[bit // 8] ^= 1 << (bit % 8)
    with pytest.raises(AuthenticationError):
        _open(key, bytes(sealed), b"ctx")


@relaxed
@given(keys, payloads, segment_sizes, st.data())
def test_any_truncation_fails(key: bytes, data: bytes, segment_size: int, draw: st.DataObject) -> None:
    sealed = _seal(key, data, b"ctx", segment_size)
    cut = draw.draw(st.integers(0, len(sealed) - 1))
    with pytest.raises(AuthenticationError):
        _open(key, sealed[:cut], b"ctx")


@relaxed
@given(keys, st.binary(min_size=2, max_size=3000), st.integers(1, 300), st.data())
def test_reordered_segments_fail(key: bytes, data: bytes, segment_size: int, draw: st.DataObject) -> None:
    sealed = _seal(key, data, b"ctx", segment_size)
    segments = _segments(sealed, segment_size)
    if len(segments) < 2:
        return
    i = draw.draw(st.integers(0, len(segments) - 2))
    segments[i], segments[i + 1] = segments[i + 1], segments[i]
    with pytest.raises(AuthenticationError):
        _open(key, sealed[:HEADER_SIZE] + b"".join(segments), b"ctx")


@relaxed
@given(keys, payloads, segment_sizes, st.binary(min_size=1, max_size=800))
def test_extension_fails(key: bytes, data: bytes, segment_size: int, extra: bytes) -> None:
    sealed = _seal(key, data, b"ctx", segment_size)
    with pytest.raises(AuthenticationError):
        _open(key, sealed + extra, b"ctx")
    with pytest.raises(AuthenticationError):  # a real segment of the same object appended again
        _open(key, sealed + _segments(sealed, segment_size)[0], b"ctx")


@relaxed
@given(keys, st.binary(min_size=1, max_size=3000), st.integers(1, 300))
def test_dropping_whole_final_segments_fails(key: bytes, data: bytes, segment_size: int) -> None:
    sealed = _seal(key, data, b"ctx", segment_size)
    segments = _segments(sealed, segment_size)
    for keep in range(len(segments)):
        with pytest.raises(AuthenticationError):
            _open(key, sealed[:HEADER_SIZE] + b"".join(segments[:keep]), b"ctx")


@relaxed
@given(keys, keys, payloads, segment_sizes)
def test_wrong_key_or_context_fails(key: bytes, other: bytes, data: bytes, segment_size: int) -> None:
    sealed = _seal(key, data, b"ctx", segment_size)
    with pytest.raises(AuthenticationError):
        _open(key, sealed, b"other")
    if other != key:
        with pytest.raises(AuthenticationError):
            _open(other, sealed, b"ctx")


def _open_into(key: bytes, sealed: bytes, context: bytes, size: int) -> bytes:
    out = bytearray(size)
    open_stream_into(key, io.BufferedReader(io.BytesIO(sealed)), context, out)
    return bytes(out)


@relaxed
@given(keys, payloads, segment_sizes, st.data())
def test_open_into_inverts_seal_and_fails_on_any_change(
    key: bytes, data: bytes, segment_size: int, draw: st.DataObject
) -> None:
    """The one-pass reader for whole objects (index snapshots) checks exactly what ``open_stream`` does."""
    sealed = _seal(key, data, b"ctx", segment_size)
    assert _open_into(key, sealed, b"ctx", len(data)) == data
    bit = draw.draw(st.integers(0, len(sealed) * 8 - 1))
    flipped = bytearray(sealed)
    flipped[bit // 8] ^= 1 << (bit % 8)
    cut = draw.draw(st.integers(0, len(sealed) - 1))
    for bad, size in ((bytes(flipped), len(data)), (sealed[:cut], len(data)), (sealed + b"x", len(data)),
                      (sealed, len(data) + 1)):
        with pytest.raises(AuthenticationError):
            _open_into(key, bad, b"ctx", size)
    if data:  # expecting less than was sealed: the segment that must be final is not
        with pytest.raises(AuthenticationError):
            _open_into(key, sealed, b"ctx", len(data) - 1)
    with pytest.raises(AuthenticationError):
        _open_into(key, sealed, b"other", len(data))


def test_segments_cannot_be_spliced_between_objects() -> None:
    key, data = new_dek(), bytes(1000)
    first, second = _seal(key, data, b"ctx", 100), _seal(key, data, b"ctx", 100)
    spliced = first[: HEADER_SIZE + 116] + second[HEADER_SIZE + 116 :]
    with pytest.raises(AuthenticationError):
        _open(key, spliced, b"ctx")


@relaxed
@given(keys, st.binary(min_size=1, max_size=3000), st.integers(1, 400), st.data())
def test_any_range_decrypts_from_just_its_segments(
    key: bytes, data: bytes, segment_size: int, draw: st.DataObject
) -> None:
    start = draw.draw(st.integers(0, len(data) - 1))
    end = draw.draw(st.integers(start + 1, len(data)))
    sealed = _seal(key, data, b"ctx", segment_size)
    span = segment_span(start, end, segment_size, len(data))
    assert span.cipher_end <= len(sealed)
    body = sealed[span.cipher_start : span.cipher_end]
    assert b"".join(open_range(key, sealed[:HEADER_SIZE], body, start, end, len(data), b"ctx")) == data[start:end]


def test_range_reads_detect_tampering_and_truncation() -> None:
    key, data, segment_size = new_dek(), bytes(range(256)) * 40, 1000
    sealed = _seal(key, data, b"ctx", segment_size)
    span = segment_span(2500, len(data), segment_size, len(data))
    body = bytearray(sealed[span.cipher_start : span.cipher_end])
    total = segment_count(len(data), segment_size)
    with pytest.raises(AuthenticationError):  # range ending at the object's end lost its final bytes
        list(open_segments(key, sealed[:HEADER_SIZE], bytes(body[:-TAG]), span.first_segment, total, b"ctx"))
    body[5] ^= 1
    with pytest.raises(AuthenticationError):
        list(open_segments(key, sealed[:HEADER_SIZE], bytes(body), span.first_segment, total, b"ctx"))


def test_empty_plaintext_is_one_authenticated_segment() -> None:
    key = new_dek()
    sealed = _seal(key, b"", b"ctx", 64)
    assert len(sealed) == HEADER_SIZE + TAG == sealed_size(0, 64)
    assert _open(key, sealed, b"ctx") == b""
    with pytest.raises(AuthenticationError):
        _open(key, sealed[:HEADER_SIZE], b"ctx")


RSS_PROBE = textwrap.dedent(
    """
    import hashlib, sys
    from crypto import new_dek, open_stream, seal_stream

    def peak_rss():  # VmHWM: this process's own high-water mark, in KiB
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))

    MIB = 1024 * 1024
    key, block = new_dek(), bytes(range(256)) * 4096   # 1 MiB, reused: the input is never held whole

    def source(n_mib):
        for i in range(n_mib):
            yield block[i % 7 :] + block[: i % 7]

    # Warm up (imports, OpenSSL, allocator) before taking the baseline.
    for _ in open_stream(key, seal_stream(key, source(4), b"ctx"), b"ctx"):
        pass
    before = peak_rss()
    sealed_bytes, digest_in, digest_out = 0, hashlib.sha256(), hashlib.sha256()
    for piece in seal_stream(key, source(200), b"ctx"):
        sealed_bytes += len(piece)
    for chunk in source(200):
        digest_in.update(chunk)

    def counted():
        for piece in seal_stream(key, source(200), b"ctx"):
            yield piece

    for piece in open_stream(key, counted(), b"ctx"):
        digest_out.update(piece)
    after = peak_rss()
    assert digest_in.digest() == digest_out.digest()
    # Control: holding 64 MiB must show up, or the measurement proves nothing.
    held = b"".join(source(64))
    control = peak_rss()
    print(sealed_bytes, (after - before) * 1024, (control - after) * 1024, len(held))
    """
)


def test_sealing_200_mb_keeps_peak_rss_growth_under_32_mb() -> None:
    """Peak RSS (VmHWM, a high-water mark that cannot miss a spike) of a fresh process.

    Not ``ru_maxrss``: Linux carries it over from the forked pytest parent across exec, so a big parent
    hides everything. Not tracemalloc: it misses OpenSSL's and the allocator's memory. The run seals
    200 MiB, then seals and opens 200 MiB chained, never holding the input or output; a control that
    holds 64 MiB proves the measurement sees growth.
    """
    result = subprocess.run([sys.executable, "-c", RSS_PROBE], check=True, capture_output=True, text=True)
    sealed_bytes, growth, control, _ = map(int, result.stdout.split())
    assert sealed_bytes == sealed_size(200 * 1024 * 1024)
    print(f"peak RSS growth streaming 200 MiB: {growth / 2**20:.2f} MiB (control, 64 MiB held: {control / 2**20:.1f})")
    assert control > 48 * 1024 * 1024
    assert growth < 32 * 1024 * 1024
