"""Bulk enrolment throughput: POST /v1/encodings:bulk (NDJSON) against a real `appliance serve`.

Baseline in the same run: the one-request-per-subject path (POST /v1/subjects/{id}/encodings).
Writes bench/results/enrol.json. Usage: python bench/enrol.py [--n 20000] [--per-identity 10]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import MODEL, Server, api_key, identities, request, start_stack, write_result


def ndjson(vectors: np.ndarray, ident: np.ndarray, tag: str, batch: int = 2000) -> Iterator[bytes]:
    for start in range(0, len(vectors), batch):
        yield b"".join(
            json.dumps({"external_ref": f"{tag}-{int(ident[i])}", "model": MODEL,
                        "vector": [round(float(x), 6) for x in vectors[i]]}).encode() + b"\n"
            for i in range(start, min(start + batch, len(vectors))))


def bulk_load(server: Server, vectors: np.ndarray, ident: np.ndarray, tag: str) -> dict[str, float]:
    """Stream every row through /v1/encodings:bulk; returns encodings/s (body generation excluded)."""
    body = b"".join(ndjson(vectors, ident, tag))
    conn = server.conn()
    started = time.perf_counter()
    status, resp = request(conn, "POST", "/v1/encodings:bulk", body, server.token, "application/x-ndjson",
                           {"Idempotency-Key": f"{tag}-load"})
    seconds = time.perf_counter() - started
    if status != 200:
        raise RuntimeError(f"bulk load failed: {status} {resp[:300]!r}")
    done = json.loads(resp)["encodings_enrolled"]
    return {"encodings": done, "seconds": round(seconds, 3), "per_second": round(done / seconds, 1)}


def single_requests(server: Server, vectors: np.ndarray, n: int) -> dict[str, float]:
    conn = server.conn()
    body = json.dumps({"external_ref": f"single-{uuid.uuid4()}"}).encode()
    status, resp = request(conn, "POST", "/v1/subjects", body, server.token)
    sid = json.loads(resp)["id"]
    started = time.perf_counter()
    for i in range(n):
        status, resp = request(conn, "POST", f"/v1/subjects/{sid}/encodings?model={MODEL}",
                               vectors[i].astype("<f4").tobytes(), server.token, "application/octet-stream")
        assert status == 201, resp
    seconds = time.perf_counter() - started
    return {"encodings": n, "seconds": round(seconds, 3), "per_second": round(n / seconds, 1)}


def new_subjects(server: Server, vectors: np.ndarray, n: int) -> dict[str, float]:
    """Create n subjects (label + external reference) and enrol one vector each: every subject costs its
    key: since owner keys, one key created in the key provider (a Vault transit key) per subject."""
    conn = server.conn()
    started = time.perf_counter()
    for i in range(n):
        body = json.dumps({"external_ref": f"new-{uuid.uuid4()}", "label": f"Person {i}"}).encode()
        status, resp = request(conn, "POST", "/v1/subjects", body, server.token)
        assert status == 201, resp
        sid = json.loads(resp)["id"]
        status, resp = request(conn, "POST", f"/v1/subjects/{sid}/encodings?model={MODEL}",
                               vectors[i].astype("<f4").tobytes(), server.token, "application/octet-stream")
        assert status == 201, resp
    seconds = time.perf_counter() - started
    return {"subjects": n, "seconds": round(seconds, 3), "per_second": round(n / seconds, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=20_000)
    ap.add_argument("--per-identity", type=int, default=10)
    args = ap.parse_args()
    stack = start_stack("bench-enrol")
    token = api_key(stack, ["admin"], "bench-enrol")
    server = Server(stack, token)
    try:
        tag = f"enrol-{uuid.uuid4().hex[:8]}"
        vectors, ident, _ = identities(args.n, per_identity=args.per_identity, seed=int(time.time()) % 1000)
        baseline = single_requests(server, vectors, 300)
        subjects = new_subjects(server, vectors, 300)
        bulk = bulk_load(server, vectors, ident, tag)
    finally:
        server.stop()
    result = {"n": args.n, "per_identity": args.per_identity, "bulk": bulk, "baseline_single_requests": baseline,
              "new_subjects": subjects,
              "ratio_bulk_over_single": round(bulk["per_second"] / baseline["per_second"], 2),
              "target_per_second": 1000, "meets_target": bulk["per_second"] >= 1000}
    path = write_result("enrol", result)
    print(f"{'path':28} {'enc/s':>10} {'seconds':>8}")
    print(f"{'bulk NDJSON':28} {bulk['per_second']:>10} {bulk['seconds']:>8}")
    print(f"{'single requests (baseline)':28} {baseline['per_second']:>10} {baseline['seconds']:>8}")
    print(f"{'new subject + 1 encoding':28} {subjects['per_second']:>10} {subjects['seconds']:>8}  (subjects/s)")
    print(f"-> {path}")


if __name__ == "__main__":
    main()
