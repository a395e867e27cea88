"""Audit benchmark: sustained events/s of the batched writer, and /v1/match latency with and without
20,000 audit events/s flowing through the same process's AuditLog (same run, interleaved phases).

    .venv/bin/python bench/audit.py [--seconds 8] [--rounds 40] [--phase-seconds 0.5] [--repeat 3]
                                    [--rate 20000] [--loads in_process,other_process,...]

Writes bench/results/audit.json. The API runs in this process (uvicorn in a thread). The headline
load is submitted on the API's own event loop, where /v1/match submits each match's event, so it
shares the GIL and CPU as match-path events do; variants submit it from another thread of the API
process, or from another process, and two peers show what the apparatus and any background CPU cost.

The latency client is a separate process with one keep-alive connection and a prepared request,
timing sequential calls back to back, and (``--client-rate``, default 200/s) paced like a camera
pipeline. It runs throughout a comparison while the load is switched on and off every
``--phase-seconds`` in ABBA order; each call counts for the phase it started in. On this shared VM the
p99 of a sub-millisecond call drifts by tens of percent within minutes, so short interleaved phases (drift
falls on both sides alike) and ``--repeat`` runs, reported one by one with their median, replace long
single phases.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http.client
import json
import os
import resource
import signal
import socket
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
TICK = float(os.environ.get("BENCH_AUDIT_TICK", "0.001"))  # s between a pacer's submissions
SETTLE = 0.15  # s after switching the load on or off during which match calls count for neither side
LOADS = ("in_process", "paced_client", "in_process_thread", "other_process", "other_process_paced", "null_pacer",
         "null_pacer_paced", "cpu_burn", "cpu_burn_paced")
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
    """Submits ``rate`` events/s to an AuditLog every TICK from a thread, counting what it submitted.

    ``active`` pauses and resumes it (the match comparison toggles the load; paused, it still wakes every
    TICK, so both phases carry the same apparatus); a pause or a stall is never made up for with a
    burst: the schedule restarts."""

    def __init__(self, log: Any, rate: int) -> None:
        self.log, self.rate = log, rate
        self.stop = threading.Event()
        self.active = threading.Event()
        self.active.set()
        self.submitted = 0
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        events = [_event(i) for i in range(max(1, round(self.rate * TICK)))]
        start, tick = time.perf_counter(), 0
        while not self.stop.is_set():
            if not self.active.is_set():  # paused: keep the same wake-ups, submit nothing
                time.sleep(TICK)
                start, tick = time.perf_counter(), 0
                continue
            for e in events:
                self.log.submit(e)
            self.submitted += len(events)
            tick += 1
            delay = start + tick * TICK - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            elif delay < -0.05:  # stalled (stopped, or starved): restart the schedule rather than catch up
                start, tick = time.perf_counter(), 0

    def __enter__(self) -> Pacer:
        self.t0 = time.perf_counter()
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()
        self.seconds = time.perf_counter() - self.t0


class LoopPacer:
    """Submits ``rate`` events/s from the API server's own event loop, where ``/v1/match`` submits each
    match's event: every TICK the events then due run as one callback between requests, as other
    requests' events would. Pacer's ``active``, ``submitted`` and context use, no ``seconds``."""

    def __init__(self, loop: asyncio.AbstractEventLoop, log: Any, rate: int) -> None:
        self.loop, self.log, self.rate = loop, log, rate
        self.active = threading.Event()
        self.active.set()
        self.submitted = 0
        self._events = [_event(i) for i in range(max(1, round(rate * TICK)) * 4)]
        self._stopped = False
        self._start = 0.0
        self._since = 0  # submitted since the schedule (re)started

    def _tick(self) -> None:
        if self._stopped:
            return
        now = self.loop.time()
        if not self.active.is_set():
            self._start, self._since = now, 0
        else:
            due = int((now - self._start) * self.rate) - self._since
            if due > self.rate * 0.05:  # stalled: restart the schedule rather than catch up
                self._start, self._since, due = now, 0, 0
            due = min(due, len(self._events))
            for e in self._events[:due]:
                self.log.submit(e)
            self._since += max(0, due)
            self.submitted += max(0, due)
        self.loop.call_at(now + TICK, self._tick)

    def __enter__(self) -> LoopPacer:
        self.loop.call_soon_threadsafe(self._begin)
        return self

    def _begin(self) -> None:
        self._start, self._since = self.loop.time(), 0
        self._tick()

    def __exit__(self, *exc: object) -> None:
        done = threading.Event()
        self.loop.call_soon_threadsafe(lambda: (setattr(self, "_stopped", True), done.set()))
        done.wait(10)


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
    (``rate`` 0) or one every 1/``rate`` s like a camera pipeline, for ``seconds`` after a first call;
    prints "ready" after that call, then one JSON list of [start (perf_counter: CLOCK_MONOTONIC, the
    same clock as the controller's), ms] per call."""
    body = json.dumps({"model": MODEL, "embedding": probe, "k": 5}).encode()
    request = (f"POST /v1/match HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {token}\r\n"
               f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    out: list[tuple[float, float]] = []

    def more(data: bytes) -> bytes:
        if not (chunk := sock.recv(65536)):
            raise SystemExit("server closed the connection")
        return data + chunk

    def call() -> None:
        # One prepared request, one send, a minimal reader: http.client's per-call parsing would cost
        # the client ~0.1 ms of the very CPU the server and the writer are measured on.
        t = time.perf_counter()
        sock.sendall(request)
        data = b""
        while (head_end := data.find(b"\r\n\r\n")) < 0:
            data = more(data)
        length = int(data[:head_end].lower().split(b"content-length:", 1)[1].split(b"\r\n", 1)[0])
        while len(data) < head_end + 4 + length:
            data = more(data)
        out.append((t, (time.perf_counter() - t) * 1000))
        if not data.startswith(b"HTTP/1.1 200"):
            raise SystemExit(f"match returned {data[:head_end].decode(errors='replace')}")

    call()
    out.clear()
    print("ready", flush=True)
    start = time.perf_counter()
    end = start + seconds
    while time.perf_counter() < end:
        if rate:
            due = start + len(out) / rate
            if (wait := due - time.perf_counter()) > 0:
                time.sleep(wait)
        call()
    print(json.dumps(out))


Halves = tuple[tuple[list[float], list[float]], tuple[list[float], list[float]]]


def split_by_phase(calls: list[tuple[float, float]], switches: list[tuple[float, bool]], end: float,
                   settle: float) -> tuple[list[float], list[float], Halves]:
    """Latencies of ``calls`` ([start, ms]) without and with the load, by the phase each started in.

    ``switches`` are [time, load on?] in time order, the first one the start of the measurement; calls
    before it, from ``end`` on, or within ``settle`` s after a switch count for neither side. Also the
    same split for the first and the second half of the time, as ((base, loaded), (base, loaded))."""
    base: list[float] = []
    loaded: list[float] = []
    halves: Halves = (([], []), ([], []))
    t0 = switches[0][0]
    middle = (t0 + end) / 2
    i = 0
    for t, ms in sorted(calls):
        while i + 1 < len(switches) and switches[i + 1][0] <= t:
            i += 1
        if t < t0 or t >= end or t - switches[i][0] < settle:
            continue
        on = switches[i][1]
        (loaded if on else base).append(ms)
        halves[t >= middle][on].append(ms)
    return base, loaded, halves


def _kill(proc: subprocess.Popen[Any]) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait()


def match_latency(settings: Any, stack: Any, seconds: float, rounds: int, rates: list[int],
                  client_rate: float, loads: frozenset[str] = frozenset(LOADS), repeat: int = 1) -> dict[str, Any]:
    import numpy as np
    import uvicorn

    from appliance.api.app import create_app
    from appliance.audit.log import BACKPRESSURE, DROPPED, audit_log

    app = create_app(settings)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, access_log=False))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    state = app.state.appliance
    loop = server.servers[0].get_loop()
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

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}

    def start_client(rate: float, duration: float) -> subprocess.Popen[str]:
        proc = subprocess.Popen([sys.executable, __file__, "--client", str(port), token, str(duration),
                                 json.dumps(probe), str(rate)], stdout=subprocess.PIPE, text=True, env=env)
        assert proc.stdout is not None
        if proc.stdout.readline().strip() != "ready":
            raise RuntimeError(f"match client failed: exit {proc.wait()}")
        return proc

    def samples_of(proc: subprocess.Popen[str]) -> list[tuple[float, float]]:
        out, _ = proc.communicate(timeout=300)
        if proc.returncode:
            raise RuntimeError(f"match client failed: exit {proc.returncode}")
        return [(t, ms) for t, ms in json.loads(out.strip().splitlines()[-1])]

    samples_of(start_client(0.0, 3.0))  # warm-up
    log = audit_log(state)

    def stats(xs: list[float]) -> dict[str, float]:
        return {"n": len(xs), "p50_ms": round(pct(xs, 50), 3), "p90_ms": round(pct(xs, 90), 3),
                "p99_ms": round(pct(xs, 99), 3), "mean_ms": round(float(np.mean(xs)), 3)}

    def rise(base: list[float], loaded: list[float], p: float) -> float:
        return round((pct(loaded, p) / pct(base, p) - 1) * 100, 1)

    def compare(rate: int, load: str, client: float = 0.0) -> dict[str, Any]:
        """One match client runs throughout while the load (``rate`` extra audit events/s in this process
        or another, or the ``cpu_burn`` peer) is switched on and off every ``seconds`` in ABBA order, so
        that the machine's drift, which here moves the p99 by tens of percent within minutes, falls on
        both sides alike. Each call counts for the phase it started in; calls starting within SETTLE s
        after a switch (the load starting up or draining) count for neither."""
        bp0, dropped0 = BACKPRESSURE._value.get(), DROPPED._value.get()  # this process's submitters only
        with contextlib.ExitStack() as cleanup:  # a failed client must not leave a stopped burner behind
            if load == "cpu_burn":
                proc = subprocess.Popen([sys.executable, "-c", _BURN])
                cleanup.callback(_kill, proc)
                os.kill(proc.pid, signal.SIGSTOP)
            elif load == "other_process":
                proc = subprocess.Popen([sys.executable, __file__, "--load", settings.database_url.get_secret_value(),
                                         str(rate)], env=env, stdout=subprocess.PIPE, text=True)
                cleanup.callback(_kill, proc)
                assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
            else:
                target = _NullLog() if load == "null_pacer" else log
                pacer = Pacer(target, rate) if load == "in_process_thread" else LoopPacer(loop, target, rate)
                pacer.active.clear()
                cleanup.enter_context(pacer)

            def switch(on: bool) -> None:
                if load == "cpu_burn":
                    os.kill(proc.pid, signal.SIGCONT if on else signal.SIGSTOP)
                elif load == "other_process":
                    os.kill(proc.pid, signal.SIGUSR1 if on else signal.SIGUSR2)
                elif on:
                    pacer.active.set()
                else:
                    pacer.active.clear()

            order = [on for r in range(rounds) for on in ((False, True) if r % 2 == 0 else (True, False))]
            client_proc = start_client(client, len(order) * seconds + 0.5)
            cleanup.callback(_kill, client_proc)
            t0 = time.perf_counter() + 0.2
            switches: list[tuple[float, bool]] = [(t0, False)]
            on_seconds = 0.0
            for k, on in enumerate([*order, False]):
                if (delay := t0 + k * seconds - time.perf_counter()) > 0:
                    time.sleep(delay)
                if on != switches[-1][1]:
                    switch(on)
                    now = time.perf_counter()
                    if not on:
                        on_seconds += now - switches[-1][0]
                    switches.append((now, on))
            end = t0 + len(order) * seconds
            calls = samples_of(client_proc)
            if load == "cpu_burn":
                submitted = 0
            elif load == "other_process":
                proc.terminate()
                submitted = int((proc.communicate(timeout=60)[0].strip().splitlines() or ["0"])[-1])
            else:
                submitted = pacer.submitted  # paused since the last switch
        assert log.flush(120)
        base, loaded, halves = split_by_phase(calls, switches, end, SETTLE)
        b, lo = stats(base), stats(loaded)
        return {"without_audit_load": b, "with_audit_load": lo,
                "audit_load_events_per_s": round(submitted / on_seconds) if on_seconds else 0,
                "backpressure_waits": int(BACKPRESSURE._value.get() - bp0),
                "dropped": int(DROPPED._value.get() - dropped0),
                "p99_increase_pct": rise(base, loaded, 99),
                "p99_increase_pct_first_and_second_half": [rise(*halves[0], 99), rise(*halves[1], 99)],
                "p90_increase_pct": rise(base, loaded, 90), "p50_increase_pct": rise(base, loaded, 50)}

    out: dict[str, Any] = {"note": "every match also submits its own audit event in all phases; "
                                   "in_process = the load submitted on the API's event loop between requests, "
                                   "as /v1/match submits its own events; in_process_thread = the same load "
                                   "from a separate thread of the API process (GIL hand-offs on top); "
                                   "other_process = the same load written by another process (CPU only); "
                                   "null_pacer = the event-loop generator submitting to nothing; "
                                   "cpu_burn = the peer: one core of pure CPU at idle priority, no audit load",
                           "tick_s": TICK, "phase_s": seconds, "rounds": rounds, "settle_s": SETTLE}
    # (key, load, rate, client pace): in_process = 20k and 2k events/s; paced = the client at a camera
    # pipeline's pace rather than a saturating loop, so the two cores are not also busy with the client
    # and a back-to-back server; null_pacer = the in-process generator alone (what the apparatus costs);
    # cpu_burn = what any background work of that size costs the match p99 on this machine, audit or not
    top, paced = rates[0], [client_rate] if client_rate else []
    plan = {
        "in_process": [(f"in_process_{rate}", "in_process", rate, 0.0) for rate in rates],
        "paced_client": [(f"in_process_{top}_paced_client", "in_process", top, p) for p in paced],
        "in_process_thread": [(f"in_process_thread_{top}", "in_process_thread", top, 0.0)],
        "other_process": [(f"other_process_{top}", "other_process", top, 0.0)],
        "other_process_paced": [(f"other_process_{top}_paced_client", "other_process", top, p) for p in paced],
        "null_pacer": [(f"null_pacer_peer_{top}", "null_pacer", top, 0.0)],
        "null_pacer_paced": [(f"null_pacer_peer_{top}_paced_client", "null_pacer", top, p) for p in paced],
        "cpu_burn": [("cpu_burn_peer", "cpu_burn", 0, 0.0)],
        "cpu_burn_paced": [("cpu_burn_peer_paced_client", "cpu_burn", 0, p) for p in paced],
    }
    for name in LOADS:
        for key, load, rate, pace in plan[name] if name in loads else []:
            runs = []
            for _ in range(repeat):
                runs.append(compare(rate, load, client=pace))
                print(key, runs[-1], flush=True)
            out[key] = {"client_requests_per_s": pace or "back to back", "runs": runs}
            for stat in ("p99", "p90", "p50"):
                rises = [r[f"{stat}_increase_pct"] for r in runs]
                out[key][f"{stat}_increase_pct_median_of_runs"] = float(np.median(rises))
    server.should_exit = True
    thread.join(60)
    return out


