"""Match latency, throughput and recall of /v1/match against its peers, measured in the same run.

For each scale: clustered synthetic identities (10 samples each) are enrolled through the same code as
POST /v1/encodings:bulk, `appliance serve` warms its hot index, then:
  ours      POST /v1/match (raw float32 body, keep-alive) at concurrency 1 and 8
  pgvector  the same protected queries as HNSW SQL through psycopg (ef_search raised until recall@1 >= 0.99)
  faiss     raw FAISS in-process on the same templates (the floor)
Recall@1/@10 are against exact search over the raw vectors (per subject). Also: RSS, warm-up time from
PostgreSQL, restart-to-ready from the sealed snapshot. Writes bench/results/match[_<n>].json.

Usage: python bench/match.py [--n 100000] [--queries 1000] [--duration 5] [--workers 1]
       python bench/match.py --n 1000000      (slow: loads 1M encodings once into var/bench-match-1000000)
       python bench/match.py --n 10000 --track-frames 5   (also: frames with a track_id against frames without)
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (
    MODEL,
    RawClient,
    Server,
    api_key,
    identities,
    pct,
    probes,
    request,
    settings_of,
    start_stack,
    write_result,
    wrk_available,
    wrk_run,
)


def load(stack: Any, vectors: np.ndarray, ident: np.ndarray, tag: str) -> dict[str, float]:
    """Enrol whatever is missing through the bulk-enrolment code (in-process: no HTTP for 1M rows)."""
    from appliance.bulk_enrolment import BulkEnrolment
    from appliance.state import AppState

    state = AppState.build(settings_of(stack))
    job = BulkEnrolment(state, f"{tag}-load", "bench", None, chunk_size=5000)
    job.begin()
    started = time.perf_counter()
    for i in range(job.lines_done, len(vectors)):
        line = json.dumps({"external_ref": f"{tag}-{int(ident[i])}", "model": MODEL,
                           "vector": vectors[i].tolist()}).encode()
        job._seen = i  # lines before lines_done are already committed
        if job.add_line(line):
            job.flush()
            print(f"  loaded {job.lines_done}/{len(vectors)}", end="\r", flush=True)
    job.finish()
    seconds = time.perf_counter() - started
    state.close()
    return {"enrolled_now": job.enrolled, "seconds": round(seconds, 1)}


def direct_load(stack: Any, vectors: np.ndarray, ident: np.ndarray,
                tag: str) -> tuple[dict[str, Any], dict[Any, int]]:
    """``--direct-load``: subjects and encodings written straight into PostgreSQL with binary COPY (minutes
    at 1M instead of the ~1 h bulk enrolment takes), for benchmarks of matching only. Templates are protected
    with the model's template key exactly as enrolment does; ``raw_sealed`` holds each raw vector sealed
    with a DEK that is then thrown away (nothing can decrypt it: these rows cannot be re-protected by a
    template-key rotation). No subject DEKs, external references or enrolment audit records. Returns the
    load figures and subject id -> identity."""
    import psycopg
    from pgvector.psycopg import register_vector

    from appliance.state import AppState
    from crypto.seal import new_dek, seal
    from vector.store import allocate_labels
    from vector.templates import TemplateKeys

    settings = settings_of(stack)
    n_ids = int(ident.max()) + 1
    sids = [uuid.uuid5(uuid.NAMESPACE_URL, f"bench:{tag}:{i}") for i in range(n_ids)]
    started = time.perf_counter()
    state = AppState.build(settings)
    enrolled = 0
    with psycopg.connect(settings.database_admin_url.get_secret_value()) as conn:
        register_vector(conn)
        keys = TemplateKeys(state.keys)
        version = keys.ensure_model(conn, MODEL, vectors.shape[1])
        have = conn.execute("SELECT count(*) FROM encodings WHERE model = %s", (MODEL,)).fetchone()[0]  # type: ignore[index]
        if have < len(vectors):
            assert have == 0, f"{have} encodings already there: start from an empty stack"
            key = keys.get(conn, MODEL, version)
            dek = new_dek()
            with conn.transaction():
                with conn.cursor() as cur, cur.copy("COPY subjects (id) FROM STDIN") as copy:
                    for sid in sids:
                        copy.write_row((sid,))
                labels = allocate_labels(conn, len(vectors))
                step = 50_000
                with conn.cursor() as cur, cur.copy("COPY encodings (id, label, subject_id, model, template_version, "
                                                    "raw_sealed, template) FROM STDIN (FORMAT BINARY)") as copy:
                    copy.set_types(["uuid", "int8", "uuid", "text", "int4", "bytea", "vector"])
                    for start in range(0, len(vectors), step):
                        part = vectors[start : start + step]
                        templates = key.protect(part)
                        for i in range(len(part)):
                            row = start + i
                            enc = uuid.uuid4()
                            copy.write_row((enc, int(labels[row]), sids[int(ident[row])], MODEL, version,
                                            seal(dek, part[i].tobytes(), enc.bytes), templates[i]))
                        print(f"  loaded {start + len(part)}/{len(vectors)}", end="\r", flush=True)
            enrolled = len(vectors)
        conn.execute("ANALYZE encodings")
    state.close()
    return ({"enrolled_now": enrolled, "seconds": round(time.perf_counter() - started, 1), "method": "direct COPY"},
            {sid: i for i, sid in enumerate(sids)})


def subjects_by_identity(settings: Any, tag: str, identities_n: int) -> dict[Any, int]:
    """Subject id -> identity, found through the blind index as the API finds external refs (never in clear)."""
    import psycopg

    from appliance import clients
    from appliance.blind_index import BlindIndex

    refs = [f"{tag}-{i}" for i in range(identities_n)]
    with psycopg.connect(settings.database_admin_url.get_secret_value()) as conn:
        hashes = BlindIndex(clients.key_provider(settings)).digests(conn, refs)
        by_hash = dict(zip(hashes, range(identities_n), strict=True))
        rows = conn.execute("SELECT external_ref_hash, id FROM subjects WHERE external_ref_hash = ANY(%s)",
                            (hashes,)).fetchall()
        legacy = conn.execute("SELECT external_ref, id FROM subjects WHERE external_ref LIKE %s",
                              (f"{tag}-%",)).fetchall()  # loaded before migration 0008, not yet upgraded
    return {r[1]: by_hash[bytes(r[0])] for r in rows} | {r[1]: int(r[0].rsplit("-", 1)[1]) for r in legacy}


def ensure_pg_hnsw(stack: Any) -> float:
    import psycopg

    from vector.store import ensure_hnsw_index

    started = time.perf_counter()
    with psycopg.connect(settings_of(stack).database_admin_url.get_secret_value(), autocommit=True) as conn:
        conn.execute("SET maintenance_work_mem = '512MB'")
        ensure_hnsw_index(conn, MODEL, 128, m=16, ef_construction=64)
        conn.execute("ANALYZE encodings")
    return round(time.perf_counter() - started, 1)


def exact_top(vectors: np.ndarray, ident: np.ndarray, q: np.ndarray, k: int = 10) -> list[list[int]]:
    """Exact top-k identities per query (best encoding per identity), over the raw normalised vectors."""
    out = []
    step = max(1, 10_000_000 // len(vectors))
    for start in range(0, len(q), step):
        sims = q[start : start + step] @ vectors.T
        top = np.argpartition(-sims, 200, axis=1)[:, :200]
        for row, cand in enumerate(top):
            order = cand[np.argsort(-sims[row, cand])]
            seen: list[int] = []
            for r in order:
                if int(ident[r]) not in seen:
                    seen.append(int(ident[r]))
                if len(seen) == k:
                    break
            out.append(seen)
    return out


def recall(found: list[list[int]], truth: list[list[int]]) -> tuple[float, float]:
    r1 = np.mean([bool(f) and f[0] == t[0] for f, t in zip(found, truth, strict=True)])
    r10 = np.mean([len(set(f[:10]) & set(t[:10])) / 10 for f, t in zip(found, truth, strict=True)])
    return float(r1), float(r10)


def server_cpu(server: Server) -> float:
    """CPU seconds (user + system) used so far by the server and its worker processes."""
    import psutil

    proc = psutil.Process(server.proc.pid)
    return sum(sum(p.cpu_times()[:2]) for p in [proc, *proc.children(recursive=True)])


def api_run(server: Server, q: np.ndarray, to_ident: dict[str, int]) -> tuple[dict[str, float], list[list[int]]]:
    client = RawClient(server.port)
    lat, found = [], []
    reqs = [RawClient.build(f"/v1/match?model={MODEL}&k=10", v.astype("<f4").tobytes(), server.token) for v in q]
    for r in reqs[:50]:  # warm the connection and code paths
        client.send(r)
    cpu0 = server_cpu(server)
    for r in reqs:
        t = time.perf_counter()
        status, body = client.send(r)
        lat.append(time.perf_counter() - t)
        assert status == 200, body
        found.append([to_ident.get(c["subject_id"], -1) for c in json.loads(body)["candidates"]])
    out = _stats(lat)
    out["server_cpu_ms_per_request"] = round((server_cpu(server) - cpu0) / len(reqs) * 1e3, 3)
    return out, found


def api_concurrent(server: Server, q: np.ndarray, threads: int, duration: float) -> dict[str, float]:
    lat: list[float] = []
    lock = threading.Lock()
    stop = time.perf_counter() + duration
    reqs = [RawClient.build(f"/v1/match?model={MODEL}&k=10", v.astype("<f4").tobytes(), server.token) for v in q]

    def worker(offset: int) -> None:
        client = RawClient(server.port)
        mine = []
        i = offset
        while time.perf_counter() < stop:
            t = time.perf_counter()
            status, _ = client.send(reqs[i % len(reqs)])
            if status != 200:  # a second worker still warming: 503, not counted
                time.sleep(0.01)
                continue
            mine.append(time.perf_counter() - t)
            i += threads
        with lock:
            lat.extend(mine)

    ts = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    cpu0 = server_cpu(server)
    started = time.perf_counter()
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    out = _stats(lat)
    out["per_second"] = round(len(lat) / (time.perf_counter() - started), 1)
    out["server_cpu_ms_per_request"] = round((server_cpu(server) - cpu0) / max(1, len(lat)) * 1e3, 3)
    return out


def wrk_concurrent(server: Server, q: np.ndarray, connections: int, duration: float) -> dict[str, float]:
    """The same requests driven by wrk; server CPU per request from the server's own counters."""
    bodies = [v.astype("<f4").tobytes() for v in q]
    cpu0 = server_cpu(server)
    out = wrk_run(server.port, f"/v1/match?model={MODEL}&k=10", bodies, server.token, connections, duration)
    out["server_cpu_ms_per_request"] = round((server_cpu(server) - cpu0) / max(1, out["n"]) * 1e3, 3)
    return out


