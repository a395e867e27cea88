"""S3 down before or during an upload: the caller gets 503 promptly and PostgreSQL references nothing.

Stops the stack's real SeaweedFS process and starts it again afterwards (state saved for `down`).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import httpx
import psycopg
import pytest

from tests.media import samples


def _rows(admin_dsn: str, camera: str) -> int:
    with psycopg.connect(admin_dsn) as conn:
        return conn.execute("SELECT count(*) FROM media WHERE camera_id = %s", (camera,)).fetchone()[0]  # type: ignore[index]


@pytest.fixture
def restart_s3(stack, media_store) -> Iterator[None]:  # type: ignore[no-untyped-def]
    try:
        yield
    finally:
        if not stack.s3.running():
            stack.s3.start()
            stack._save()
        media_store.versions("captures/warmup")  # wait until S3 answers again


def test_upload_while_s3_is_down_is_503_and_leaves_no_row(stack, client, media_headers, admin_dsn, restart_s3):
    camera = f"down-{uuid.uuid4().hex[:8]}"
    stack.s3.stop()
    stack._save()
    for body in (samples.jpeg(), samples.mp4(300_000)):
        started = time.monotonic()
        r = client.post("/v1/media", params={"camera_id": camera}, content=body,
                        headers={**media_headers, "Content-Type": "application/octet-stream"})
        assert r.status_code == 503, r.text
        assert r.headers["content-type"] == "application/problem+json" and r.headers["retry-after"]
        assert time.monotonic() - started < 15  # fails fast (timeouts, bounded retries), not a hang
    assert _rows(admin_dsn, camera) == 0


def test_s3_stopping_mid_upload_is_503_and_leaves_no_row(stack, live_server, media_headers, admin_dsn, restart_s3):
    """The body is half sent when S3 goes away; the server must not write a row for it."""
    camera = f"mid-{uuid.uuid4().hex[:8]}"
    clip = samples.mp4(4 * 1024 * 1024)  # under one multipart part: the server reads it all, then fails

    def body() -> Iterator[bytes]:
        yield clip[: 2 * 1024 * 1024]
        stack.s3.stop()
        stack._save()
        yield clip[2 * 1024 * 1024 :]

    try:
        r = httpx.post(f"{live_server.url}/v1/media", params={"camera_id": camera}, content=body(),
                       headers={**media_headers, "Content-Type": "video/mp4"}, timeout=60)
        assert r.status_code == 503, r.text
    except httpx.TransportError:
        pass  # the server may answer and close before the client finished sending; either way, no row
    assert _rows(admin_dsn, camera) == 0
    # And once S3 is back, uploads work again with the same server and clients.
    stack.s3.start()
    stack._save()
    r = httpx.post(f"{live_server.url}/v1/media", params={"camera_id": camera}, content=samples.jpeg(),
                   headers=media_headers, timeout=60)
    assert r.status_code == 201, r.text
    assert _rows(admin_dsn, camera) == 2 + 1  # the image and its two thumbnails
