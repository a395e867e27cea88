"""50 MB clips through a real uvicorn server: streamed upload, byte-exact download and Range reads,
with the server's peak memory measured from /proc (VmHWM, reset before each transfer)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.media import samples
from tests.media.conftest import serve
from tests.memory import reset_peak, status

CLIP_SIZE = 50 * 1024 * 1024
MiB = 1024 * 1024


def _chunks(data: bytes, size: int = MiB) -> Iterator[bytes]:
    view = memoryview(data)
    for i in range(0, len(data), size):
        yield bytes(view[i : i + size])


@pytest.fixture(scope="module")
def clip() -> bytes:
    return samples.mp4(CLIP_SIZE)


def _upload_measured(config_file: Path, log: Path, headers, clip: bytes, declare_length: bool):  # type: ignore[no-untyped-def]
    """Stream an upload (chunked, or with Content-Length) to a fresh server; return (info, its peak RSS growth)."""
    with serve(config_file, log) as server:
        return _upload_to(server, headers, clip, declare_length)


def _upload_to(server, headers, clip: bytes, declare_length: bool):  # type: ignore[no-untyped-def]
    pid = server.pid
    extra = {"Content-Length": str(len(clip))} if declare_length else {}
    with httpx.Client(base_url=server.url, headers=headers, timeout=120) as http:
        http.get("/v1/media", params={"limit": 1})  # warm the code paths first
        base = reset_peak(pid)
        r = http.post("/v1/media", params={"camera_id": "clip-cam"}, content=_chunks(clip),
                      headers={"Content-Type": "application/octet-stream", **extra})
        growth = status(pid, "VmHWM") - base
    assert r.status_code == 201, r.text
    return r.json(), growth


@pytest.fixture(scope="module")
def uploaded(stack, tmp_path_factory, media_headers, clip):  # type: ignore[no-untyped-def]
    """Upload once, streamed with a Content-Length, measuring the server's peak memory growth."""
    log = tmp_path_factory.mktemp("clip-upload") / "api.log"
    return _upload_measured(stack.config_file, log, media_headers, clip, declare_length=True)


def test_chunked_clip_upload_of_several_parts_round_trips(live_server, media_headers):
    """Without a Content-Length the server cannot know the size: multipart parts until the body ends."""
    clip = samples.mp4(12 * MiB)  # more than two 5 MiB parts
    info, _ = _upload_to(live_server, media_headers, clip, declare_length=False)
    r = httpx.get(f"{live_server.url}/v1/media/{info['id']}", headers=media_headers, timeout=60)
    assert info["sha256"] == hashlib.sha256(clip).hexdigest() and r.content == clip


def test_clip_round_trip_is_byte_exact_and_memory_stays_flat(stack, tmp_path, media_headers, clip, uploaded):
    info, upload_growth = uploaded
    assert info["kind"] == "clip" and info["content_type"] == "video/mp4" and info["size_bytes"] == CLIP_SIZE
    assert info["sha256"] == hashlib.sha256(clip).hexdigest() and info["thumbnails"] == []
    # A fresh server, so the download cannot reuse memory the upload left in the allocator.
    with serve(stack.config_file, tmp_path / "api.log") as fresh:
        download_growth, digest, size = _download_measured(fresh, media_headers, info["id"])
    assert size == CLIP_SIZE and digest.hexdigest() == info["sha256"]
    print(f"server peak RSS growth: upload {upload_growth / MiB:.1f} MiB, download {download_growth / MiB:.1f} MiB")
    # Upload: a few copies of one 5 MiB multipart part; download: a few 64 KiB segments and buffers.
    assert download_growth < 16 * MiB
    assert upload_growth < 32 * MiB


def _download_measured(server, media_headers, media_id: str):  # type: ignore[no-untyped-def]
    pid = server.pid
    digest, size = hashlib.sha256(), 0
    with httpx.Client(base_url=server.url, headers=media_headers, timeout=120) as http:
        http.get(f"/v1/media/{media_id}", headers={"Range": "bytes=0-9"})  # warm the code paths
        base = reset_peak(pid)
        with http.stream("GET", f"/v1/media/{media_id}") as r:
            assert r.status_code == 200 and r.headers["content-type"] == "video/mp4"
            assert int(r.headers["content-length"]) == CLIP_SIZE and r.headers["accept-ranges"] == "bytes"
            for chunk in r.iter_bytes():
                digest.update(chunk)
                size += len(chunk)
        growth = status(pid, "VmHWM") - base
    return growth, digest, size


@pytest.mark.parametrize("header", [
    "bytes=0-99", "bytes=65530-65545", "bytes=65536-65536", "bytes=1000000-3000000",
    "bytes=-1000", f"bytes={CLIP_SIZE - 70000}-", "bytes=0-", f"bytes=5-{CLIP_SIZE * 2}",
])
def test_range_requests_return_exactly_the_requested_bytes(live_server, media_headers, clip, uploaded, header):
    info, _ = uploaded
    first_s, _, last_s = header[6:].partition("-")
    if not first_s:
        first, last = CLIP_SIZE - int(last_s), CLIP_SIZE - 1
    else:
        first, last = int(first_s), min(int(last_s) if last_s else CLIP_SIZE - 1, CLIP_SIZE - 1)
    r = httpx.get(f"{live_server.url}/v1/media/{info['id']}", headers={**media_headers, "Range": header}, timeout=60)
    assert r.status_code == 206
    assert r.headers["content-range"] == f"bytes {first}-{last}/{CLIP_SIZE}"
    assert r.content == clip[first : last + 1]


def test_range_past_the_end_is_416(live_server, media_headers, uploaded):
    info, _ = uploaded
    r = httpx.get(f"{live_server.url}/v1/media/{info['id']}",
                  headers={**media_headers, "Range": f"bytes={CLIP_SIZE}-"}, timeout=30)
    assert r.status_code == 416 and r.headers["content-type"] == "application/problem+json"


def test_range_read_fetches_only_the_covering_ciphertext(client, media_headers, media_store):
    """A 10-byte read in the middle of a 6 MB clip asks S3 for the header and one sealed segment."""
    data = samples.mp4(6 * MiB)
    info = client.post("/v1/media", content=data, headers={**media_headers, "Content-Type": "video/mp4"}).json()
    service = client.app.state.appliance.media
    calls: list[tuple[int, int]] = []
    real_get = service.store.get

    def spy(key: str, offset: int = 0, length: int = 0) -> Iterator[bytes]:
        calls.append((offset, length))
        return real_get(key, offset, length)

    service.store.get = spy
    try:
        r = client.get(f"/v1/media/{info['id']}", headers={**media_headers, "Range": "bytes=3000000-3000009"})
    finally:
        del service.store.get
    assert r.status_code == 206 and r.content == data[3000000:3000010]
    assert calls[0] == (0, 12)  # the stream header
    assert len(calls) == 2 and calls[1][1] == 64 * 1024 + 16  # one segment and its tag


def test_webm_clip_is_accepted_and_matroska_is_not(client, media_headers):
    body = samples.webm(8192)
    r = client.post("/v1/media", content=body, headers={**media_headers, "Content-Type": "video/webm"})
    assert r.status_code == 201 and r.json()["content_type"] == "video/webm"
    mkv = body.replace(b"webm", b"mkvx", 1)
    assert client.post("/v1/media", content=mkv, headers=media_headers).status_code == 415
