"""A paced match client beside an extra load switched on and off (ABBA), for the benches that ask what
a background writer costs the match path: the baseline without the load comes from the same run.

Used by ``bench/audit.py`` (audit events) and ``bench/visits.py`` (visits): the API runs in the bench's
own process (uvicorn in a thread) so the load can be submitted on its event loop, where /v1/match
submits its own."""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from appliance.stack.process import free_port
from bench.common import MODEL, RawClient, pct

TICK, SETTLE = 0.001, 0.15


def split_by_phase(calls: list[tuple[float, float]], switches: list[tuple[float, bool]], end: float,
                   settle: float) -> tuple[list[float], list[float]]:
    """Latencies of ``calls`` ([start, ms]) without and with the load, by the phase each started in.

    ``switches`` are [time, load on?] in time order, the first one the start of the measurement; calls
    before it, from ``end`` on, or within ``settle`` s after a switch count for neither side."""
    base: list[float] = []
    loaded: list[float] = []
    i = 0
    for t, ms in sorted(calls):
        while i + 1 < len(switches) and switches[i + 1][0] <= t:
            i += 1
        if t < switches[0][0] or t >= end or t - switches[i][0] < settle:
            continue
        (loaded if switches[i][1] else base).append(ms)
    return base, loaded


class LoopPacer:
    """``emit(i)`` called ``rate`` times a second on ``loop`` (1 ms at a time) while ``active`` is set.
    A null pacer passes an ``emit`` that builds what would be submitted and drops it (the apparatus)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, rate: int, emit: Callable[[int], object]) -> None:
        self.rate, self.emit, self.submitted = rate, emit, 0
        self.active = threading.Event()
        self._stop = False
        self._done = asyncio.run_coroutine_threadsafe(self._run(), loop)

    async def _run(self) -> None:
        last, owed = time.perf_counter(), 0.0
        while not self._stop:
            await asyncio.sleep(TICK)
            now = time.perf_counter()
            owed = owed + (now - last) * self.rate if self.active.is_set() else 0.0
            last = now
            while owed >= 1:
                self.emit(self.submitted)
                self.submitted += 1
                owed -= 1

    def close(self) -> None:
        self._stop = True
        self._done.result(10)


def paced_client(port: int, token: str, body: bytes, rate: float, seconds: float, out: Any) -> None:
    """Child process: one keep-alive connection, a call every 1/rate s; puts [(start, ms)]."""
    client = RawClient(port)
    req = RawClient.build(f"/v1/match?model={MODEL}&k=5", body, token)
    for _ in range(50):
        client.send(req)
    out.put("ready")
    calls, due = [], time.perf_counter()
    end = due + seconds
    while due < end:
        if (wait := due - time.perf_counter()) > 0:
            time.sleep(wait)
        t = time.perf_counter()
        status, _ = client.send(req)
        assert status == 200, status
        calls.append((t, (time.perf_counter() - t) * 1e3))
        due += 1 / rate
    out.put(calls)


def in_process_api(settings: Any) -> tuple[Any, Any, asyncio.AbstractEventLoop, int]:
    """The API in this process (uvicorn in a daemon thread), its index warm: (server, state, loop, port)."""
    import uvicorn

    from appliance.api.app import create_app

    app = create_app(settings)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, access_log=False))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    state = app.state.appliance
    assert state.matcher.wait_ready(600)
    return server, state, server.servers[0].get_loop(), port


def abba(port: int, token: str, body: bytes, pacer: LoopPacer, rounds: int, phase: float,
         client_rate: float = 200.0) -> tuple[list[float], list[float], float]:
    """The paced client for ``rounds`` x 2 phases of ``phase`` s, the pacer off/on in ABBA order; returns
    (latencies without the load, with it, seconds the load was on). Closes the pacer."""
    order = [on for r in range(rounds) for on in ((False, True) if r % 2 == 0 else (True, False))]
    out = mp.get_context("spawn").Queue()
    client = mp.get_context("spawn").Process(
        target=paced_client, args=(port, token, body, client_rate, len(order) * phase + 0.5, out))
    client.start()
    assert out.get(timeout=120) == "ready"
    t0 = time.perf_counter() + 0.2
    switches, on_seconds = [(t0, False)], 0.0
    for k, on in enumerate([*order, False]):
        if (delay := t0 + k * phase - time.perf_counter()) > 0:
            time.sleep(delay)
        if on != switches[-1][1]:
            (pacer.active.set if on else pacer.active.clear)()
            now = time.perf_counter()
            on_seconds += 0 if on else now - switches[-1][0]
            switches.append((now, on))
    calls = out.get(timeout=300)
    client.join(30)
    pacer.close()
    base, loaded = split_by_phase(calls, switches, t0 + len(order) * phase, SETTLE)
    return base, loaded, on_seconds


def rises(base: list[float], loaded: list[float], percentiles: tuple[int, ...]) -> dict[str, Any]:
    """Each percentile without and with the load (ms) and its rise in %, and the calls on each side."""
    row: dict[str, Any] = {}
    for p in percentiles:
        row[f"p{p}_ms"] = [round(pct(base, p), 3), round(pct(loaded, p), 3)]
        row[f"p{p}_rise_pct"] = round((pct(loaded, p) / pct(base, p) - 1) * 100, 1)
    row["calls"] = [len(base), len(loaded)]
    return row


def summary(runs: list[dict[str, Any]], null: dict[str, Any], args: Any) -> dict[str, Any]:
    """What both paced benches report: the settings, every run, the null pacer's run, the median p99 rise."""
    median = float(np.median([r["p99_rise_pct"] for r in runs]))
    return {"rate": args.rate, "client_rate": 200, "rounds": args.rounds, "phase_s": args.phase, "runs": runs,
            "null_pacer": null, "p99_rise_median_pct": median}
