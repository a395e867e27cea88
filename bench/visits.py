"""Visits benchmark: dashboard queries at 10M visits, and what recording visits costs the match path.

1. ``queries``: load ``--n`` (10M) visits over the last 30 days (20 cameras, 1,000 subjects, 40 %
   recognised) once with COPY, into ``visits`` (daily partitions, BRIN + btrees, the hourly roll-up)
   and into ``visits_naive`` (one plain table with the same btrees, no partitions, no BRIN, no
   roll-up), both in time order. Then the same list and summary queries (last day, last 30 days,
   one camera, one subject) on each, p50/p99 over ``--reps`` runs; the appliance's side runs the
   appliance's own code (``appliance.visits.queries``). The first summary over 30 days rolls up 720
   closed hours once: reported apart ("roll-up, once"). Target: p99 <= 200 ms at 10M.
2. ``ingest``: the API in this process (uvicorn in a thread), one match client at 200 requests/s in
   another process (as bench/audit.py), and ``--rate`` (1,000) extra visits/s recorded on the event
   loop (each its own passage: the worst case, no frames to fold), switched on and off every
   ``--phase`` s in ABBA order. Reports the match p99 with and without, and that every recorded
   visit was committed. Target: >= 1,000 visits/s sustained, p99 rise <= 10 %.

Usage: python bench/visits.py [--n 10000000] [--reps 30] [--only queries,ingest]
Writes bench/results/visits.json. The 10M rows stay in var/bench-visits (a later run reuses them).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (
    RESULTS,
    Server,
    api_key,
    identities,
    pct,
    probes,
    settings_of,
    start_stack,
    write_result,
)
from bench.enrol import bulk_load
from bench.paced import LoopPacer, abba, in_process_api, rises, summary

CAMERAS, SUBJECTS, MATCH_SHARE, DAYS = 20, 1000, 0.4, 30
SUBJECT_IDS = [uuid.UUID(int=(0x715175 << 64) + i) for i in range(SUBJECTS)]
NAIVE = """CREATE TABLE IF NOT EXISTS visits_naive (LIKE visits INCLUDING DEFAULTS INCLUDING CONSTRAINTS);
CREATE INDEX IF NOT EXISTS visits_naive_time ON visits_naive (first_seen, id);
CREATE INDEX IF NOT EXISTS visits_naive_camera ON visits_naive (camera_id, first_seen, id);
CREATE INDEX IF NOT EXISTS visits_naive_subject ON visits_naive (subject_id, first_seen, id)
    WHERE subject_id IS NOT NULL;
