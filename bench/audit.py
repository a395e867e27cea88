"""Audit benchmark: sustained events/s of the batched writer, and /v1/match latency with and without
20,000 audit events/s flowing through the same process's AuditLog (same run, alternating phases).

    .venv/bin/python bench/audit.py [--seconds 8] [--rounds 6] [--phase-seconds 4] [--rate 20000]

Writes bench/results/audit.json. The API runs in this process (uvicorn in a thread) so the synthetic
audit load shares its GIL and CPU exactly as match-path events would; the latency client is a
separate process with one keep-alive connection, timing sequential requests: back to back, and
(``--client-rate``, default 200/s) paced like a camera pipeline, so that the client and a saturated
server do not themselves fill the two cores the writer and PostgreSQL need.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import resource
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import api_key, free_port, pct, settings_of, start_stack, write_result

MODEL = "dlib-resnet-v1"
LANES = int(os.environ.get("BENCH_AUDIT_LANES", "0")) or None  # None: the service's default (settings)
DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "faces_dlib128.npz"


# the match comparisons (--loads)
LOADS = ("in_process", "paced_client", "other_process", "other_process_paced", "null_pacer", "cpu_burn")
ENROLLED = [uuid.UUID(int=(0x5EED << 64) + i) for i in range(1000)]  # the people a camera keeps seeing


def _event(i: int) -> Any:
    """A match event exactly as /v1/match queues it: 70 % one of 1,000 enrolled people, 30 % unknown faces."""
    from appliance.audit import AuditEvent

    known = i % 10 < 7
    return AuditEvent(
        "match", "apikey:00000000-0000-4000-8000-00000000b0b0", outcome="match" if known else "unknown",
        subject_id=ENROLLED[(i * 7919) % len(ENROLLED)] if known else None, request_id=uuid.uuid4().hex,
        details={"model": MODEL, "k": 5, "similarity": round(0.95 + (i % 50) / 1000, 4) if known else 0.41,
                 "threshold": 0.94, "camera_id": f"cam-{i % 4}", "track_id": f"t{i // 20}",
                 "index_version": 120_000 + i // 1000, "candidates": 5})


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _postgres_cpu(var_dir: Path) -> float:
    """CPU seconds used so far by this bench stack's PostgreSQL (its postmaster and every child)."""
    import psutil

    total = 0.0
    for p in psutil.process_iter(["cmdline"]):
        cmd = p.info["cmdline"] or []
        if cmd and cmd[0].endswith("postgres") and any(str(var_dir) in c for c in cmd):
            for q in [p, *p.children(recursive=True)]:
                try:
                    t = q.cpu_times()
                    total += t.user + t.system + t.children_user + t.children_system
                except psutil.Error:
                    continue
    return total


def _child_cpu(log: Any) -> float:
    """CPU seconds of the AuditLog's writer process so far (0 in thread mode)."""
    import psutil

    if log.child is None or log.child.pid is None:
        return 0.0
    t = psutil.Process(log.child.pid).cpu_times()
    return float(t.user + t.system)


def _lanes() -> int:
    from appliance.settings import Settings

    return LANES or int(Settings.model_fields["audit_writer_lanes"].default)


def writer_burst(pool: Any, n: int, var_dir: Path, process: bool) -> dict[str, Any]:
    """Submit n events as fast as one thread can; time until all are committed."""
    from appliance.audit.log import BACKPRESSURE, DROPPED, AuditLog

    log = AuditLog(pool, checkpoint_interval=0, writer_process=process, writer_lanes=_lanes())
    log.submit(_event(-1))
    assert log.flush(60)  # the writer (process) is up before the clock starts
    events = [_event(i) for i in range(n)]
    bp0, dropped0 = BACKPRESSURE._value.get(), DROPPED._value.get()
    cpu0, child0, pg0, t0 = _cpu(), _child_cpu(log), _postgres_cpu(var_dir), time.perf_counter()
    for e in events:
        log.submit(e)
    assert log.flush(300)
    dt = time.perf_counter() - t0
    cpu, child, pg = _cpu() - cpu0, _child_cpu(log) - child0, _postgres_cpu(var_dir) - pg0
    log.stop(checkpoint=False)
    dropped = int(DROPPED._value.get() - dropped0)  # queue full for longer than block_seconds
    return {"writer": "process" if process else "thread", "events": n, "seconds": round(dt, 3),
            "events_per_s": round((n - dropped) / dt), "dropped": dropped,
            "api_process_cpu_us_per_event": round(cpu / n * 1e6, 1),
            "writer_process_cpu_us_per_event": round(child / n * 1e6, 1),
            "postgres_cpu_us_per_event": round(pg / n * 1e6, 1),
            "events_per_s_per_2_cores_of_cpu": round(2 * n / (cpu + child + pg)),
            "backpressure_waits": int(BACKPRESSURE._value.get() - bp0)}