def track_cost(server: Server, q: np.ndarray, frames: int, block: int = 50) -> dict[str, Any]:
    """Frames without and with a ``track_id`` (``frames`` per track, then a new track), alternated in
    blocks on one connection so drift and other load hit both alike: latency and server CPU per request
    of each, and their ratios (the extra cost of track fusion)."""
    client = RawClient(server.port)
    run = uuid.uuid4().hex[:8]
    path = f"/v1/match?model={MODEL}&k=10"
    reqs = {"plain": [RawClient.build(path, v.astype("<f4").tobytes(), server.token) for v in q],
            "track": [RawClient.build(f"{path}&camera_id=bench&track_id={run}-{i // frames}",
                                      v.astype("<f4").tobytes(), server.token) for i, v in enumerate(q)]}
    status, body = client.send(reqs["track"][0])
    assert status == 200 and json.loads(body)["track"]["frames"] >= 1, body
    for name in reqs:
        for r in reqs[name][:50]:  # warm
            client.send(r)
    lat: dict[str, list[float]] = {"plain": [], "track": []}
    cpu = {"plain": 0.0, "track": 0.0}
    for n, start in enumerate(range(0, len(q), block)):
        for name in ("plain", "track") if n % 2 == 0 else ("track", "plain"):
            cpu0 = server_cpu(server)
            for r in reqs[name][start: start + block]:
                t = time.perf_counter()
                status, body = client.send(r)
                lat[name].append(time.perf_counter() - t)
                assert status == 200, body
            cpu[name] += server_cpu(server) - cpu0
    out: dict[str, Any] = {"frames_per_track": frames}
    for name in lat:
        out[name] = {**_stats(lat[name]), "server_cpu_ms_per_request": round(cpu[name] / len(lat[name]) * 1e3, 3)}
    for stat in ("p50_ms", "p99_ms", "server_cpu_ms_per_request"):
        out[f"ratio_{stat}_track_over_plain"] = round(out["track"][stat] / out["plain"][stat], 3)
    return out


