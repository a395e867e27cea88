"""Audit benchmark: what the plain-Python audit writer costs the match path, and that it loses nothing.

1. ``paced``: the API in this process (uvicorn in a thread) and one match client in another process,
   paced at 200 requests/s like a camera pipeline. An extra ``--rate`` (default 1,000, the storage
   ADR's) match events/s, shaped as /v1/match queues them, are submitted on the API's event loop (where
   /v1/match submits its own) 1 ms at a time, switched on and off every ``--phase`` s in ABBA order for
   ``--rounds`` rounds. Each call counts for the phase it started in (not within 0.15 s of a switch), so
   the baseline without the load comes from the same run. Target: p99 rise <= 10 %. Run ``--repeat``
   times (median reported), plus once with a null pacer (the same ticks building events that go
   nowhere) for the apparatus.
2. ``max``: ``appliance serve --workers 2`` under 8 concurrent wrk clients (closed loop, as fast as it
   answers), single and ``--batch``-probe requests: matches answered (2xx responses x probes) against
   match records committed (the writer chains' head seqs before and after, once they stop moving).
   Target: none missing (a request cut off when wrk stops may be answered and audited unseen, so a few
   more records than answered matches are expected).
3. ``burst``: one thread submits 50,000 events to an AuditLog; submitted and committed rates, CPU per event.

Usage: python bench/audit.py [--repeat 5] [--rounds 60] [--phase 0.5] [--seconds 10] [--batch 32]
Writes bench/results/audit.json.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (
    MODEL,
    Server,
    api_key,
    identities,
    probes,
    settings_of,
    start_stack,
    write_result,
    wrk_available,
    wrk_run,
)
from bench.enrol import bulk_load
from bench.paced import LoopPacer, abba, in_process_api, rises, summary

ENROLLED = [uuid.UUID(int=(0x5EED << 64) + i) for i in range(1000)]  # the people a camera keeps seeing
TAG = "audit-base"


def _event(i: int) -> Any:
    """A match event as /v1/match queues it: 70 % one of 1,000 enrolled people, 30 % unknown faces."""
    from appliance.audit import AuditEvent

    known = i % 10 < 7
    return AuditEvent(
        "match", "apikey:00000000-0000-4000-8000-00000000b0b0", outcome="match" if known else "unknown",
        subject_id=ENROLLED[(i * 7919) % len(ENROLLED)] if known else None, request_id=uuid.uuid4().hex,
        details={"model": MODEL, "k": 5, "similarity": round(0.95 + (i % 50) / 1000, 4) if known else 0.41,
                 "threshold": 0.94, "camera_id": f"cam-{i % 4}", "track_id": f"t{i // 20}",
                 "index_version": "v120", "candidates": 5})


def paced(settings: Any, token: str, body: bytes, args: argparse.Namespace) -> dict[str, Any]:
    from appliance.audit.queue import BACKPRESSURE

    server, state, loop, port = in_process_api(settings)
    log = state.audit

    def compare(null: bool) -> dict[str, Any]:
        waits = BACKPRESSURE._value.get()
        pacer = LoopPacer(loop, args.rate, _event if null else lambda i: log.submit(_event(i)))
        base, loaded, on_seconds = abba(port, token, body, pacer, args.rounds, args.phase)
        assert log.flush(120)
        row: dict[str, Any] = {"events_per_s": round(pacer.submitted / on_seconds),
                               "backpressure_waits": int(BACKPRESSURE._value.get() - waits),
                               **rises(base, loaded, (50, 90, 99))}
        print(f"  {'null pacer' if null else 'audit load'}: {row}", flush=True)
        return row

    try:
        runs = [compare(False) for _ in range(args.repeat)]
        null = compare(True)
    finally:
        server.should_exit = True
    out = summary(runs, null, args)
    return {**out, "meets_target": out["p99_rise_median_pct"] <= 10.0}


def preload(stack: Any, server: Server, vectors: np.ndarray, ident: np.ndarray) -> dict[str, Any]:
    """Bulk-enrol the index once (kept in var/bench-audit between runs)."""
    import psycopg

    with psycopg.connect(settings_of(stack).database_admin_url.get_secret_value()) as conn:
        have = int(conn.execute("SELECT count(*) FROM encodings").fetchone()[0])
    return bulk_load(server, vectors, ident, f"{TAG}-{len(vectors)}") if have < len(vectors) else {"encodings": have}


def committed(dsn: str) -> int:
    """Match records committed on writer chains so far, once the count has stopped moving."""
    import psycopg

    def read() -> int:
        with psycopg.connect(dsn) as conn:
            return int(conn.execute("SELECT coalesce(sum(seq), 0) FROM audit_heads WHERE chain LIKE 'w:%:match'")
                       .fetchone()[0])

    last = read()
    while True:
        time.sleep(1.0)
        now = read()
        if now == last:
            return now
        last = now


def max_rate(stack: Any, server: Server, token: str, queries: np.ndarray, args: argparse.Namespace) -> dict[str, Any]:
    dsn = settings_of(stack).database_admin_url.get_secret_value()
    out: dict[str, Any] = {}
    for name, per in (("single", 1), ("batch", args.batch)):
        path = f"/v1/match{':batch' if per > 1 else ''}?model={MODEL}&k=5"
        bodies = [queries[i:i + per].astype("<f4").tobytes() for i in range(0, len(queries) - per, per)]
        before = committed(dsn)
        run = wrk_run(server.port, path, bodies, token, connections=8, seconds=args.seconds, threads=2)
        records = committed(dsn) - before
        answered = (run["n"] - run["non_2xx"]) * per
        out[name] = {**run, "probes_per_request": per, "matches_answered": answered, "records_committed": records,
                     "matches_per_s": round(answered / args.seconds), "missing": max(0, answered - records),
                     "extra_in_flight_at_stop": records - answered}
        print(f"  {name}: {out[name]}", flush=True)
    out["none_missing"] = all(out[k]["missing"] == 0 for k in ("single", "batch"))
    return out


def burst(settings: Any, n: int = 50_000) -> dict[str, Any]:
    from appliance.audit.log import AuditLog
    from appliance.db.pool import open_pool

    pool = open_pool(settings, wait=True)
    log = AuditLog(pool, checkpoint_interval=0)
    events = [_event(i) for i in range(n)]
    log.submit(events[0])
    assert log.flush(60)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    cpu0, t0 = usage.ru_utime + usage.ru_stime, time.perf_counter()
    for e in events[1:]:
        log.submit(e)
    submitted = time.perf_counter() - t0
    assert log.flush(300)
    seconds = time.perf_counter() - t0
    usage = resource.getrusage(resource.RUSAGE_SELF)
    log.stop(checkpoint=False)
    pool.close()
    return {"events": n - 1, "submit_per_s": round((n - 1) / submitted), "committed_per_s": round((n - 1) / seconds),
            "process_cpu_us_per_event": round((usage.ru_utime + usage.ru_stime - cpu0) / (n - 1) * 1e6, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=10_000, help="encodings in the index")
    ap.add_argument("--rate", type=int, default=1000, help="extra match events/s in the paced comparison")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=60)
    ap.add_argument("--phase", type=float, default=0.5)
    ap.add_argument("--seconds", type=float, default=10.0, help="per max-rate run")
    ap.add_argument("--batch", type=int, default=32, help="probes per batch request")
    ap.add_argument("--only", default="burst,max,paced")
    args = ap.parse_args()
    only = set(args.only.split(","))
    if not wrk_available():
        raise SystemExit("bench/audit.py drives the max-rate runs with wrk (make bench-tools)")
    stack = start_stack("bench-audit")
    settings = settings_of(stack)
    admin, token = api_key(stack, ["admin"], "bench-audit"), api_key(stack, ["match"], "bench-audit-match")
    vectors, ident, centres = identities(args.n)
    queries, _ = probes(centres, 4096)
    result: dict[str, Any] = {"cpus": os.cpu_count(), "loadavg_at_start": [round(x, 2) for x in os.getloadavg()]}
    try:
        server = Server(stack, admin, workers=2)
        try:
            server.wait_all_workers()
            result["preload"] = preload(stack, server, vectors, ident)
            if "max" in only:
                print("max rate, 8 clients, 2 workers", flush=True)
                result["max"] = max_rate(stack, server, token, queries, args)
        finally:
            server.stop()
        if "burst" in only:
            result["burst"] = burst(settings)
            print(f"burst: {result['burst']}", flush=True)
        if "paced" in only:
            print(f"paced client, {args.rate} extra events/s on the event loop", flush=True)
            result["paced"] = paced(settings, token, queries[0].astype("<f4").tobytes(), args)
    finally:
        result["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
        print(f"-> {write_result('audit', result)}")


if __name__ == "__main__":
    main()
