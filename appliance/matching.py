"""The per-process index service: owns the hot indexes, warms them, follows the feed, holds tombstones.

Invariant: a label in the tombstone set is never returned by ``match``. Tombstones reach this process
four ways: directly (``tombstone_subject`` in this process), through the feed, and, for a worker whose
feed is behind, through the host's tombstone file (``vector.tombstones``: one ``lseek`` after every
search) and, where several hosts share the database, one Redis ``SMISMEMBER`` over the candidate
labels. While Redis is down matching goes on from memory, and the follower re-syncs from PostgreSQL
once it returns.
The match path itself never touches PostgreSQL, Vault or S3.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import psycopg
import redis
from psycopg_pool import PoolTimeout

from appliance.logs import get_logger
from crypto.template import TemplateKey
from vector import snapshot, store
from vector.errors import IndexNotReady, SnapshotError, UnknownModel
from vector.feed import Feed, FeedMessage
from vector.fusion import FRAME_CANDIDATES, Frame, MemoryTracks, RedisTracks, TrackConfig, TrackDecision, TrackStore
from vector.index import HotIndex, IndexParams, single_threaded_search
from vector.matcher import Candidate, candidates_from_rows, search_candidates
from vector.memory import release_free_heap
from vector.templates import TemplateKeys
from vector.tombstones import LocalTombstones

log = get_logger(__name__)
REDIS_ERRORS = (redis.ConnectionError, redis.TimeoutError)


@dataclass
class ModelIndex:
    """One model's hot index together with the key its templates were protected with (swapped as a pair)."""

    model: str
    dim: int
    version: int
    key: TemplateKey
    index: HotIndex
    applied_seq: int
    saved_seq: int = -1
    from_snapshot: bool = False

    @property
    def index_version(self) -> str:
        return f"{self.version}.{self.applied_seq}"


@dataclass
class MatchResult:
    decision: str  # "match" | "unknown"
    candidates: list[Candidate]
    threshold: float
    index_version: str
    margin: float | None = None  # best similarity minus the best *other* subject's; None with < 2 subjects
    track: TrackDecision | None = None  # the fused track answer; None when the request had no track_id
    path: str = "hot"  # "hot": this process's index; "cold": PostgreSQL, while that index warms

    @property
    def best(self) -> Candidate | None:
        return self.candidates[0] if self.candidates else None


@dataclass
class ServiceConfig:
    params: IndexParams = field(default_factory=IndexParams)
    snapshot_dir: Path | None = None
    snapshot_interval: float = 300.0
    resync_interval: float = 30.0
    oversample: int = 4
    warm_threads: int = 2
    tombstone_file: Path | None = None
    redis_probe: bool = False
    cold_timeout: float = 2.0  # seconds per cold-path query while an index warms; 0: answer 503 instead
    warm_gate: threading.Event | None = None  # tests: warm-up waits for it (to observe the cold path)...
    warm_gate_stage: str = "key"  # ...once the template key is known ("key") or the templates are loaded ("loaded")

    @classmethod
    def from_settings(cls, settings: Any) -> ServiceConfig:
        return cls(
            params=IndexParams(
                exact_max=settings.index_exact_max, hnsw_m=settings.index_hnsw_m,
                ef_construction=settings.index_hnsw_ef_construction, ef_search=settings.index_hnsw_ef_search,
                recall_target=settings.index_hnsw_recall_target,
                rebuild_dead_fraction=settings.index_rebuild_dead_fraction,
            ),
            snapshot_dir=settings.index_snapshot_dir or Path(settings.var_dir) / "index",
            snapshot_interval=settings.index_snapshot_interval,
            resync_interval=settings.index_resync_interval,
            tombstone_file=tombstone_file(settings),
            redis_probe=settings.index_redis_tombstone_probe,
            cold_timeout=settings.index_cold_timeout,
        )