class ProbingServer(Server):
    """A first start that is matched against while it warms: until ``/v1/index`` says ready, one match
    request after another (sequential, raw float32), recording which path answered and how fast."""

    def __init__(self, stack: Any, token: str, q: np.ndarray, to_ident: dict[str, int], truth: list[list[int]],
                 workers: int = 1) -> None:
        self.q, self.to_ident, self.truth = q, to_ident, truth
        self.cold: dict[str, Any] = {}
        super().__init__(stack, token, workers=workers)

    def wait_ready(self, started: float, timeout: float = 1800) -> float:
        lat: list[float] = []
        statuses: dict[str, int] = {}
        found, truth = [], []
        first_answer = None
        client: RawClient | None = None
        i = 0
        while time.perf_counter() - started < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}")
            try:
                if self.index_ready():
                    break
                client = client or RawClient(self.port)
                j = i % len(self.q)
                req = RawClient.build(f"/v1/match?model={MODEL}&k=10", self.q[j].astype("<f4").tobytes(), self.token)
                t = time.perf_counter()
                status, body = client.send(req)
                took = time.perf_counter() - t
                i += 1
            except OSError:  # not listening yet
                client = None
                time.sleep(0.05)
                continue
            path = json.loads(body).get("path", "?") if status == 200 else str(status)
            statuses[path] = statuses.get(path, 0) + 1
            if status == 200 and path == "cold":
                lat.append(took)
                first_answer = first_answer if first_answer is not None else time.perf_counter() - started
                found.append([self.to_ident.get(c["subject_id"], -1) for c in json.loads(body)["candidates"]])
                truth.append(self.truth[j])
            elif status != 200:
                time.sleep(0.05)
        else:
            raise TimeoutError("server not ready")
        ready = time.perf_counter() - started
        self.cold = {**_stats(lat), "answers": statuses, "first_cold_answer_seconds":
                     round(first_answer, 2) if first_answer is not None else None,
                     "load_generator": "python, sequential, during the first start"}
        if found:
            self.cold["recall_at_1"], self.cold["recall_at_10"] = recall(found, truth)
        return ready


