"""POST /v1/encodings:bulk: NDJSON, one transaction per chunk with its audit records, resumable by key."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator

import httpx
import numpy as np
import psycopg

from appliance.stack.process import free_port
from tests.vector.conftest import MODEL, unit, wait_until


def _lines(tag: str, n: int, seed: int) -> list[bytes]:
    rng = np.random.default_rng(seed)
    vectors = unit(rng, n)
    return [json.dumps({"external_ref": f"{tag}-{i // 2}", "model": MODEL, "vector": vectors[i].tolist()}).encode()
            + b"\n" for i in range(n)]


def _orphans(admin_dsn: str, hashes: list[bytes]) -> tuple[int, int]:
    """(encodings of this run, encodings without an audit record naming them); subjects found by blind index."""
    with psycopg.connect(admin_dsn) as conn:
        return conn.execute(
            """SELECT count(*), count(*) FILTER (WHERE NOT EXISTS (
                   SELECT 1 FROM audit_log a WHERE a.action = 'enrol' AND a.subject_id = e.subject_id
                   AND a.details::jsonb -> 'encodings' ? e.id::text))
               FROM encodings e JOIN subjects s ON s.id = e.subject_id WHERE s.external_ref_hash = ANY(%s)""",
            (hashes,),
        ).fetchone()


def test_bulk_enrolment_is_idempotent_per_key(ready_client, enroll_headers, admin_dsn, blind_hashes):
    tag = f"bulk-{uuid.uuid4().hex[:8]}"
    hashes = blind_hashes([f"{tag}-{i}" for i in range(25)])
    body = b"".join(_lines(tag, 50, 20))
    headers = {**enroll_headers, "Idempotency-Key": tag, "Content-Type": "application/x-ndjson"}
    first = ready_client.post("/v1/encodings:bulk", content=body, headers=headers)
    assert first.status_code == 200, first.text
    assert first.json()["encodings_enrolled"] == 50
    again = ready_client.post("/v1/encodings:bulk", content=body, headers=headers)
    assert again.json()["lines_skipped"] == 50 and again.json()["encodings_enrolled"] == 0
    assert _orphans(admin_dsn, hashes) == (50, 0)
    r = ready_client.post("/v1/encodings:bulk", content=body, headers={**headers, "Idempotency-Key": ""})
    assert r.status_code == 400


def test_bulk_line_errors_name_the_line_and_keep_earlier_chunks(ready_client, enroll_headers):
    tag = f"bulkerr-{uuid.uuid4().hex[:8]}"
    lines = _lines(tag, 3, 21)
    lines.insert(1, json.dumps({"external_ref": "x", "model": MODEL, "vector": [0.0] * 128}).encode() + b"\n")
    r = ready_client.post("/v1/encodings:bulk", content=b"".join(lines),
                          headers={**enroll_headers, "Idempotency-Key": tag, "Content-Type": "application/x-ndjson"})
    assert r.status_code == 422 and r.json()["line"] == 2


def _serve(config_file: str, port: int) -> subprocess.Popen[bytes]:
    env = {**os.environ, "APPLIANCE_CONFIG": str(config_file), "APPLIANCE_LOG_LEVEL": "WARNING"}
    proc = subprocess.Popen([sys.executable, "-m", "appliance", "serve", "--port", str(port), "--workers", "1"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    assert wait_until(lambda: _ready(port), timeout=90), "server did not start"
    return proc


def _ready(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def test_killed_mid_bulk_leaves_no_unaudited_encoding_and_retry_completes(stack, enroll_headers, admin_dsn,
                                                                          blind_hashes):
    tag = f"crash-{uuid.uuid4().hex[:8]}"
    hashes = blind_hashes([f"{tag}-{i}" for i in range(1250)])
    lines = _lines(tag, 2500, 22)
    headers = {**enroll_headers, "Idempotency-Key": tag, "Content-Type": "application/x-ndjson"}
    port = free_port()
    proc = _serve(stack.config_file, port)

    def slow_body() -> Iterator[bytes]:
        yield b"".join(lines[:1500])  # the server commits the first chunk of 1000 lines...
        deadline = time.monotonic() + 60
        while _orphans(admin_dsn, hashes)[0] < 1000 and time.monotonic() < deadline:
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)  # ...and dies in the middle of the second
        proc.wait()
        yield b"".join(lines[1500:])

    try:
        with contextlib.suppress(httpx.HTTPError):
            httpx.post(f"http://127.0.0.1:{port}/v1/encodings:bulk", content=slow_body(), headers=headers, timeout=60)
        enrolled, orphans = _orphans(admin_dsn, hashes)
        assert enrolled == 1000 and orphans == 0
        proc = _serve(stack.config_file, port)
        r = httpx.post(f"http://127.0.0.1:{port}/v1/encodings:bulk", content=b"".join(lines), headers=headers,
                       timeout=120)
        assert r.status_code == 200, r.text
        assert r.json()["lines_skipped"] == 1000 and r.json()["encodings_total"] == 2500
        assert _orphans(admin_dsn, hashes) == (2500, 0)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(30)