# The interference peer: one core of SHA-256 at SCHED_IDLE, the lowest CPU priority Linux has, so any
# p99 rise it causes is the machine's (caches, memory, the hypervisor), not the scheduler's.
_BURN = ("import hashlib, os\nos.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))\n"
         "b = os.urandom(1 << 16)\nwhile True:\n    hashlib.sha256(b).digest()\n")


def _load_process(dsn: str, rate: int) -> None:
    """Run as a subprocess: an AuditLog with a paused Pacer; "ready" on stdout, then SIGUSR1 offers
    ``rate`` events/s, SIGUSR2 pauses, SIGTERM ends it: prints how many events it submitted."""
    from psycopg_pool import ConnectionPool

    from appliance.audit.log import AuditLog

    pool = ConnectionPool(dsn, min_size=1, max_size=2, open=True)
    log = AuditLog(pool, checkpoint_interval=0, writer_process=True, writer_lanes=_lanes())
    done = threading.Event()
    with Pacer(log, rate) as pacer:
        pacer.active.clear()
        signal.signal(signal.SIGUSR1, lambda *_: pacer.active.set())
        signal.signal(signal.SIGUSR2, lambda *_: pacer.active.clear())
        signal.signal(signal.SIGTERM, lambda *_: done.set())
        print("ready", flush=True)
        while not done.wait(0.1):
            pass
    log.stop(checkpoint=False)  # its writer process commits what it holds and exits
    print(pacer.submitted, flush=True)
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
    ap.add_argument("--rounds", type=int, default=40,
                    help="match comparison: ABBA rounds of one phase without and one with the load")
    ap.add_argument("--phase-seconds", type=float, default=0.5,
                    help="length of each match phase: short phases, many rounds, so drift hits both sides alike")
    ap.add_argument("--repeat", type=int, default=3,
                    help="runs of each match comparison (the p99 of a sub-millisecond call moves with the host)")
    ap.add_argument("--rate", type=int, default=20_000)
    ap.add_argument("--low-rate", type=int, default=2_000, help="in_process also at this rate (0: skip)")
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
            rates = [args.rate, *([args.low_rate] if args.low_rate else [])]
            loads = frozenset(args.loads.split(","))
            if unknown := loads - set(LOADS):
                ap.error(f"unknown --loads {sorted(unknown)}; choose from {', '.join(LOADS)}")
            result["match"] = match_latency(settings, stack, args.phase_seconds, args.rounds, rates, args.client_rate,
                                            loads, args.repeat)
            print("match", result["match"], flush=True)
    finally:
        result["load_avg_at_end"] = os.getloadavg()
        stack.down()
    print(write_result("audit", result))


if __name__ == "__main__":
    main()