def _stats(lat: list[float]) -> dict[str, float]:
    return {"n": len(lat), "p50_ms": round(pct(lat, 50) * 1e3, 3), "p99_ms": round(pct(lat, 99) * 1e3, 3),
            "per_second": round(len(lat) / sum(lat), 1) if lat else 0.0}


def protected_queries(stack: Any, q: np.ndarray) -> np.ndarray:
    from appliance.state import AppState
    from vector.store import feed_position
    from vector.templates import TemplateKeys

    state = AppState.build(settings_of(stack))
    with state.pool.connection() as conn:
        _, version = feed_position(conn, MODEL)  # type: ignore[misc]
        key = TemplateKeys(state.keys).get(conn, MODEL, version)
    state.close()
    return key.protect(q)


def pgvector_run(stack: Any, pq: np.ndarray, truth: list[list[int]], sid_ident: dict[uuid.UUID, int]
                 ) -> dict[str, Any]:
    import psycopg
    from pgvector.psycopg import register_vector

    from vector.store import search

    with psycopg.connect(settings_of(stack).database_url.get_secret_value()) as conn:
        register_vector(conn)
        chosen, r1 = 40, 0.0
        for ef in (40, 80, 160, 320, 640):
            found = [[sid_ident[r[1]] for r in search(conn, MODEL, 128, v, 40, ef)] for v in pq[:200]]
            r1 = float(np.mean([f[0] == t[0] for f, t in zip(found, truth[:200], strict=True)]))
            chosen = ef
            if r1 >= 0.99:
                break
        lat, found = [], []
        for v in pq:
            t = time.perf_counter()
            rows = search(conn, MODEL, 128, v, 40, chosen)
            lat.append(time.perf_counter() - t)
            found.append(_dedupe([sid_ident[r[1]] for r in rows]))
    out: dict[str, Any] = _stats(lat)
    out["ef_search"] = chosen
    out["recall_at_1"], out["recall_at_10"] = recall(found, truth)
    return out


