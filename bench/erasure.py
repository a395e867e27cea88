"""Erasure latency (DELETE /v1/subjects/{id}) alone and under match load, measured in the same run.

One `appliance serve` over a preloaded index (clustered synthetic identities, bulk-enrolled). Victims
are enrolled beforehand like real subjects (a few encodings and one captured photo), then erased one
at a time, a short gap apart:
  idle    no other traffic (the baseline)
  loaded  8 concurrent match clients (wrk, or Python clients in another process without wrk), closed
          loop as fast as the server answers, plus one client enrolling new subjects back to back
Reports p50/p99/max per phase, the loaded/idle ratios, and which erasure step took the time: each
step's duration from the receipt's step timestamps (appliance.gdpr.erasure records them), the rest
of the call as ``receipt+http``. Target: p99 <= 1 s under load. Writes bench/results/erasure.json.

Usage: python bench/erasure.py [--n 50000] [--erasures 60] [--clients 8] [--gap 0.25] [--no-photo]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import subprocess
import sys
import threading
import time
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (
    MODEL,
    RawClient,
    Server,
    WrkLoad,
    api_key,
    identities,
    pct,
    probes,
    request,
    settings_of,
    start_stack,
    write_result,
    wrk_available,
)
from bench.enrol import bulk_load
from bench.media import capture_jpeg

TARGET_P99_MS = 1000.0
BASE_TAG = "erasure-base"


# --- data ---------------------------------------------------------------------------------------------------


def preload(stack: Any, server: Server, n: int) -> dict[str, Any]:
    """Bulk-enrol the background population once (kept in var/bench-erasure between runs)."""
    import psycopg

    vectors, ident, centres = identities(n)
    with psycopg.connect(settings_of(stack).database_admin_url.get_secret_value()) as conn:
        have = conn.execute("SELECT count(*) FROM encodings e JOIN subjects s ON s.id = e.subject_id "
                            "WHERE s.state = 'active'").fetchone()[0]
    loaded = bulk_load(server, vectors, ident, f"{BASE_TAG}-{n}") if have < n else {"encodings": 0}
    return {"centres": centres, "loaded_now": loaded["encodings"], "active_encodings_before": int(have)}


def enrol_subject(conn: Any, token: str, vectors: np.ndarray, photo: bytes | None) -> str:
    status, body = request(conn, "POST", "/v1/subjects", json.dumps({"external_ref": uuid.uuid4().hex}).encode(),
                           token)
    assert status == 201, body
    sid = json.loads(body)["id"]
    status, body = request(conn, "POST", f"/v1/subjects/{sid}/encodings?model={MODEL}",
                           vectors.astype("<f4").tobytes(), token, "application/octet-stream")
    assert status == 201, body
    if photo is not None:
        status, body = request(conn, "POST", f"/v1/media?subject_id={sid}&kind=image", photo, token, "image/jpeg")
        assert status == 201, body
    return str(sid)


def victims(server: Server, count: int, per_subject: int, photo: bytes | None, seed: int) -> list[str]:
    vectors, _, _ = identities(count * per_subject, per_identity=per_subject, seed=seed)
    conn = server.conn()
    return [enrol_subject(conn, server.token, vectors[i * per_subject:(i + 1) * per_subject], photo)
            for i in range(count)]


# --- load beside the erasures -------------------------------------------------------------------------------


def _python_match_clients(port: int, reqs: list[bytes], threads: int, stop: Any, out: Any) -> None:
    """Child process: ``threads`` keep-alive match clients until ``stop``; puts their latencies."""
    lat: list[float] = []
    lock = threading.Lock()

    def worker(offset: int) -> None:
        client, mine, i = RawClient(port), [], offset
        while not stop.is_set():
            t = time.perf_counter()
            status, _ = client.send(reqs[i % len(reqs)])
            if status == 200:
                mine.append(time.perf_counter() - t)
            i += threads
        with lock:
            lat.extend(mine)

    ts = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    out.put(lat)


def _enrol_churn(server: Server, vectors: np.ndarray, per_subject: int, stop: Any, out: Any) -> None:
    """Child process: enrol new subjects back to back until ``stop``; puts the count and errors."""
    conn, done, errors = server.conn(), 0, 0
    while not stop.is_set():
        start = (done + errors) * per_subject % (len(vectors) - per_subject)
        try:
            enrol_subject(conn, server.token, vectors[start:start + per_subject], None)
            done += 1
        except (AssertionError, OSError):
            errors += 1
            conn = server.conn()
    out.put({"subjects": done, "errors": errors})


class Load:
    """Match clients and enrol churn in other processes, so they never hold this process's GIL while
    it times an erasure."""

    def __init__(self, server: Server, queries: np.ndarray, clients: int, per_subject: int) -> None:
        ctx = mp.get_context("fork")
        self.stop_event, self.match_out, self.churn_out = ctx.Event(), ctx.Queue(), ctx.Queue()
        bodies = [v.astype("<f4").tobytes() for v in queries]
        path = f"/v1/match?model={MODEL}&k=10"
        self.wrk: WrkLoad | None = None
        self.matchers: Any = None
        if wrk_available():
            self.wrk = WrkLoad(server.port, path, bodies, server.token, clients)
            self.generator = f"{self.wrk.generator}, closed loop"
        else:
            reqs = [RawClient.build(path, b, server.token) for b in bodies]
            self.matchers = ctx.Process(target=_python_match_clients,
                                        args=(server.port, reqs, clients, self.stop_event, self.match_out))
            self.matchers.start()
            self.generator = f"python, {clients} threads in a child process, closed loop"
        churn_vectors, _, _ = identities(20_000, per_identity=per_subject, seed=int(time.time()) % 1000)
        self.churn = ctx.Process(target=_enrol_churn,
                                 args=(server, churn_vectors, per_subject, self.stop_event, self.churn_out))
        self.churn.start()
        self.started = time.perf_counter()

    def finish(self) -> dict[str, Any]:
        seconds = time.perf_counter() - self.started
        self.stop_event.set()
        churn = self.churn_out.get(timeout=120)
        self.churn.join(30)
        if self.wrk is not None:
            match = self.wrk.stop()
        else:
            lat = self.match_out.get(timeout=120)
            self.matchers.join(30)
            match = {"n": len(lat), "p50_ms": round(pct(lat, 50) * 1e3, 3), "p99_ms": round(pct(lat, 99) * 1e3, 3),
                     "per_second": round(len(lat) / seconds, 1)}
        match["load_generator"] = self.generator
        churn["per_second"] = round(churn["subjects"] / seconds, 2)
        return {"seconds": round(seconds, 1), "match": match, "enrol_churn": churn}


# --- erasures -----------------------------------------------------------------------------------------------


def step_durations(job: dict[str, Any], total_ms: float) -> dict[str, float]:
    """Milliseconds per erasure step, from the receipt's step timestamps (each step's end, in order);
    ``receipt+http`` is the rest of the call: signing, storing the receipt, and the HTTP round trip."""
    receipt = job["receipt"]
    marks = sorted((datetime.fromisoformat(ts), step) for step, ts in receipt["steps"].items())
    prev = datetime.fromisoformat(receipt["requested_at"])
    out: dict[str, float] = {}
    for ts, step in marks:
        out[step] = round((ts - prev).total_seconds() * 1e3, 3)
        prev = ts
    out["receipt+http"] = round(total_ms - sum(out.values()), 3)
    return out


def erase_all(server: Server, ids: list[str], gap: float) -> list[dict[str, Any]]:
    conn = server.conn()
    done = []
    for sid in ids:
        t = time.perf_counter()
        status, body = request(conn, "DELETE", f"/v1/subjects/{sid}", None, server.token)
        ms = (time.perf_counter() - t) * 1e3
        assert status == 200, body
        job = json.loads(body)
        assert job["state"] == "done", job
        done.append({"ms": round(ms, 3), "steps": step_durations(job, ms)})
        time.sleep(gap)
    return done


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Latency percentiles, each step's p50/p99/max, and which step dominated the slowest tenth."""
    lat = [r["ms"] for r in runs]
    steps = list(runs[0]["steps"])
    per_step = {s: {"p50_ms": round(pct([r["steps"].get(s, 0.0) for r in runs], 50), 3),
                    "p99_ms": round(pct([r["steps"].get(s, 0.0) for r in runs], 99), 3),
                    "max_ms": round(max(r["steps"].get(s, 0.0) for r in runs), 3)} for s in steps}
    slow = sorted(runs, key=lambda r: r["ms"])[-max(1, len(runs) // 10):]
    dominant: dict[str, int] = {}
    for r in slow:
        top = max(r["steps"], key=lambda s: r["steps"][s])
        dominant[top] = dominant.get(top, 0) + 1
    share = {s: round(float(np.mean([r["steps"].get(s, 0.0) / r["ms"] for r in slow])), 3) for s in steps}
    return {"n": len(lat), "p50_ms": round(pct(lat, 50), 1), "p99_ms": round(pct(lat, 99), 1),
            "max_ms": round(max(lat), 1), "mean_ms": round(float(np.mean(lat)), 1), "steps": per_step,
            "slowest_tenth": {"n": len(slow), "min_ms": round(slow[0]["ms"], 1), "dominant_step": dominant,
                              "mean_share_per_step": share}}


def tree_state() -> dict[str, Any]:
    """The commit measured, and whether the working tree differed from it."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True, cwd=Path(__file__).parent).stdout.strip()

    dirty = git("status", "--porcelain").splitlines()
    return {"commit": git("rev-parse", "--short", "HEAD"), "dirty_files": len(dirty)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=50_000, help="background encodings in the index (ANALYZE samples up to "
                                                          "30,000 rows: smaller hides table-size costs)")
    ap.add_argument("--erasures", type=int, default=60, help="erasures per phase")
    ap.add_argument("--per-subject", type=int, default=3, help="encodings per victim and per churn subject")
    ap.add_argument("--clients", type=int, default=8, help="concurrent match clients in the loaded phase")
    ap.add_argument("--gap", type=float, default=0.25, help="seconds between two erasures")
    ap.add_argument("--warmup", type=int, default=3, help="erasures before measuring")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--no-photo", action="store_true", help="victims without a captured photo (no S3 objects)")
    args = ap.parse_args()
    stack = start_stack("bench-erasure")
    token = api_key(stack, ["admin"], "bench-erasure")
    server = Server(stack, token, workers=args.workers)
    try:
        if args.workers > 1:
            server.wait_all_workers()
        print(f"preloading {args.n} encodings")
        base = preload(stack, server, args.n)
        photo = None if args.no_photo else capture_jpeg()
        total = args.warmup + 2 * args.erasures
        print(f"enrolling {total} victims")
        ids = victims(server, total, args.per_subject, photo, seed=int(time.time()) % 10_000)
        warm, idle_ids, loaded_ids = ids[:args.warmup], ids[args.warmup:args.warmup + args.erasures], \
            ids[args.warmup + args.erasures:]
        erase_all(server, warm, args.gap)
        print("idle erasures")
        idle = summarise(erase_all(server, idle_ids, args.gap))
        print(f"erasures under {args.clients} match clients + enrol churn")
        queries, _ = probes(base["centres"], 2000)
        load = Load(server, queries, args.clients, args.per_subject)
        try:
            time.sleep(2.0)  # let the load reach its steady state before the first erasure
            loaded_runs = erase_all(server, loaded_ids, args.gap)
        finally:
            load_stats = load.finish()
        loaded = summarise(loaded_runs)
    finally:
        server.stop()
    result = {
        "n": args.n, "erasures_per_phase": args.erasures, "encodings_per_victim": args.per_subject,
        "photo_per_victim": photo is not None, "gap_seconds": args.gap, "workers": args.workers,
        "clients": args.clients, "cpus": os.cpu_count(), "loadavg_at_end": [round(x, 2) for x in os.getloadavg()],
        "tree": tree_state(), "preload": {k: v for k, v in base.items() if k != "centres"},
        "idle": idle, "loaded": loaded, "load": load_stats,
        "ratio_p50_loaded_over_idle": round(loaded["p50_ms"] / idle["p50_ms"], 2),
        "ratio_p99_loaded_over_idle": round(loaded["p99_ms"] / idle["p99_ms"], 2),
        "target_p99_ms": TARGET_P99_MS, "meets_target": loaded["p99_ms"] <= TARGET_P99_MS,
    }
    path = write_result("erasure", result)
    print(f"\n{'phase':8} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}")
    for name in ("idle", "loaded"):
        r = result[name]
        print(f"{name:8} {r['p50_ms']:>8} {r['p99_ms']:>8} {r['max_ms']:>8}")
    print(f"ratios loaded/idle: p50 {result['ratio_p50_loaded_over_idle']}, p99 {result['ratio_p99_loaded_over_idle']}"
          f"; match load {load_stats['match']['per_second']}/s, churn {load_stats['enrol_churn']['per_second']} "
          f"subjects/s")
    print(f"\n{'step':16} {'idle p50':>9} {'idle p99':>9} {'load p50':>9} {'load p99':>9}")
    for step in loaded["steps"]:
        i, j = idle["steps"].get(step, {}), loaded["steps"][step]
        print(f"{step:16} {i.get('p50_ms', ''):>9} {i.get('p99_ms', ''):>9} {j['p50_ms']:>9} {j['p99_ms']:>9}")
    print(f"slowest tenth under load, dominant step: {loaded['slowest_tenth']['dominant_step']}")
    print(f"p99 under load {'meets' if result['meets_target'] else 'MISSES'} the {TARGET_P99_MS:.0f} ms target")
    print(f"-> {path}")


if __name__ == "__main__":
    main()