class Pacer:
    """Submits ``rate`` events/s to an AuditLog in 10 ms ticks (a thread), counting what it submitted."""

    def __init__(self, log: Any, rate: int) -> None:
        self.log, self.rate = log, rate
        self.stop = threading.Event()
        self.submitted = 0
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        events = [_event(i) for i in range(self.rate // 100)]
        start = time.perf_counter()
        tick = 0
        while not self.stop.is_set():
            for e in events:
                self.log.submit(e)
            self.submitted += len(events)
            tick += 1
            delay = start + tick * 0.01 - time.perf_counter()
            if delay > 0:
                time.sleep(delay)

    def __enter__(self) -> Pacer:
        self.t0 = time.perf_counter()
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()
        self.seconds = time.perf_counter() - self.t0


def writer_paced(pool: Any, rate: int, seconds: float, warmup: float = 2.0) -> dict[str, Any]:
    """Offer ``rate`` events/s for ``seconds``. Sustained = events committed per second between ``warmup``
    and the end of the offer (both ends then carry the same one-batch lag); also the drain afterwards,
    the deepest queue and the back-pressure, which show whether the writer kept up."""
    from appliance.audit.log import BACKPRESSURE, DROPPED, EVENTS, AuditLog

    committed = EVENTS.labels("queue")._value.get
    log = AuditLog(pool, checkpoint_interval=0, writer_process=True, writer_lanes=_lanes())
    bp0, dropped0 = BACKPRESSURE._value.get(), DROPPED._value.get()
    depth, depths = 0, []
    with Pacer(log, rate) as pacer:
        start = time.perf_counter()
        end = start + seconds
        c0 = None
        while (now := time.perf_counter()) < end:
            if c0 is None and now >= start + warmup:
                c0, t_c0 = committed(), now
            depth = max(depth, log.queue_depth)
            depths.append(log.queue_depth)
            time.sleep(0.05)
        c1, t_c1 = committed(), time.perf_counter()
    t0 = time.perf_counter()
    assert log.flush(300)
    drain = time.perf_counter() - t0
    total = pacer.seconds + drain
    log.stop(checkpoint=False)
    assert c0 is not None
    last_half = depths[len(depths) // 2:]
    return {"offered_per_s": rate, "submitted": pacer.submitted,
            "offered_actual_per_s": round(pacer.submitted / pacer.seconds),
            "sustained_committed_per_s": round((c1 - c0) / (t_c1 - t_c0)),
            "committed_per_s_including_drain": round(pacer.submitted / total),
            "drain_after_stop_s": round(drain, 3), "max_queue_depth": depth,
            "mean_queue_depth_last_half": round(sum(last_half) / max(1, len(last_half))),
            "backpressure_waits": int(BACKPRESSURE._value.get() - bp0),
            "dropped": int(DROPPED._value.get() - dropped0)}


class _NullLog:
    """The Pacer's target for the null_pacer peer: accepts events and forgets them."""

    def submit(self, event: Any) -> None:
        return None


def _client(port: int, token: str, seconds: float, probe: list[float], rate: float) -> None:
    """Latency client (run as a subprocess): sequential keep-alive POST /v1/match, back to back
    (``rate`` 0) or one every 1/``rate`` s like a camera pipeline; prints ms per call."""
    body = json.dumps({"model": MODEL, "embedding": probe, "k": 5}).encode()
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    out = []
    start = time.perf_counter()
    end = start + seconds
    while time.perf_counter() < end:
        if rate:
            due = start + len(out) / rate
            if (wait := due - time.perf_counter()) > 0:
                time.sleep(wait)
        t = time.perf_counter()
        conn.request("POST", "/v1/match", body=body, headers=headers)
        resp = conn.getresponse()
        resp.read()
        out.append((time.perf_counter() - t) * 1000)
        if resp.status != 200:
            raise SystemExit(f"match returned {resp.status}")
    print(json.dumps(out))


def match_latency(settings: Any, stack: Any, seconds: float, rounds: int, rates: list[int],
                  client_rate: float, loads: frozenset[str] = frozenset(LOADS)) -> dict[str, Any]:
    import numpy as np
    import uvicorn

    from appliance.api.app import create_app
    from appliance.audit.log import audit_log

    app = create_app(settings)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, access_log=False))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    state = app.state.appliance
    assert state.extras["matcher"].wait_ready(300)
    admin = api_key(stack, ["admin"], "bench-audit-admin")
    data = np.load(DATA)
    vectors, labels = data["vectors"].astype(np.float32), data["labels"]
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    hdr = {"Authorization": f"Bearer {admin}", "Content-Type": "application/json"}
    for person in np.unique(labels):
        conn.request("POST", "/v1/subjects", body=json.dumps({"label": str(person)}), headers=hdr)
        sid = json.loads(conn.getresponse().read())["id"]
        conn.request("POST", f"/v1/subjects/{sid}/encodings", headers=hdr,
                     body=json.dumps({"model": MODEL, "vectors": vectors[labels == person].tolist()}))
        conn.getresponse().read()
    time.sleep(1.0)  # the feed reaches the hot index
    token = api_key(stack, ["match"], "bench-audit-match")
    probe = vectors[0].tolist()

    def run_client(rate: float = 0.0) -> list[float]:
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
        proc = subprocess.run([sys.executable, __file__, "--client", str(port), token, str(seconds), json.dumps(probe),
                               str(rate)],
                              capture_output=True, text=True, env=env, timeout=seconds + 120)
        if proc.returncode:
            raise RuntimeError(proc.stderr[-2000:])
        return json.loads(proc.stdout)  # type: ignore[no-any-return]

    run_client()  # warm-up
    log = audit_log(state)

    def stats(xs: list[float]) -> dict[str, float]:
        return {"n": len(xs), "p50_ms": round(pct(xs, 50), 3), "p99_ms": round(pct(xs, 99), 3),
                "mean_ms": round(float(np.mean(xs)), 3)}

    def compare(rate: int, load: str, client: float = 0.0) -> dict[str, Any]:
        """Alternate phases without and with ``rate`` extra audit events/s (``load``: in this process or
        another), or with the ``cpu_burn`` peer; the match client back to back (``client`` 0) or paced."""
        base: list[float] = []
        loaded: list[float] = []
        offered = []
        ratios = []  # per round: loaded p99 / unloaded p99 of the phases just before and after each other
        for _ in range(rounds):
            b_round = run_client(client)
            base += b_round
            n_loaded = len(loaded)
            if load == "cpu_burn":
                proc = subprocess.Popen([sys.executable, "-c", _BURN])
                time.sleep(0.5)
                loaded += run_client(client)
                proc.kill()
                proc.wait()
                offered.append(0.0)
            elif load == "other_process":
                env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
                proc = subprocess.Popen([sys.executable, __file__, "--load", settings.database_url.get_secret_value(),
                                         str(rate)], env=env, stdout=subprocess.PIPE, text=True)
                time.sleep(1.0)
                loaded += run_client(client)
                proc.terminate()
                offered.append(float((proc.communicate(timeout=60)[0].strip().splitlines() or ["0"])[-1]))
            else:
                with Pacer(_NullLog() if load == "null_pacer" else log, rate) as pacer:
                    loaded += run_client(client)
                offered.append(pacer.submitted / pacer.seconds)
            ratios.append(pct(loaded[n_loaded:], 99) / pct(b_round, 99))
        assert log.flush(120)
        b, lo = stats(base), stats(loaded)
        return {"without_audit_load": b, "with_audit_load": lo,
                "audit_load_events_per_s": round(float(np.mean(offered))),
                "p99_increase_pct": round((lo["p99_ms"] / b["p99_ms"] - 1) * 100, 1),
                "p99_increase_pct_median_of_rounds": round((float(np.median(ratios)) - 1) * 100, 1),
                "p99_increase_pct_by_round": [round((r - 1) * 100, 1) for r in ratios],
                "p50_increase_pct": round((lo["p50_ms"] / b["p50_ms"] - 1) * 100, 1)}

    out: dict[str, Any] = {"note": "every match also submits its own audit event in all phases; "
                                   "in_process = the load shares the API process (its GIL), "
                                   "other_process = the same load written by another process (CPU only), "
                                   "null_pacer = the in-process load generator submitting to nothing, "
                                   "cpu_burn = the peer: one core of pure CPU at idle priority, no audit load"}
    # (key, load, rate, client pace): in_process = 20k and 2k events/s; paced = the client at a camera
    # pipeline's pace rather than a saturating loop, so the two cores are not also busy with the client
    # and a back-to-back server; null_pacer = the in-process generator alone (what the apparatus costs);
    # cpu_burn = what any background work of that size costs the match p99 on this machine, audit or not
    top, paced = rates[0], [client_rate] if client_rate else []
    plan = {
        "in_process": [(f"in_process_{rate}", "in_process", rate, 0.0) for rate in rates],
        "paced_client": [(f"in_process_{top}_paced_client", "in_process", top, p) for p in paced],
        "other_process": [(f"other_process_{top}", "other_process", top, 0.0)],
        "other_process_paced": [(f"other_process_{top}_paced_client", "other_process", top, p) for p in paced],
        "null_pacer": [(f"null_pacer_peer_{top}", "null_pacer", top, 0.0)],
        "cpu_burn": [("cpu_burn_peer", "cpu_burn", 0, 0.0)],
    }
    for name in LOADS:
        for key, load, rate, pace in plan[name] if name in loads else []:
            out[key] = compare(rate, load, client=pace)
            if pace:
                out[key]["client_requests_per_s"] = pace
            print(key, out[key], flush=True)
    server.should_exit = True
    thread.join(60)
    return out


# The interference peer: one core of SHA-256 at SCHED_IDLE, the lowest CPU priority Linux has, so any
# p99 rise it causes is the machine's (caches, memory, the hypervisor), not the scheduler's.
_BURN = ("import hashlib, os\nos.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))\n"
         "b = os.urandom(1 << 16)\nwhile True:\n    hashlib.sha256(b).digest()\n")


def _load_process(dsn: str, rate: int) -> None:
    """Run as a subprocess: offer ``rate`` events/s through its own AuditLog until SIGTERM; print the rate."""
    import signal

    from psycopg_pool import ConnectionPool

    from appliance.audit.log import AuditLog

    pool = ConnectionPool(dsn, min_size=1, max_size=2, open=True)
    log = AuditLog(pool, checkpoint_interval=0, writer_process=True, writer_lanes=_lanes())
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    with Pacer(log, rate) as pacer:
        done.wait()
    log.stop(checkpoint=False)  # its writer process commits what it holds and exits
    print(round(pacer.submitted / pacer.seconds), flush=True)
    os._exit(0)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--load":
        _load_process(sys.argv[2], int(sys.argv[3]))
        return
    if len(sys.argv) > 1 and sys.argv[1] == "--client":
        _client(int(sys.argv[2]), sys.argv[3], float(sys.argv[4]), json.loads(sys.argv[5]), float(sys.argv[6]))
        return
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--rounds", type=int, default=6, help="alternations of unloaded and loaded match phases")
    ap.add_argument("--phase-seconds", type=float, default=4.0,
                    help="length of each match phase: short phases, many rounds, so drift hits both sides alike")
    ap.add_argument("--rate", type=int, default=20_000)
    ap.add_argument("--burst", type=int, default=200_000)
    ap.add_argument("--skip-match", action="store_true")
    ap.add_argument("--client-rate", type=float, default=200.0,
                    help="also measure with the match client paced at this many requests/s (0: skip)")
    ap.add_argument("--skip-writer", action="store_true")
    ap.add_argument("--loads", default=",".join(LOADS),
                    help=f"which match comparisons to run, comma-separated (default all: {','.join(LOADS)})")
    args = ap.parse_args()
    from appliance.db.pool import open_pool

    stack = start_stack("bench-audit")
    settings = settings_of(stack)
    result: dict[str, Any] = {"cpus": os.cpu_count(), "load_avg_at_start": os.getloadavg(), "writer_lanes": _lanes()}
    try:
        pool = open_pool(settings, wait=True)
        with pool.connection() as conn:  # the writer's cost grows with the indexes it appends to
            result["match_partition_rows_at_start"] = int(conn.execute(
                "SELECT coalesce(sum(greatest(reltuples, 0)), 0) FROM pg_class "
                "WHERE relkind = 'r' AND relname LIKE 'audit\\_log\\_%\\_match'").fetchone()[0])
        if not args.skip_writer:
            result["writer_burst"] = writer_burst(pool, args.burst, Path(stack.var_dir), process=True)
            print("burst", result["writer_burst"], flush=True)
            result["writer_burst_thread"] = writer_burst(pool, args.burst, Path(stack.var_dir), process=False)
            print("burst (thread writer)", result["writer_burst_thread"], flush=True)
            result["writer_paced"] = writer_paced(pool, args.rate, args.seconds * 2)
            print("paced", result["writer_paced"], flush=True)
            result["writer_paced_headroom"] = writer_paced(pool, args.rate * 5 // 4, args.seconds * 2)
            print("paced at 1.25x", result["writer_paced_headroom"], flush=True)
        pool.close()
        if not args.skip_match:
            rates = [args.rate, args.rate // 10]
            loads = frozenset(args.loads.split(","))
            if unknown := loads - set(LOADS):
                ap.error(f"unknown --loads {sorted(unknown)}; choose from {', '.join(LOADS)}")
            result["match"] = match_latency(settings, stack, args.phase_seconds, args.rounds, rates, args.client_rate,
                                            loads)
            print("match", result["match"], flush=True)
    finally:
        result["load_avg_at_end"] = os.getloadavg()
        stack.down()
    print(write_result("audit", result))


if __name__ == "__main__":
    main()