def _dedupe(xs: list[int]) -> list[int]:
    seen: list[int] = []
    for x in xs:
        if x not in seen:
            seen.append(x)
    return seen


def faiss_run(stack: Any, pq: np.ndarray, truth: list[list[int]], sid_ident: dict[uuid.UUID, int],
              params: Any) -> dict[str, Any]:
    import faiss
    import psycopg
    from pgvector.psycopg import register_vector

    from appliance.state import AppState
    from vector import snapshot
    from vector.index import HotIndex
    from vector.store import feed_position, hnsw_index_name, load_templates

    settings = settings_of(stack)
    snap = Path(settings.var_dir) / "index" / f"{hnsw_index_name(MODEL)}.snap"
    if snap.exists():  # the server's own index: no second HNSW build (minutes at 1M)
        state = AppState.build(settings)
        index, _ = snapshot.load(snap, state.keys, params)
        state.close()
        subjects = index._subjects[: index._n]
    else:
        with psycopg.connect(settings.database_admin_url.get_secret_value()) as conn:
            register_vector(conn)
            _, version = feed_position(conn, MODEL)  # type: ignore[misc]
            batch = load_templates(conn, MODEL, 128, version)
        faiss.omp_set_num_threads(2)
        index = HotIndex.build(128, batch, params)
        subjects = batch.subjects
    faiss.omp_set_num_threads(1)
    raw = index._faiss
    subj = [sid_ident[uuid.UUID(bytes=s.tobytes())] for s in subjects]
    lat, found = [], []
    hp = faiss.SearchParametersHNSW() if index.kind == "hnsw" else None
    if hp is not None:
        hp.efSearch = index.ef_search  # the breadth the server measured (kept in its snapshot)
    for v in pq:
        t = time.perf_counter()
        _, pos = raw.search(v[None, :], 40, params=hp)
        lat.append(time.perf_counter() - t)
        found.append(_dedupe([subj[p] for p in pos[0] if p >= 0]))
    out: dict[str, Any] = _stats(lat)
    out["kind"] = index.kind
    out["recall_at_1"], out["recall_at_10"] = recall(found, truth)
    out["index_bytes"] = index.memory_bytes()
    return out