GRANT SELECT ON visits_naive TO appliance_rw;"""


def _chunk(start: datetime, seconds: float, n: int, offset: int, rng: np.random.Generator) -> bytes:
    """``n`` visits in time order over ``seconds`` from ``start``, as COPY text."""
    t = np.sort(rng.uniform(0, seconds, n))
    base = np.datetime64(start.replace(tzinfo=None), "us")
    first = base + (t * 1e6).astype("timedelta64[us]")
    last = first + rng.integers(1, 20_000_000, n).astype("timedelta64[us]")
    day = np.datetime_as_string(first.astype("datetime64[D]"))
    f_txt, l_txt = np.datetime_as_string(first, unit="us"), np.datetime_as_string(last, unit="us")
    cams = rng.integers(0, CAMERAS, n)
    match = rng.random(n) < MATCH_SHARE
    subj = rng.integers(0, SUBJECTS, n)
    sim = np.round(np.where(match, rng.uniform(0.94, 0.99, n), rng.uniform(0.5, 0.93, n)), 4)
    frames = rng.integers(1, 40, n)
    subj_txt = [str(s) for s in SUBJECT_IDS]
    lines = [
        f"{day[i]}\t{offset + i:032x}\tcam-{cams[i]:02d}\t{offset + i}\t{f_txt[i]}Z\t{l_txt[i]}Z\t"
        f"{'match' if match[i] else 'unknown'}\t{subj_txt[subj[i]] if match[i] else chr(92) + 'N'}\t{sim[i]}\t"
        f"{frames[i]}\n"
        for i in range(n)
    ]
    return "".join(lines).encode()


def load(dsn: str, n: int, now: datetime) -> dict[str, Any]:
    """COPY ``n`` visits into both tables (once: reused when already there)."""
    import psycopg

    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(NAIVE)
        have = int(conn.execute("SELECT count(*) FROM visits_naive").fetchone()[0])
        if have >= n:
            return {"rows": have, "reused": True}
        conn.execute("TRUNCATE visits, visits_naive, visit_rollup, visit_rollup_hours")
        start = (now - timedelta(days=DAYS)).replace(minute=0, second=0, microsecond=0)
        conn.execute("SELECT visits_ensure_partitions(%s, %s)", (start.date(), DAYS + 3))
        rng = np.random.default_rng(20)
        chunks = 20
        span = (now - start).total_seconds() / chunks
        out: dict[str, Any] = {"rows": n, "reused": False}
        for table in ("visits", "visits_naive"):
            rng = np.random.default_rng(20)
            t0 = time.perf_counter()
            for c in range(chunks):
                data = _chunk(start + timedelta(seconds=span * c), span, n // chunks, c * (n // chunks), rng)
                with conn.cursor().copy(f"COPY {table} (day, id, camera_id, track_id, first_seen, last_seen, "
                                        "decision, subject_id, similarity, frames) FROM STDIN") as copy:
                    copy.write(data)
                print(f"  {table}: {(c + 1) * (n // chunks):,} rows", flush=True)
            out[f"{table}_copy_seconds"] = round(time.perf_counter() - t0, 1)
            out[f"{table}_rows_per_s"] = round(n / (time.perf_counter() - t0))
            conn.execute(f"VACUUM ANALYZE {table}")
        out["bytes"] = {t: int(conn.execute("SELECT pg_total_relation_size(c.oid) + coalesce((SELECT sum("
                                            "pg_total_relation_size(i.inhrelid)) FROM pg_inherits i WHERE "
                                            "i.inhparent = c.oid), 0) FROM pg_class c WHERE relname = %s",
                                            (t,)).fetchone()[0]) for t in ("visits", "visits_naive")}
        return out


def _time(fn: Any, reps: int, budget: float = 60.0) -> dict[str, Any]:
    fn()  # warm the cache
    times: list[float] = []
    started = time.perf_counter()
    while len(times) < reps and (time.perf_counter() - started < budget or len(times) < 5):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return {"p50_ms": round(pct(times, 50), 2), "p99_ms": round(pct(times, 99), 2), "runs": len(times)}


def queries_bench(dsn: str, now: datetime, reps: int) -> dict[str, Any]:
    import psycopg

    from appliance.visits import queries as q

    day, month = now - timedelta(days=1), now - timedelta(days=DAYS)
    camera, subject = "cam-07", SUBJECT_IDS[42]
    out: dict[str, Any] = {}
    with psycopg.connect(dsn, autocommit=True) as conn:
        for table in ("visit_rollup", "visit_rollup_hours", "visit_rollup_days", "visit_rollup_days_done"):
            conn.execute(f"DELETE FROM {table}")  # noqa: S608 - the roll-up from scratch, as the writer would catch up
        t = time.perf_counter()
        end = (now - q.ROLLUP_SETTLE).replace(minute=0, second=0, microsecond=0)
        hours = q.roll_up(conn, month.replace(minute=0, second=0, microsecond=0) + timedelta(hours=1), end)
        days = q.roll_up_days(conn, month.date(), end.date())
        out["roll_up_once"] = {"hours": hours, "days": days, "seconds": round(time.perf_counter() - t, 2)}
        print(f"  roll-up: {out['roll_up_once']}", flush=True)

        def ours_list(start: datetime, **kw: Any) -> Any:
            return lambda: q.list_visits(conn, q.VisitFilter.build(start, now, now=now, **kw), 100)

        def naive_list(start: datetime, where: str = "", params: tuple[Any, ...] = ()) -> Any:
            sql = (f"SELECT id, camera_id, track_id, first_seen, last_seen, decision, subject_id, similarity, "  # noqa: S608
                   f"frames FROM visits_naive WHERE first_seen >= %s AND first_seen < %s {where} "
                   "ORDER BY first_seen DESC, id DESC LIMIT 101")
            return lambda: conn.execute(sql, (start, now, *params)).fetchall()

        def ours_summary(start: datetime, interval: str, group_by: str) -> Any:
            return lambda: q.summary(conn, start, now, interval, group_by, now=now)  # type: ignore[arg-type]

        def naive_summary(start: datetime, interval: str, group_by: str, table: str = "visits_naive") -> Any:
            col = {"camera": "camera_id", "decision": "decision", "subject": "subject_id"}[group_by]
            params: tuple[Any, ...] = (interval, start, now)
            days = ""
            if table == "visits":  # name the day partitions, as the appliance's queries do
                days, params = "AND day BETWEEN %s AND %s", (*params, start.date(), now.date())
            sql = (f"SELECT date_trunc(%s, first_seen, 'UTC'), {col}, count(*) FROM {table} "  # noqa: S608
                   f"WHERE first_seen >= %s AND first_seen < %s {days} GROUP BY 1, 2")
            return lambda: conn.execute(sql, params).fetchall()

        def same_counts(ours: Any, naive: Any) -> bool:
            mine = {(b["start"], b["key"]): b["visits"] for b in ours()}
            theirs = {(b, None if k is None else str(k)): n for b, k, n in naive()}
            return mine == theirs

        cases = {
            "list_last_day": (ours_list(day), naive_list(day)),
            "list_last_30_days": (ours_list(month), naive_list(month)),
            "list_one_camera_30_days": (ours_list(month, camera_id=camera),
                                        naive_list(month, "AND camera_id = %s", (camera,))),
            "list_one_subject_30_days": (ours_list(month, subject_id=subject),
                                         naive_list(month, "AND subject_id = %s", (subject,))),
            "summary_last_day_hour_by_decision": (ours_summary(day, "hour", "decision"),
                                                  naive_summary(day, "hour", "decision")),
            "summary_30_days_day_by_camera": (ours_summary(month, "day", "camera"),
                                              naive_summary(month, "day", "camera")),
            "summary_30_days_hour_by_decision": (ours_summary(month, "hour", "decision"),
                                                 naive_summary(month, "hour", "decision")),
            "summary_30_days_day_by_subject": (ours_summary(month, "day", "subject"),
                                               naive_summary(month, "day", "subject")),
        }
        for name, (ours, naive) in cases.items():
            row = {"partitioned": _time(ours, reps), "naive": _time(naive, max(5, reps // 3))}
            if name.startswith("summary"):  # the same answer, and what the roll-up adds over partitions + BRIN
                _, interval, _, group_by = name.rsplit("_", 3)
                row["same_counts_as_naive"] = same_counts(ours, naive)
                start = day if "last_day" in name else month
                row["partitioned_without_roll_up"] = _time(naive_summary(start, interval, group_by, "visits"),
                                                           max(5, reps // 3))
            row["p99_ratio_naive_over_ours"] = round(row["naive"]["p99_ms"] / row["partitioned"]["p99_ms"], 1)
            out[name] = row
            print(f"  {name}: {row}", flush=True)
    out["max_p99_ms"] = max(v["partitioned"]["p99_ms"] for k, v in out.items() if isinstance(v, dict) and "naive" in v)
    out["meets_target"] = out["max_p99_ms"] <= 200.0
    return out


def ingest(settings: Any, token: str, body: bytes, args: argparse.Namespace) -> dict[str, Any]:
    import psycopg

    from appliance.visits.recorder import DROPPED

    server, state, loop, port = in_process_api(settings)
    runs = []
    try:
        for run in range(args.repeat + 1):
            null = run == args.repeat  # the last run: the null pacer
            camera = f"bench-{uuid.uuid4().hex[:8]}"
            dropped = DROPPED._value.get()

            def emit(_i: int, camera: str = camera) -> None:
                ts = time.time()
                state.visits.record(camera, None, "unknown", None, 0.5, ts, ts)

            pacer = LoopPacer(loop, args.rate, (lambda _i: None) if null else emit)
            base, loaded, on_seconds = abba(port, token, body, pacer, args.rounds, args.phase)
            assert state.visits.flush(30)
            with psycopg.connect(settings.database_url.get_secret_value()) as conn:
                committed = int(conn.execute("SELECT count(*) FROM visits WHERE camera_id = %s AND day >= %s",
                                             (camera, datetime.now(UTC).date() - timedelta(days=1))).fetchone()[0])
            row: dict[str, Any] = {"null_pacer": null, "visits_per_s": round(pacer.submitted / on_seconds),
                                   "recorded": 0 if null else pacer.submitted,
                                   "committed": committed, "dropped": int(DROPPED._value.get() - dropped),
                                   **rises(base, loaded, (50, 99))}
            print(f"  ingest: {row}", flush=True)
            runs.append(row)
    finally:
        server.should_exit = True
    null_run = runs.pop()
    out = summary(runs, null_run, args)
    return {**out, "all_committed": all(r["committed"] == r["recorded"] for r in runs),
            "meets_target": out["p99_rise_median_pct"] <= 10.0
            # the pacer offers --rate; what it measures is a little less (ticks lost at each switch)
            and all(r["visits_per_s"] >= 0.99 * args.rate and r["committed"] == r["recorded"] for r in runs)}


def burst(settings: Any, n: int = 100_000) -> dict[str, Any]:
    """The writer alone: ``n`` single passages recorded, then one flush; rows/s of the upsert."""
    from appliance.db.pool import open_pool
    from appliance.visits.recorder import VisitRecorder

    pool = open_pool(settings, wait=True)
    try:
        rec = VisitRecorder(pool, buffer_size=n + 1)
        camera, ts = f"burst-{uuid.uuid4().hex[:8]}", time.time()
        t = time.perf_counter()
        for i in range(n):
            rec.record(camera, None, "unknown", None, 0.5, ts + i * 1e-4, ts + i * 1e-4)
        record_us = (time.perf_counter() - t) / n * 1e6
        t = time.perf_counter()
        written = rec.write_once()
        seconds = time.perf_counter() - t
    finally:
        pool.close()
    return {"passages": n, "record_us_per_call": round(record_us, 2), "written": written,
            "write_seconds": round(seconds, 2), "rows_per_s": round(written / seconds)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=10_000_000, help="visits loaded for the query benchmark")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--encodings", type=int, default=10_000, help="encodings in the index (ingest)")
    ap.add_argument("--rate", type=int, default=1000, help="extra visits/s in the ingest comparison")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--phase", type=float, default=0.5)
    ap.add_argument("--only", default="queries,ingest")
    args = ap.parse_args()
    only = set(args.only.split(","))
    stack = start_stack("bench-visits")
    settings = settings_of(stack)
    admin_dsn = settings.database_admin_url.get_secret_value()
    now = datetime.now(UTC)
    previous = RESULTS / "visits.json"  # a run of one part keeps the other part's last numbers
    result: dict[str, Any] = json.loads(previous.read_text()) if only != {"queries", "ingest"} and \
        previous.exists() else {}
    result |= {"cpus": os.cpu_count(), "loadavg_at_start": [round(x, 2) for x in os.getloadavg()]}
    try:
        if "queries" in only:
            print(f"load {args.n:,} visits", flush=True)
            result["load"] = {**result.get("load", {}), **load(admin_dsn, args.n, now)}  # a reuse keeps the COPY facts
            print(f"queries at {args.n:,} visits", flush=True)
            result["queries"] = queries_bench(settings.database_url.get_secret_value(), now, args.reps)
        if "ingest" in only:
            admin, token = api_key(stack, ["admin"], "bench-visits"), api_key(stack, ["match"], "bench-visits-m")
            vectors, ident, centres = identities(args.encodings)
            server = Server(stack, admin, workers=1)
            try:
                with __import__("psycopg").connect(admin_dsn) as conn:
                    have = int(conn.execute("SELECT count(*) FROM encodings").fetchone()[0])
                if have < len(vectors):
                    bulk_load(server, vectors, ident, f"visits-{len(vectors)}")
            finally:
                server.stop()
            result["burst"] = burst(settings)
            print(f"burst: {result['burst']}", flush=True)
            queries, _ = probes(centres, 16)
            print(f"ingest: {args.rate} visits/s beside a 200/s match client", flush=True)
            result["ingest"] = ingest(settings, token, queries[0].astype("<f4").tobytes(), args)
    finally:
        result["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
        print(f"-> {write_result('visits', result)}")


if __name__ == "__main__":
    main()
