"""Media fixtures: a media-scoped key, the bucket seen through the SDK, and a real uvicorn server
(for streaming and memory tests the in-process TestClient cannot do honestly: it buffers bodies)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from appliance.stack.process import free_port
from media.store import MediaStore


@pytest.fixture(scope="session")
def media_headers(make_key):  # type: ignore[no-untyped-def]
    return make_key("media", name="test-media")


@pytest.fixture(scope="session")
def media_store(settings, client) -> MediaStore:  # type: ignore[no-untyped-def]
    """The bucket the API writes to (``client`` first, so its startup hook created it)."""
    from appliance import clients

    return MediaStore(clients.s3_client(settings), settings.s3_bucket)


class LiveServer:
    def __init__(self, url: str, proc: subprocess.Popen) -> None:  # type: ignore[type-arg]
        self.url, self.proc = url, proc

    @property
    def pid(self) -> int:
        return self.proc.pid


@contextlib.contextmanager
def serve(config_file: Path, log: Path) -> Iterator[LiveServer]:
    """``appliance serve`` in a child process against the test stack, stopped by its own PID."""
    port = free_port()
    env = {**os.environ, "APPLIANCE_CONFIG": str(config_file), "APPLIANCE_LOG_LEVEL": "WARNING"}
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "appliance", "serve", "--port", str(port), "--workers", "1"],
                                env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            if proc.poll() is not None:
                raise RuntimeError(f"API exited at start: {log.read_text()[-2000:]}")
            try:
                if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        yield LiveServer(url, proc)
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="session")
def live_server(stack, client, tmp_path_factory) -> Iterator[LiveServer]:  # type: ignore[no-untyped-def]
    with serve(stack.config_file, Path(tmp_path_factory.mktemp("media-api")) / "api.log") as server:
        yield server