def run_scale(n: int, n_queries: int, duration: float, workers: int, skip_pgvector: bool = False,
              keep_snapshot: bool = False, track_frames: int = 0, direct: bool = False) -> dict[str, Any]:

    from appliance.matching import ServiceConfig

    tag = f"m{n}"
    stack = start_stack(f"bench-match-{n}" + ("-direct" if direct else ""))
    settings = settings_of(stack)
    vectors, ident, centres = identities(n)
    print(f"[{n}] loading")
    if direct:
        loaded, sid_ident = direct_load(stack, vectors, ident, tag)
    else:
        loaded = load(stack, vectors, ident, tag)
    pg_index_s = None if skip_pgvector else ensure_pg_hnsw(stack)
    if not direct:
        sid_ident = subjects_by_identity(settings, tag, int(ident.max()) + 1)
    to_ident = {str(k): v for k, v in sid_ident.items()}
    q, _who = probes(centres, n_queries)
    truth = exact_top(vectors, ident, q)
    token = api_key(stack, ["match"], "bench-match")
    print(f"[{n}] first start" + (" (from the snapshot)" if keep_snapshot else " (warm from PostgreSQL)"))
    if not keep_snapshot:
        for old in (Path(settings.var_dir) / "index").glob("*.snap"):
            old.unlink()  # measure a real warm-up from PostgreSQL
    server = ProbingServer(stack, token, q, to_ident, truth, workers=workers)
    try:
        cold_s = server.ready_seconds
        cold_path = server.cold
        status = json.loads(request(server.conn(), "GET", "/v1/index", None, token)[1])
        c1, found = api_run(server, q, to_ident)
        c1["recall_at_1"], c1["recall_at_10"] = recall(found, truth)
        c1["load_generator"] = "python, sequential"
        tracks = {}
        if track_frames:
            print(f"[{n}] frames with and without track_id ({workers} worker(s))")
            tracks[f"{workers}worker"] = track_cost(server, q, track_frames)
        print(f"[{n}] concurrency 8")
        c8 = api_concurrent(server, q, 8, duration)
        c8["workers"], c8["load_generator"] = workers, "python, 8 threads"
        wrk = {}
        if wrk_available():
            wrk["c1"] = wrk_concurrent(server, q, 1, duration)
            wrk["c8"] = wrk_concurrent(server, q, 8, duration)
            for v in wrk.values():
                v["workers"] = workers
        rss = server.rss_bytes()
    finally:
        server.stop()  # SIGTERM: saves the sealed snapshot
    print(f"[{n}] restart from snapshot")
    server = Server(stack, token, workers=workers)
    try:
        restart_s = server.ready_seconds
        status2 = json.loads(request(server.conn(), "GET", "/v1/index", None, token)[1])
        api_run(server, q[:200], to_ident)
        rss_restart = server.rss_bytes()
    finally:
        server.stop()
    print(f"[{n}] concurrency 8 with 2 uvicorn workers")
    server = Server(stack, token, workers=2)
    try:
        server.wait_all_workers()
        if track_frames:
            print(f"[{n}] frames with and without track_id (2 workers: evidence shared through Redis)")
            tracks["2workers"] = track_cost(server, q, track_frames)
        c8_two = api_concurrent(server, q, 8, duration)
        c8_two["workers"], c8_two["load_generator"] = 2, "python, 8 threads"
        if wrk_available():
            wrk["c8_2workers"] = wrk_concurrent(server, q, 8, duration)
            wrk["c8_2workers"]["workers"] = 2
    finally:
        server.stop()
    pq = protected_queries(stack, q)
    print(f"[{n}] pgvector peer")
    nan = {"p50_ms": float("nan"), "p99_ms": float("nan"), "per_second": 0.0, "skipped": True}
    pg = nan if skip_pgvector else pgvector_run(stack, pq, truth, sid_ident)
    print(f"[{n}] faiss floor")
    fl = faiss_run(stack, pq, truth, sid_ident, ServiceConfig.from_settings(settings).params)
    model_status = status["models"][MODEL]
    import os

    return {
        "loadavg_at_end": [round(x, 2) for x in os.getloadavg()], "cpus": os.cpu_count(),
        "n": n, "dim": 128, "queries": n_queries, "workers": workers, "load": loaded,
        "pg_hnsw_build_seconds": pg_index_s,
        "ours_c1": c1, "ours_c8": c8, "ours_c8_2workers": c8_two, "pgvector_c1": pg, "faiss_c1": fl,
        **{f"ours_{k}_wrk": v for k, v in wrk.items()},
        **({"track_cost": tracks} if tracks else {}),
        "ratio_p50_ours_over_pgvector": round(c1["p50_ms"] / pg["p50_ms"], 3),
        "ratio_p99_ours_over_pgvector": round(c1["p99_ms"] / pg["p99_ms"], 3),
        "ratio_p50_ours_over_faiss": round(c1["p50_ms"] / fl["p50_ms"], 1),
        "best_throughput_c8": max(x["per_second"] for x in (c8, c8_two, *(v for k, v in wrk.items() if "c8" in k))),
        "server_rss_mb": round(rss / 2**20, 1), "hot_index_mb": round(model_status["memory_bytes"] / 2**20, 1),
        "server_rss_after_restart_mb": round(rss_restart / 2**20, 1),
        "ef_search": model_status.get("ef_search"), "ef_search_probe_recall": model_status.get("tuned_recall"),
        "cold_path_during_first_start": cold_path,
        "index_kind": model_status["kind"],
        ("first_start_from_snapshot_seconds" if status["models"][MODEL]["from_snapshot"]
         else "cold_start_ready_seconds"): round(cold_s, 2),
        "restart_ready_seconds": round(restart_s, 2),
        "restart_from_snapshot": status2["models"][MODEL]["from_snapshot"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, action="append", help="encodings (repeatable); default 10000 and 100000")
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--duration", type=float, default=5.0)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--skip-pgvector", action="store_true", help="no pgvector HNSW build/peer (1M: saves ~15 min)")
    ap.add_argument("--track-frames", type=int, default=0,
                    help="also time frames sent with a track_id (N frames per track) against frames without")
    ap.add_argument("--keep-snapshot", action="store_true",
                    help="start from the existing snapshot instead of measuring a cold warm-up (1M: saves ~7 min)")
    ap.add_argument("--direct-load", action="store_true",
                    help="load by COPY straight into PostgreSQL, not through bulk enrolment (1M: minutes, not ~1 h); "
                         "own stack var/bench-match-<n>-direct")
    args = ap.parse_args()
    results = [run_scale(n, args.queries, args.duration, args.workers, args.skip_pgvector, args.keep_snapshot,
                         args.track_frames, args.direct_load) for n in (args.n or [10_000, 100_000])]
    name = "match" if not args.n else "match_" + "_".join(str(n) for n in args.n)
    path = write_result(name, {"results": results})
    print(f"\n{'n':>8} {'path':10} {'p50 ms':>8} {'p99 ms':>8} {'req/s':>8} {'R@1':>6} {'R@10':>6}")
    for r in results:
        for label, key in (("ours c1", "ours_c1"), ("ours c8", "ours_c8"), ("ours c8 w2", "ours_c8_2workers"),
                           ("wrk c1", "ours_c1_wrk"), ("wrk c8", "ours_c8_wrk"), ("wrk c8 w2", "ours_c8_2workers_wrk"),
                           ("pgvector", "pgvector_c1"),
                           ("faiss", "faiss_c1")):
            if key not in r:
                continue
            s = r[key]
            print(f"{r['n']:>8} {label:10} {s['p50_ms']:>8} {s['p99_ms']:>8} {s['per_second']:>8} "
                  f"{s.get('recall_at_1', ''):>6} {s.get('recall_at_10', ''):>6}")
        for where, t in r.get("track_cost", {}).items():
            print(f"{'':>8} track_id ({where}, {t['frames_per_track']} frames/track) / none: p50 "
                  f"{t['ratio_p50_ms_track_over_plain']}x, p99 {t['ratio_p99_ms_track_over_plain']}x, server CPU "
                  f"{t['ratio_server_cpu_ms_per_request_track_over_plain']}x "
                  f"({t['track']['server_cpu_ms_per_request']} vs {t['plain']['server_cpu_ms_per_request']} ms)")
        cold = r.get("cold_path_during_first_start") or {}
        if cold.get("n"):
            print(f"{'':>8} cold path while warming: {cold['n']} answers, p50 {cold['p50_ms']} ms, "
                  f"p99 {cold['p99_ms']} ms, R@1 {cold.get('recall_at_1')}, first after "
                  f"{cold['first_cold_answer_seconds']} s; {cold['answers']}")
        print(f"{'':>8} ef_search {r.get('ef_search')}, rss after restart from snapshot "
              f"{r['server_rss_after_restart_mb']} MB")
        first = r.get("cold_start_ready_seconds", r.get("first_start_from_snapshot_seconds"))
        print(f"{'':>8} rss {r['server_rss_mb']} MB, index {r['hot_index_mb']} MB ({r['index_kind']}), first start "
              f"{first} s, restart {r['restart_ready_seconds']} s")
    print(f"-> {path}")


if __name__ == "__main__":
    main()