def track_store(settings: Any, client: redis.Redis) -> TrackStore:
    """Where track evidence lives: this process alone, or Redis so that several workers share a track
    (``track_store = "auto"``: Redis when the API runs more than one worker)."""
    config = TrackConfig(window=settings.track_window, min_frames=settings.track_min_frames,
                         idle=settings.track_idle_timeout, max_tracks=settings.track_max_tracks)
    shared = settings.track_store == "redis" or (settings.track_store == "auto" and settings.workers > 1)
    return RedisTracks(client, config) if shared else MemoryTracks(config)


def tombstone_file(settings: Any) -> Path:
    """The host's tombstone file: shared by every worker and CLI process of one installation."""
    return Path(settings.index_tombstone_file or Path(settings.var_dir) / "index" / "tombstones.bin")


class IndexService:
    """Hot indexes of every configured model in this process, kept in step with PostgreSQL."""

    def __init__(self, settings: Any, pool: Any, redis_client: redis.Redis, keys: Any,
                 config: ServiceConfig | None = None) -> None:
        self.settings = settings
        self.pool = pool
        self.feed = Feed(redis_client)
        self.config = config or ServiceConfig.from_settings(settings)
        self._probe = self.feed.probe() if self.config.redis_probe else None
        path = self.config.tombstone_file
        self.local_tombstones = LocalTombstones(path) if path is not None else None
        self._keys = keys  # callable returning the KeyProvider (lazy: Vault may be down at start)
        self.dims = {name: spec.dim for name, spec in settings.models.items()}
        # The threshold each model applies when a request names none: the configured default until an
        # applied calibration replaces it (appliance.calibration.ThresholdRefresher writes here).
        self.thresholds = {name: spec.threshold for name, spec in settings.models.items()}
        # The fused decision of a track has its own (ModelSpec.track_threshold; same refresher).
        self.track_thresholds = {name: spec.fused_threshold for name, spec in settings.models.items()}
        self.on_threshold: Callable[[str], None] | None = None  # a "threshold" feed message arrived
        self.tracks = track_store(settings, redis_client)
        self.models: dict[str, ModelIndex] = {}
        self._cold: dict[str, _Cold] = {}  # what the cold path of each warming model may use
        self.dead: set[int] = set()  # read lock-free on the match path; changed only under _dead_lock
        self._dead_lock = threading.Lock()
        self.template_keys: TemplateKeys | None = None
        self._applied = threading.Condition()  # serialises index changes; notified after each
        self._stream_id: bytes | None = None
        self._redis_down_until = 0.0
        self._needs_resync = threading.Event()
        self._stop = threading.Event()
        self._paused = threading.Event()
        self._idle = threading.Event()  # set by the follower while paused
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None
        self.warm_seconds: float | None = None
        self.last_error: str | None = None

    # --- lifecycle ------------------------------------------------------------------------
    def start(self) -> None:
        """Warm and follow in a background thread; ``match`` answers 503 until a model is warm."""
        faiss.omp_set_num_threads(1)
        self._thread = threading.Thread(target=self._run, name="index-follower", daemon=True)
        self._thread.start()
        # Called before uvicorn listens: wait (at most cold_timeout) for each model's template key, so the
        # cold path answers from the first request instead of 503s while Vault unwraps the seeds.
        deadline = time.monotonic() + self.config.cold_timeout
        while time.monotonic() < deadline and not all(m in self._cold or m in self.models for m in self.dims):
            time.sleep(0.01)

    def stop(self, save: bool = True) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        if save:
            self.save_snapshots()
        if self.local_tombstones is not None:
            self.local_tombstones.close()
            self.local_tombstones = None

    def wait_ready(self, timeout: float) -> bool:
        return self._ready.wait(timeout)

    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    def pause(self, timeout: float = 5.0) -> bool:
        """Stop applying feed messages (tests of a lagging worker); matching goes on. Returns once the
        follower has finished what it was applying (True), so nothing is applied after this call."""
        self._idle.clear()
        self._paused.set()
        return self._idle.wait(timeout)

    def resume(self) -> None:
        self._paused.clear()

    # --- the match path -------------------------------------------------------------------
    def identify(self, model: str, vectors: np.ndarray, k: int, threshold: float | None = None,
                 min_margin: float | None = None, camera_id: str | None = None,
                 track_id: str | None = None) -> list[MatchResult]:
        """``match`` plus what a door decides on: each frame's margin to the runner-up subject (so at
        least 2 subjects are searched), ``min_margin`` (a closer call is "unknown"), and, with a
        ``track_id``, the track's fused answer (fusion sees each frame's top FRAME_CANDIDATES subjects
        whatever ``k``; ``vector.fusion``). Frames of a batch are one track's frames, in order. The fused
        decision applies the model's track threshold; a request's own ``threshold`` wins for both."""
        results = self.match(model, vectors, max(k, FRAME_CANDIDATES if track_id is not None else 2), threshold)
        for r in results:
            c = r.candidates
            if len(c) > 1:
                r.margin = c[0].similarity - c[1].similarity
                if min_margin is not None and r.margin < min_margin:
                    r.decision = "unknown"
        if track_id is not None and results:
            frames = [Frame.of(r.candidates) for r in results]
            fused_t = threshold if threshold is not None else self.track_thresholds.get(model, results[0].threshold)
            decisions = self.tracks.observe(model, camera_id, track_id, frames, fused_t, min_margin)
            for r, d in zip(results, decisions, strict=True):
                r.track = d
        for r in results:
            del r.candidates[k:]
        return results

    def match(self, model: str, vectors: np.ndarray, k: int, threshold: float | None = None) -> list[MatchResult]:
        """Identify each row of ``vectors`` (validated, shape (n, dim)); see the module invariant."""
        mi = self.models.get(model)
        if mi is None:
            if model not in self.dims:
                raise UnknownModel(f"unknown model {model!r}")
            return self._match_cold(model, vectors, k, threshold)
        threshold = self.thresholds[model] if threshold is None else threshold
        queries = mi.key.protect_query(vectors)  # validated by the caller (vector.templates)
        local = self.local_tombstones
        for _attempt in range(3):
            found = search_candidates(lambda w: mi.index.search(queries, w), len(queries), k, len(mi.index),
                                      self.dead, self.config.oversample, mi.index.search_width(k))
            if local is not None and local.changed():  # an erasure on this host since we last looked
                fresh = local.read_new().tolist()
                if fresh:
                    self.add_tombstones(fresh)
                    continue
            if self._probe is None:
                break
            fresh = self._remote_tombstones([c.label for cands in found for c in cands])
            if not fresh:
                break
            self.add_tombstones(fresh)
        return [MatchResult("match" if cands and cands[0].similarity >= threshold else "unknown",
                            cands, threshold, mi.index_version) for cands in found]

    def _match_cold(self, model: str, vectors: np.ndarray, k: int, threshold: float | None) -> list[MatchResult]:
        """While the model's hot index warms (minutes at 1M without a snapshot): exact search over the
        protected templates of active subjects, tombstoned labels excluded, answered with ``path="cold"``:
        in PostgreSQL until warm-up has loaded the templates, then over that copy in process
        (``_cold_local``). 503 until the template key is known, or when PostgreSQL does not answer within
        ``cold_timeout``."""
        cold = self._cold.get(model)
        if cold is None or self.config.cold_timeout <= 0:
            raise IndexNotReady(f"the index of {model!r} is warming up")
        version = cold.version
        threshold = self.thresholds[model] if threshold is None else threshold
        queries = cold.key.protect_query(vectors)
        local = self.local_tombstones
        if local is not None and local.changed():
            self.add_tombstones(local.read_new())
        timeout_ms = int(self.config.cold_timeout * 1000)
        results: list[MatchResult] = []
        try:
            with self.pool.connection(timeout=self.config.cold_timeout) as conn:
                for query in queries:
                    width = k * self.config.oversample + 8
                    while True:
                        if cold.batch is not None:
                            rows, seen, seq = self._cold_local(conn, model, cold, query, width, timeout_ms)
                        else:
                            rows, seen, seq = store.search_active(conn, model, self.dims[model], version, query,
                                                                  width, self.dead_labels(), timeout_ms)
                        cands = self._cold_candidates(rows, k)
                        if len(cands) >= k or seen < width:
                            break
                        width *= 4  # several encodings per subject: look further down
                    results.append(MatchResult("match" if cands and cands[0].similarity >= threshold else "unknown",
                                               cands, threshold, f"{version}.{seq}", path="cold"))
        except (psycopg.Error, PoolTimeout) as exc:
            raise IndexNotReady(f"the index of {model!r} is warming up and PostgreSQL did not answer in time "
                                f"({type(exc).__name__})") from None
        return results

    def _cold_local(self, conn: psycopg.Connection, model: str, cold: _Cold, query: np.ndarray, width: int,
                    timeout_ms: int) -> tuple[list[tuple[int, bytes, bytes, float]], int, int]:
        """Exact search over the templates warm-up has loaded (tens of ms at 1M, one core), plus what
        PostgreSQL got since (labels above the loaded ones); PostgreSQL then says which of the hits still
        exist and belong to active subjects. Same answer as ``store.search_active``, a fraction of its CPU."""
        batch = cold.batch
        assert batch is not None
        sims, pos = faiss.knn(query[None, :], batch.templates, min(width, len(batch)), faiss.METRIC_INNER_PRODUCT)
        hits = [(int(batch.labels[p]), batch.subjects[p].tobytes(), batch.encodings[p].tobytes(), float(sim))
                for sim, p in zip(sims[0].tolist(), pos[0].tolist(), strict=True) if p >= 0]
        newer, live, seq = store.newer_and_live(conn, model, self.dims[model], cold.version, query, cold.loaded_max,
                                                [h[0] for h in hits], timeout_ms)
        rows = sorted([*newer, *hits], key=lambda r: -r[3])[:width]
        return [r for r in rows if r[0] in live], len(rows), seq

    def _cold_candidates(self, rows: list[tuple[int, bytes, bytes, float]], k: int) -> list[Candidate]:
        """Rows best first -> one candidate per subject, never a tombstoned label (tombstones added since
        the query was sent, e.g. by the Redis probe, are checked here)."""
        fresh = self._remote_tombstones([r[0] for r in rows])
        if fresh:
            self.add_tombstones(fresh)
        return candidates_from_rows(rows, k, self.dead)

    def _remote_tombstones(self, labels: list[int]) -> list[int]:
        """Labels tombstoned in Redis that this process has not heard of yet (feed behind)."""
        if self._probe is None or not labels or time.monotonic() < self._redis_down_until:
            return []
        try:
            return [x for x in self._probe.tombstoned(labels) if x not in self.dead]
        except REDIS_ERRORS:
            self._redis_down()
            return []

    def _redis_down(self) -> None:
        self._redis_down_until = time.monotonic() + 1.0
        self._needs_resync.set()

    # --- tombstones and deletions -----------------------------------------------------------
    def publish_tombstones(self, labels: list[int]) -> None:
        """An erasure in this process: hide the labels here and from every other worker on the host."""
        self.add_tombstones(labels)
        if self.local_tombstones is not None:
            self.local_tombstones.append(labels)

    def add_tombstones(self, labels: list[int] | np.ndarray) -> None:
        """In-process half of erasure: from now on this process never returns these labels."""
        values = [int(x) for x in labels]
        with self._dead_lock:
            self.dead.update(values)
        for mi in list(self.models.values()):
            mi.index.delete(values)

    def dead_labels(self) -> list[int]:
        with self._dead_lock:
            return list(self.dead)

    def reload(self, model: str) -> None:
        """Warm a fresh index of ``model`` from PostgreSQL and swap it in (after a template-key rotation)."""
        self.models[model] = self.warm(model)

    # --- warm-up and re-sync ----------------------------------------------------------------
    def warm(self, model: str) -> ModelIndex:
        """Build a model's index from its snapshot (if current) plus a diff against PostgreSQL, or from scratch."""
        dim = self.dims[model]
        started = time.perf_counter()
        provider = self._keys()
        if self.template_keys is None:
            self.template_keys = TemplateKeys(provider)
        with self.pool.connection() as conn:
            version = self.template_keys.ensure_model(conn, model, dim)
            key = self.template_keys.get(conn, model, version)
        self._cold[model] = _Cold(version, key)  # matches are answered from PostgreSQL until the index is warm
        self._hold("key")
        mi = self._from_snapshot(model, dim, version, key)
        if mi is None:
            with self.pool.connection() as conn, conn.transaction():
                conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
                pos = store.feed_position(conn, model)
                assert pos is not None
                seq, version = pos
                batch = store.load_templates(conn, model, dim, version)
                key = self.template_keys.get(conn, model, version)
            # While HNSW builds (minutes at 1M), the cold path searches these templates in process
            self._cold[model] = _Cold(version, key, batch, int(batch.labels.max()) if len(batch) else 0)
            self._hold("loaded")
            with _faiss_threads(self.config.warm_threads):
                index = HotIndex.build(dim, batch, self.config.params)
            mi = ModelIndex(model, dim, version, key, index, seq)
            del batch
        self._diff_sync(mi)
        mi.index.delete(self.dead_labels())
        self._cold[model] = _Cold(mi.version, mi.key)  # the loaded templates are the index's now: let them go
        log.info("index_warm", model=model, size=len(mi.index), kind=mi.index.kind,
                 seconds=round(time.perf_counter() - started, 3), seq=mi.applied_seq)
        return mi

    def _hold(self, stage: str) -> None:
        gate = self.config.warm_gate
        if gate is not None and self.config.warm_gate_stage == stage:
            gate.wait()

    def _from_snapshot(self, model: str, dim: int, version: int, key: TemplateKey) -> ModelIndex | None:
        path = self.snapshot_path(model)
        if path is None or not path.exists():
            return None
        try:
            index, meta = snapshot.load(path, self._keys(), self.config.params)
        except SnapshotError as exc:
            log.warning("snapshot_unusable", model=model, error=str(exc))
            return None
        if meta["version"] != version or meta["dim"] != dim:
            return None
        seq = int(meta["feed_seq"])
        return ModelIndex(model, dim, version, key, index, seq, saved_seq=seq, from_snapshot=True)

    def _diff_sync(self, mi: ModelIndex) -> None:
        """Make ``mi`` equal PostgreSQL: add missing labels, delete vanished ones, take the feed position."""
        with self.pool.connection() as conn, conn.transaction():
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            pos = store.feed_position(conn, mi.model)
            assert pos is not None
            seq, version = pos
            if version != mi.version:
                raise _VersionChanged
            in_pg = store.model_labels(conn, mi.model)
            here = mi.index.labels()
            missing = np.setdiff1d(in_pg, here, assume_unique=True)
            batch = store.load_templates(conn, mi.model, mi.dim, version, labels=missing) if missing.size else None
        gone = np.setdiff1d(here, in_pg, assume_unique=True)
        if batch is not None:
            mi.index.add(batch)
        if gone.size:
            mi.index.delete(gone)
        mi.applied_seq = seq

    def resync(self) -> None:
        """After Redis returns (or a feed gap): re-anchor the stream, reload tombstones, diff every model."""
        self._stream_id = self.feed.last_id()
        self.add_tombstones(self.feed.all_tombstones() | self._erasing_labels())
        for model in list(self.models):
            self._resync_model(model)
        self._needs_resync.clear()

    def _resync_model(self, model: str) -> None:
        with self._applied:
            self._resync_model_locked(model)
            self._applied.notify_all()

    def _resync_model_locked(self, model: str) -> None:
        mi = self.models[model]
        try:
            self._diff_sync(mi)
        except _VersionChanged:
            self.models[model] = self.warm(model)  # template key rotated: a fresh index, swapped at once
            return
        mi.index.delete(self.dead_labels())

    def _erasing_labels(self) -> set[int]:
        with self.pool.connection() as conn:
            rows = conn.execute(
                "SELECT e.label FROM encodings e JOIN subjects s ON s.id = e.subject_id WHERE s.state <> 'active'"
            ).fetchall()
        return {int(r[0]) for r in rows}

    # --- the follower thread ----------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.is_set() and not self._warm_all():
            self._stop.wait(1.0)
        last_check = time.monotonic()
        while not self._stop.is_set():
            try:
                if self._paused.is_set():
                    self._idle.set()
                    self._stop.wait(0.05)
                    continue
                if self._needs_resync.is_set():
                    self.resync()
                for msg in self.feed.read(self._stream_id or b"$", 500, self.dims):
                    if self._paused.is_set():
                        break  # read but not applied: the stream position stays before it
                    self._apply(msg)
                    self._stream_id = msg.id
                if time.monotonic() - last_check > self.config.resync_interval:
                    last_check = time.monotonic()
                    self._periodic()
            except REDIS_ERRORS as exc:
                self.last_error = f"redis: {exc}"
                self._redis_down()
                self._stop.wait(0.5)
            except Exception as exc:  # keep following; PostgreSQL may be briefly down
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.warning("index_follow_error", error=self.last_error)
                self._needs_resync.set()
                self._stop.wait(1.0)

    def _warm_all(self) -> bool:
        """Warm every model once; True when all are warm (retried each second otherwise)."""
        started = time.perf_counter()
        if self.local_tombstones is not None:
            self.add_tombstones(self.local_tombstones.read_new())
        try:
            if self._stream_id is None:
                self._stream_id = self.feed.last_id()
                self.add_tombstones(self.feed.all_tombstones())
        except REDIS_ERRORS:
            self._stream_id = None
            self._needs_resync.set()  # follow from PostgreSQL's view once Redis is back
        try:
            self.add_tombstones(self._erasing_labels())
            if self.template_keys is None:
                self.template_keys = TemplateKeys(self._keys())
            cold = [model for model in self.dims if model not in self.models]
            # Side by side: one model's snapshot decrypts while another derives its 512x512 key (~0.5 s)
            with ThreadPoolExecutor(max(1, len(cold)), thread_name_prefix="index-warm") as pool:
                for model, mi in zip(cold, pool.map(self.warm, cold), strict=True):
                    self.models[model] = mi
        except Exception as exc:
            self.last_error = f"{type(exc).__name__}: {exc}"
            log.warning("index_warm_failed", error=self.last_error)
            return False
        if any(not mi.from_snapshot and mi.index.kind == "hnsw" for mi in self.models.values()):
            self.save_snapshots()  # before serving: a restart must never rebuild HNSW, and saving later would
            # compete with matches for CPU (seconds at 1M)
        release_free_heap()  # the warm-up's freed COPY buffers and build scratch (vector.memory)
        self.warm_seconds = time.perf_counter() - started
        self._ready.set()
        return True

    def offer(self, msg: FeedMessage, wait: float = 1.0) -> None:
        """A change this process just committed: apply it now if it is next in sequence, else wait
        (briefly) for the follower, so a client reading its own write through this worker sees it.
        ``wait=0``: leave it to the follower (bulk enrolment must not wait on HNSW inserts)."""
        if wait <= 0:
            return
        with self._applied:
            mi = self.models.get(msg.model)
            if mi is not None and msg.seq == mi.applied_seq + 1:
                self._apply(msg)
            self._applied.wait_for(lambda: (m := self.models.get(msg.model)) is None or m.applied_seq >= msg.seq,
                                   timeout=wait)

    def _apply(self, msg: FeedMessage) -> None:
        if msg.op == "threshold":  # unsequenced, no index change: the refresher re-reads PostgreSQL
            if self.on_threshold is not None:
                self.on_threshold(msg.model)
            return
        with self._applied:
            self._apply_locked(msg)
            self._applied.notify_all()

    def _apply_locked(self, msg: FeedMessage) -> None:
        if msg.op == "tombstone":
            self.add_tombstones(msg.labels)
            return
        mi = self.models.get(msg.model)
        if mi is None or msg.seq <= mi.applied_seq:
            return  # another model, or already in the warmed/snapshot state
        if msg.seq != mi.applied_seq + 1 or msg.op == "rekey" or (msg.op == "add" and msg.version != mi.version):
            self._resync_model(msg.model)  # missed a message, or the template key changed
            return
        if msg.op == "add" and msg.batch is not None:
            batch = msg.batch
            if self.dead:
                batch = batch.take(~np.isin(batch.labels, self.dead_labels()))
            mi.index.add(batch)
        elif msg.op == "delete":
            mi.index.delete(msg.labels)
        mi.applied_seq = msg.seq
        if mi.index.needs_rebuild():
            threading.Thread(target=mi.index.rebuild, name=f"index-rebuild-{mi.model}", daemon=True).start()

    def _periodic(self) -> None:
        """Backstop for a lost publish: compare positions with PostgreSQL; save snapshots now and then."""
        with self.pool.connection() as conn:
            for model, mi in list(self.models.items()):
                pos = store.feed_position(conn, model)
                if pos is not None and (pos[0] > mi.applied_seq or pos[1] != mi.version):
                    self._needs_resync.set()
        self.save_snapshots(only_if_older_than=self.config.snapshot_interval)

    # --- snapshots --------------------------------------------------------------------------
    def snapshot_path(self, model: str) -> Path | None:
        d = self.config.snapshot_dir
        return None if d is None else Path(d) / f"{store.hnsw_index_name(model)}.snap"

    def save_snapshots(self, only_if_older_than: float = 0.0) -> None:
        for model, mi in list(self.models.items()):
            path = self.snapshot_path(model)
            if path is None or mi.saved_seq == mi.applied_seq or not len(mi.index):
                continue
            if only_if_older_than and path.exists() and time.time() - path.stat().st_mtime < only_if_older_than:
                continue
            try:
                seq = mi.applied_seq
                snapshot.save(path, mi.index, self._keys(), model=model, version=mi.version, feed_seq=seq)
                mi.saved_seq = seq
            except Exception as exc:
                log.warning("snapshot_save_failed", model=model, error=f"{type(exc).__name__}: {exc}")

    def status(self) -> dict[str, Any]:
        return {"ready": self.ready, "redis_ok": time.monotonic() >= self._redis_down_until,
                "warm_seconds": self.warm_seconds,
                "models": {m: {"size": len(mi.index), "kind": mi.index.kind, "version": mi.version,
                               "seq": mi.applied_seq, "memory_bytes": mi.index.memory_bytes(),
                               "from_snapshot": mi.from_snapshot, "ef_search": mi.index.ef_search,
                               "tuned_recall": mi.index.tuned_recall} for m, mi in self.models.items()}}


@dataclass
class _Cold:
    """A warming model's cold path: its template key and, once loaded, the templates being built into HNSW."""

    version: int
    key: TemplateKey
    batch: store.TemplateBatch | None = None
    loaded_max: int = 0  # highest label in ``batch``: PostgreSQL is asked for anything newer


class _VersionChanged(Exception):
    """The model's template version in PostgreSQL differs from the index's: reload instead of diffing."""


class _faiss_threads:
    """Warm-up may use every core; serving uses one OpenMP thread per search (threads come from uvicorn)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __enter__(self) -> None:
        faiss.omp_set_num_threads(self.n)  # this thread only (OpenMP ICVs are per thread)

    def __exit__(self, *exc: object) -> None:
        faiss.omp_set_num_threads(1)
        single_threaded_search()

