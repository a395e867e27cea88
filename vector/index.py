"""The hot index: one FAISS index per model and template version, searched in-process in microseconds.

FAISS ids are *positions* (0..n-1) into parallel metadata arrays (label, subject, encoding), so a hit
maps to its subject with one array read and deletion is uniform for both index kinds: a deleted
position is excluded at search time by an ID selector over a bitmap, and a background rebuild
compacts the index once deletions pass a fraction. Small models use exact search (IndexFlatIP);
past ``exact_max`` vectors the index is rebuilt as HNSW (IndexHNSWFlat, inner product).

Concurrency: FAISS releases the GIL while searching, so many threads search at once under the read
side of a readers-writer lock; adds and swaps take the write side (HNSW is not safe to add to while
it is searched).

Memory: an index loaded from a snapshot *borrows* its vectors and links from the snapshot's decrypted
buffer (FAISS reads them in place: no copy, ready sooner) until the first add, which gives FAISS its
own copy (FAISS cannot grow a borrowed array). Large arrays are backed by huge pages (``vector.memory``).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass

import faiss
import numpy as np

from vector.memory import advise_huge_pages, release_free_heap
from vector.store import TemplateBatch

_omp = threading.local()


def single_threaded_search() -> None:
    """OpenMP's thread count is per calling thread: make this thread's searches use one thread.

    Concurrency comes from the server's request threads; a 2-thread OpenMP team per single-vector
    search only adds scheduling and spinning (measured: 3.8 ms CPU per match instead of ~1 ms).
    """
    if not getattr(_omp, "single", False):
        faiss.omp_set_num_threads(1)
        _omp.single = True


class RWLock:
    """Many readers or one writer; a waiting writer blocks new readers so adds are not starved."""

    def __init__(self) -> None:
        self._mutex = threading.Lock()
        self._cond = threading.Condition(self._mutex)
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0

    def acquire_read(self) -> None:
        """The read side as two plain calls (the match path takes it on every search). They hold the
        Condition's lock directly: entering the Condition itself costs two Python-level calls more."""
        with self._mutex:
            while self._writer or self._writers_waiting:
                self._cond.wait()
            self._readers += 1

    def release_read(self) -> None:
        with self._mutex:
            self._readers -= 1
            if not self._readers and self._writers_waiting:  # only a writer waits for readers to leave
                self._cond.notify_all()

    @contextmanager
    def read(self) -> Iterator[None]:
        self.acquire_read()
        try:
            yield
        finally:
            self.release_read()

    @contextmanager
    def write(self) -> Iterator[None]:
        with self._cond:
            self._writers_waiting += 1
            while self._writer or self._readers:
                self._cond.wait()
            self._writers_waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


@dataclass(frozen=True)
class IndexParams:
    exact_max: int = 20_000  # above this many live vectors, HNSW instead of exact search
    hnsw_m: int = 16  # 1M x 128-d: 512 MB vectors + ~130 MB links
    ef_construction: int = 40  # insert cost ~1 ms/vector on one core: enrolment speed depends on it
    ef_search: int | None = None  # None: measured per index (``tune_ef_search``); a number overrides
    recall_target: float = 0.99  # recall@1 (per subject) the measured ef_search must reach
    rebuild_dead_fraction: float = 0.1


EF_STEPS = (32, 48, 64, 96, 128, 160, 192, 256, 320, 384, 512, 768, 1024)
TUNE_QUERIES = 400
RETUNE_GROWTH = 1.25  # re-measure once the index has grown by this factor since it was last measured


def tune_ef_search(index: faiss.IndexHNSW, subjects: np.ndarray, target: float, queries: int = TUNE_QUERIES,
                   seed: int = 0, hold: Callable[[], AbstractContextManager[object]] = nullcontext,
                   ) -> tuple[int, float]:
    """The smallest HNSW search breadth whose recall@1 (per subject) reaches ``target`` on probes made
    from the index's own data, plus one step of headroom; returns (ef_search, recall measured with it).

    Why measured, not a constant: the breadth HNSW needs grows with the number of vectors and depends
    on how they cluster (issue 19: 96 gave recall@1 0.965 at 1M clustered vectors, 1.0 at 100k).
    Probes stand for a new capture of an enrolled person: a stored vector moved, in a random
    direction, by the distance to its own nearest stored neighbour (a fresh sample is about that far
    from the samples already enrolled). The truth is exact search over the first ``len(subjects)``
    stored vectors; a probe counts as found when HNSW's best hit belongs to the subject of the exact
    best hit. A few hundred probes estimate recall to about a percent, hence the step of headroom.
    ``hold`` is entered around every read of the index (the index's read lock when it is live), in
    slices short enough that a waiting writer, and the searches queued behind it, wait little.
    """
    n = int(subjects.shape[0])
    if n == 0:
        return EF_STEPS[0], 1.0
    d = index.d

    def stored() -> np.ndarray:  # fetched under ``hold`` each time: an add may move FAISS's array
        storage = faiss.downcast_index(index.storage)
        return faiss.rev_swig_ptr(storage.codes.data(), n * d * 4).view(np.float32).reshape(n, d)

    rng = np.random.default_rng(seed)
    picks = np.sort(rng.choice(n, size=min(queries, n), replace=False))
    with hold():
        base = stored()[picks].copy()
    sims, _ = _exact(base, 2, n, stored, hold)
    # Distance to the nearest *other* stored vector (the best hit is the vector itself, or a duplicate)
    gap = np.sqrt(np.maximum(0.0, 2.0 - 2.0 * sims[:, 1])).astype(np.float32)
    noise = rng.standard_normal(base.shape).astype(np.float32)
    noise *= (gap / np.maximum(np.linalg.norm(noise, axis=1), 1e-12))[:, None]
    probes = base + noise
    probes /= np.maximum(np.linalg.norm(probes, axis=1, keepdims=True), 1e-12)
    _, exact = _exact(probes, 1, n, stored, hold)
    truth = subjects[exact[:, 0]]
    params = faiss.SearchParametersHNSW()

    def recall(ef: int) -> float:
        params.efSearch = ef
        hits = np.empty(len(probes), np.int64)
        for start in range(0, len(probes), 50):
            with hold():
                _, got = index.search(probes[start : start + 50], 1, params=params)
            hits[start : start + 50] = got[:, 0]
        ok = (hits >= 0) & (hits < n)
        ok[ok] = (subjects[hits[ok]] == truth[ok]).all(axis=1)
        return float(ok.mean())

    for i, ef in enumerate(EF_STEPS):
        if recall(ef) >= target or i == len(EF_STEPS) - 1:
            headroom = EF_STEPS[min(i + 1, len(EF_STEPS) - 1)]
            return headroom, recall(headroom)
    raise AssertionError("unreachable")


def _exact(queries: np.ndarray, k: int, n: int, stored: Callable[[], np.ndarray],
           hold: Callable[[], AbstractContextManager[object]], block: int = 65_536) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k inner products over the first n stored vectors, one block per ``hold``."""
    heap = faiss.ResultHeap(len(queries), k, keep_max=True)
    for start in range(0, n, block):
        stop = min(n, start + block)
        with hold():
            sims, pos = faiss.knn(queries, stored()[start:stop], min(k, stop - start), faiss.METRIC_INNER_PRODUCT)
        heap.add_result(sims, np.where(pos >= 0, pos + start, -1))
    heap.finalize()
    return heap.D, heap.I


@dataclass
class Hits:
    """Search result rows per query: similarity, label, subject and encoding bytes (label -1 = none)."""

    sims: np.ndarray  # float32 (nq, k)
    labels: np.ndarray  # int64 (nq, k)
    subjects: np.ndarray  # uint8 (nq, k, 16)
    encodings: np.ndarray  # uint8 (nq, k, 16)


class HotIndex:
    """Protected templates of one model version; never holds raw vectors. Thread-safe."""

    def __init__(self, dim: int, params: IndexParams | None = None) -> None:
        self.dim = dim
        self.params = params or IndexParams()
        self._lock = RWLock()
        self._rebuild_lock = threading.Lock()
        self._faiss: faiss.Index = faiss.IndexFlatIP(dim)
        self._borrowed: np.ndarray | None = None  # serialized index that self._faiss reads in place
        self._n = 0
        self._labels = np.empty(0, np.int64)
        self._subjects = np.empty((0, 16), np.uint8)
        self._encodings = np.empty((0, 16), np.uint8)
        self._dead = np.zeros(0, np.uint8)  # packed bitmap (little bit order) of deleted positions
        self._dead_count = 0
        self._selector: faiss.IDSelector | None = None
        self._params: dict[int, faiss.SearchParameters] = {}  # by k; cleared whenever index or selector change
        self._ef = self.params.ef_search or EF_STEPS[3]  # HNSW search breadth: measured by ``tune`` unless set
        self._tuned_at = 0  # vectors in the index when ``_ef`` was last measured
        self.tuned_recall: float | None = None  # recall@1 the measured breadth reached on its probes
        self._tuning = threading.Lock()

    # --- reading --------------------------------------------------------------------------
    @property
    def kind(self) -> str:
        return "hnsw" if isinstance(self._faiss, faiss.IndexHNSWFlat) else "exact"

    def __len__(self) -> int:
        """Live (not deleted) vectors."""
        return self._n - self._dead_count

    @property
    def dead_count(self) -> int:
        return self._dead_count

    def search(self, queries: np.ndarray, k: int) -> Hits:
        """Top-k by inner product among live vectors for each row of ``queries`` (protected, unit norm)."""
        q = np.ascontiguousarray(queries, dtype=np.float32)
        single_threaded_search()
        lock = self._lock
        lock.acquire_read()
        try:
            live = self._n - self._dead_count
            kk = max(1, min(k, live))
            if live == 0:
                nq = q.shape[0]
                return Hits(np.full((nq, 0), -1, np.float32), np.full((nq, 0), -1, np.int64),
                            np.zeros((nq, 0, 16), np.uint8), np.zeros((nq, 0, 16), np.uint8))
            params = self._params.get(kk)
            if params is None:
                params = self._params[kk] = self._search_params(kk)
            nq = q.shape[0]
            if q.ndim != 2 or q.shape[1] != self.dim:
                raise ValueError(f"queries must have shape (n, {self.dim})")
            sims, pos = np.empty((nq, kk), np.float32), np.empty((nq, kk), np.int64)
            # search_c, not search: the Python wrapper's checks and conversions cost ~50 µs per call here
            self._faiss.search_c(nq, faiss.swig_ptr(q), kk, faiss.swig_ptr(sims), faiss.swig_ptr(pos), params)
            if pos.min() < 0:  # fewer live vectors than asked for: -1 padding
                valid = pos >= 0
                pos = np.where(valid, pos, 0)
                labels = np.where(valid, self._labels[pos], -1)
            else:
                labels = self._labels[pos]
            # take, not [pos]: fancy indexing copies the 16-byte rows one memcpy call each (~5x slower)
            return Hits(sims, labels, self._subjects.take(pos, axis=0), self._encodings.take(pos, axis=0))
        finally:
            lock.release_read()

    def _search_params(self, k: int) -> faiss.SearchParameters:
        """Built once per k and selector (SWIG objects cost more to make than a small search)."""
        if isinstance(self._faiss, faiss.IndexHNSWFlat):
            params = faiss.SearchParametersHNSW()
            params.efSearch = max(self._ef, k)
        else:
            params = faiss.SearchParameters()
        if self._selector is not None:
            params.sel = self._selector
        return params

    def search_width(self, k: int) -> int:
        """Hits worth asking for when k are wanted: HNSW visits ``ef_search`` nodes anyway, so asking for
        that many costs no more and spares a second search when de-duplication drops hits."""
        return max(k, self._ef) if self.kind == "hnsw" else k

    @property
    def ef_search(self) -> int:
        """The HNSW search breadth in use (measured by ``tune``, or the configured override)."""
        return self._ef

    def memory_bytes(self) -> int:
        """Approximate resident bytes of this index: vectors, HNSW links and the metadata arrays."""
        with self._lock.read():
            size = self._faiss.ntotal * self.dim * 4
            if isinstance(self._faiss, faiss.IndexHNSWFlat):
                hnsw = self._faiss.hnsw
                size += hnsw.neighbors.size() * 4 + hnsw.offsets.size() * 8 + hnsw.levels.size() * 4
            return size + sum(a.nbytes for a in (self._labels, self._subjects, self._encodings, self._dead))

    def labels(self) -> np.ndarray:
        """Live labels (copy), for the diff-based re-sync against PostgreSQL."""
        with self._lock.read():
            live = ~self._dead_mask(self._n)
            return self._labels[: self._n][live].copy()

    # --- search breadth ---------------------------------------------------------------------
    def tune(self) -> bool:
        """Measure the HNSW breadth this index needs for ``params.recall_target`` (``tune_ef_search``),
        unless an explicit ``ef_search`` is configured. Searches go on meanwhile (the index is read in
        short slices). Returns False if there was nothing to do or a measurement was already running."""
        if self.params.ef_search is not None or not self._tuning.acquire(blocking=False):
            return False
        try:
            with self._lock.read():
                index, keep, subjects = self._faiss, self._borrowed, self._subjects[: self._n].copy()
            if not isinstance(index, faiss.IndexHNSWFlat):
                return False
            ef, recall = tune_ef_search(index, subjects, self.params.recall_target, hold=self._lock.read)
            del keep  # held so a borrowed index's buffer outlives the measurement
            with self._lock.write():
                if self._faiss is index:  # not swapped by a rebuild meanwhile (which measured its own)
                    self._set_ef(ef, len(subjects), recall)
            return True
        finally:
            self._tuning.release()

    def needs_tuning(self) -> bool:
        """An HNSW index with a measured breadth that has grown by ``RETUNE_GROWTH`` since it was measured."""
        return (self.params.ef_search is None and self.kind == "hnsw" and not self._tuning.locked()
                and self._n >= RETUNE_GROWTH * max(self._tuned_at, 1))

    def _set_ef(self, ef: int, at: int, recall: float | None) -> None:
        self._ef, self._tuned_at, self.tuned_recall = ef, at, recall
        self._params = {}

    # --- writing --------------------------------------------------------------------------
    ADD_SLICE = 32  # rows per write-lock hold: an HNSW insert is ~1 ms, searches must not wait long

    def add(self, batch: TemplateBatch) -> None:
        """Append templates (the caller guarantees each label is new: the feed sequence does).

        Large batches go in slices, releasing the write lock between them, so searches interleave.
        """
        if not len(batch):
            return
        if self._borrowed is not None:
            self._own()
        for start in range(0, len(batch), self.ADD_SLICE):
            part = batch.take(slice(start, start + self.ADD_SLICE))
            with self._lock.write():
                need = self._n + len(part)
                if need > self._labels.shape[0]:
                    self._grow(max(need, 2 * self._labels.shape[0], 1024))
                sl = slice(self._n, need)
                self._labels[sl] = part.labels
                self._subjects[sl] = part.subjects
                self._encodings[sl] = part.encodings
                self._faiss.add(np.ascontiguousarray(part.templates, dtype=np.float32))
                self._n = need
        self._advise_huge_pages()  # FAISS may have moved its arrays to grow them
        if self.needs_tuning():
            threading.Thread(target=self.tune, name="index-tune", daemon=True).start()

    def delete(self, labels: np.ndarray | list[int]) -> int:
        """Exclude these labels from every later search; returns how many were live here."""
        wanted = np.asarray(labels, dtype=np.int64)
        if not wanted.size:
            return 0
        with self._lock.write():
            hit = np.nonzero(np.isin(self._labels[: self._n], wanted))[0]
            fresh = hit[~self._dead_mask(self._n)[hit]]
            if fresh.size:
                np.bitwise_or.at(self._dead, fresh >> 3, (1 << (fresh & 7)).astype(np.uint8))
                self._dead_count += int(fresh.size)
                self._refresh_selector()
            return int(fresh.size)

    def needs_rebuild(self) -> bool:
        """HNSW over the exact limit, exact over it, or too many deleted positions."""
        if self.rebuilding:
            return False
        live = len(self)
        wrong_kind = (self.kind == "exact") != (live <= self.params.exact_max)
        too_dead = self._dead_count > max(64, self.params.rebuild_dead_fraction * max(self._n, 1))
        return wrong_kind or too_dead

    def rebuild(self) -> bool:
        """Compact deleted positions and pick the kind for the live size; searches continue meanwhile.

        The slow build runs without the lock on a copy; rows added or deleted during it are applied
        under the write lock just before the swap. Returns False (no-op) if a rebuild is already running.
        """
        if not self._rebuild_lock.acquire(blocking=False):
            return False
        try:
            with self._lock.read():
                n0 = self._n
                keep0 = ~self._dead_mask(n0)
                vectors = self._vectors(0, n0)[keep0]
                meta = (self._labels[:n0][keep0].copy(), self._subjects[:n0][keep0].copy(),
                        self._encodings[:n0][keep0].copy())
            fresh = self._new_faiss(len(vectors))
            if len(vectors):
                fresh.add(vectors)
            del vectors
            _advise_faiss(fresh, collapse=True)  # this thread is off the match path
            tuned = None
            if self.params.ef_search is None and isinstance(fresh, faiss.IndexHNSWFlat):
                tuned = tune_ef_search(fresh, meta[1], self.params.recall_target)  # not yet searched: no lock
            with self._lock.write():
                n1 = self._n
                keep_tail = ~self._dead_mask(n1)[n0:]
                if n1 > n0:
                    fresh.add(self._vectors(n0, n1)[keep_tail])
                labels = np.concatenate([meta[0], self._labels[n0:n1][keep_tail]])
                subjects = np.concatenate([meta[1], self._subjects[n0:n1][keep_tail]])
                encodings = np.concatenate([meta[2], self._encodings[n0:n1][keep_tail]])
                dead_now = self._dead_mask(n1)[:n0][keep0]  # kept at start, deleted during the build
                self._faiss, self._n, self._borrowed = fresh, len(labels), None
                self._labels, self._subjects, self._encodings = labels, subjects, encodings
                self._dead = np.zeros((len(labels) + 7) // 8, np.uint8)
                gone = np.nonzero(dead_now)[0]
                if gone.size:
                    np.bitwise_or.at(self._dead, gone >> 3, (1 << (gone & 7)).astype(np.uint8))
                self._dead_count = int(gone.size)
                self._refresh_selector()
                if tuned is not None:
                    self._set_ef(tuned[0], len(meta[1]), tuned[1])
        finally:
            self._rebuild_lock.release()
        release_free_heap()  # the old index and the build's scratch
        return True

    @property
    def rebuilding(self) -> bool:
        return self._rebuild_lock.locked()

    # --- snapshots ------------------------------------------------------------------------
    def to_parts(self) -> dict[str, np.ndarray]:
        """Everything a snapshot needs (protected templates and metadata only), consistent at one instant."""
        with self._lock.read():
            return {
                "faiss": faiss.serialize_index(self._faiss),
                "labels": self._labels[: self._n].copy(),
                "subjects": self._subjects[: self._n].copy(),
                "encodings": self._encodings[: self._n].copy(),
                "dead": self._dead[: (self._n + 7) // 8].copy(),
            }

    @classmethod
    def from_parts(cls, dim: int, parts: dict[str, np.ndarray], params: IndexParams | None = None,
                   borrow: bool = False, tuned: tuple[int, int] | None = None) -> HotIndex:
        """The index ``to_parts`` described. ``borrow``: FAISS reads ``parts["faiss"]`` in place and the
        metadata arrays are used as they are (the snapshot loader's fresh buffer), instead of copies.
        ``tuned``: (ef_search, size it was measured at) saved with the parts; measured now if absent."""
        index = cls(dim, params)
        data = np.ascontiguousarray(parts["faiss"], dtype=np.uint8)
        if borrow:
            index._faiss = faiss.read_index(faiss.ZeroCopyIOReader(faiss.swig_ptr(data), data.size), 0)
            index._borrowed = data
        else:
            index._faiss = faiss.deserialize_index(data)
        if index._faiss.d != dim:
            raise ValueError("snapshot dimension does not match the model")
        take = np.asarray if borrow else np.array
        index._labels = take(parts["labels"], np.int64)
        index._subjects = take(parts["subjects"], np.uint8).reshape(-1, 16)
        index._encodings = take(parts["encodings"], np.uint8).reshape(-1, 16)
        index._n = int(index._labels.shape[0])
        if index._faiss.ntotal != index._n:
            raise ValueError("snapshot metadata does not match its index")
        index._dead = np.zeros((index._n + 7) // 8, np.uint8)
        index._dead[: len(parts["dead"])] = parts["dead"]
        index._dead_count = int(np.unpackbits(index._dead, bitorder="little")[: index._n].sum())
        index._refresh_selector()
        if index.params.ef_search is None and index.kind == "hnsw":
            if tuned is not None:
                index._set_ef(int(tuned[0]), int(tuned[1]), None)
            else:
                index.tune()
        return index

    @classmethod
    def build(cls, dim: int, batch: TemplateBatch, params: IndexParams | None = None) -> HotIndex:
        """A new index of the right kind for ``batch`` (used by warm-up and template-key rotation)."""
        index = cls(dim, params)
        index._faiss = index._new_faiss(len(batch))
        index._grow(len(batch))  # also resets the cached search parameters
        index._labels[:], index._subjects[:], index._encodings[:] = batch.labels, batch.subjects, batch.encodings
        if len(batch):
            index._faiss.add(np.ascontiguousarray(batch.templates, dtype=np.float32))  # one call: OpenMP-parallel
        index._n = len(batch)
        _advise_faiss(index._faiss, collapse=True)  # warm-up or rotation: not on the match path
        index.tune()  # before the index is shared: nothing waits on it
        return index

    def tuning_state(self) -> tuple[int, int]:
        """(ef_search, size it was measured at), saved in snapshots so a restart need not measure again."""
        return self._ef, self._tuned_at

    # --- internals ------------------------------------------------------------------------
    def _own(self) -> None:
        """Swap a borrowed FAISS index for a copy FAISS owns (it aborts the process if asked to grow a
        borrowed array). The copy is made while searches go on; ~0.8 s once at 1M x 128-d."""
        with self._lock.read():
            borrowed, data = self._faiss, self._borrowed
        if data is None:
            return
        owned = _read_owned(data)
        with self._lock.write():
            if self._faiss is borrowed:  # not replaced by a rebuild meanwhile
                self._faiss, self._borrowed = owned, None
                self._params = {}
        self._advise_huge_pages()

    def _advise_huge_pages(self) -> None:
        if self._borrowed is None:  # a borrowed index lives in the snapshot's huge-page buffer already
            _advise_faiss(self._faiss, collapse=False)

    def _new_faiss(self, live: int) -> faiss.Index:
        if live <= self.params.exact_max:
            return faiss.IndexFlatIP(self.dim)
        index = faiss.IndexHNSWFlat(self.dim, self.params.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = self.params.ef_construction
        index.hnsw.efSearch = self._ef
        return index

    def _vectors(self, start: int, stop: int) -> np.ndarray:
        if stop <= start:
            return np.empty((0, self.dim), np.float32)
        return self._faiss.reconstruct_n(start, stop - start)

    def _dead_mask(self, n: int) -> np.ndarray:
        return np.unpackbits(self._dead, count=n, bitorder="little").astype(bool) if n else np.zeros(0, bool)

    def _grow(self, capacity: int) -> None:
        for name in ("_labels", "_subjects", "_encodings"):
            old = getattr(self, name)
            new = np.zeros((capacity, *old.shape[1:]), old.dtype)
            new[: self._n] = old[: self._n]
            setattr(self, name, new)
        dead = np.zeros((capacity + 7) // 8, np.uint8)
        dead[: self._dead.shape[0]] = self._dead
        self._dead = dead
        self._refresh_selector()

    def _refresh_selector(self) -> None:
        """Under the write lock: the selector points into ``self._dead``, which must outlive it."""
        self._params = {}
        if not self._dead_count:
            self._selector = None
            return
        bitmap = faiss.IDSelectorBitmap(self._dead.shape[0], faiss.swig_ptr(self._dead))
        selector = faiss.IDSelectorNot(bitmap)
        selector.referenced = bitmap  # keep the inner selector alive with the outer one
        self._selector = selector


def _read_owned(data: np.ndarray) -> faiss.Index:
    """Deserialize with one copy into FAISS's own arrays (``deserialize_index`` makes two)."""
    view = memoryview(data).cast("B")
    pos = 0

    def read(size: int) -> bytes:
        nonlocal pos
        chunk = bytes(view[pos : pos + size])
        pos += len(chunk)
        return chunk

    return faiss.read_index(faiss.PyCallbackIOReader(read), 0)


def _advise_faiss(index: faiss.Index, collapse: bool) -> None:
    """Huge pages under the arrays an HNSW search reads at random: the vectors and the neighbour lists."""
    arrays = []
    if isinstance(index, faiss.IndexHNSWFlat):
        arrays.append(index.hnsw.neighbors)
        index = faiss.downcast_index(index.storage)
    if isinstance(index, faiss.IndexFlatCodes):
        arrays.append(index.codes)
    for vec in arrays:
        if vec.size():
            advise_huge_pages(faiss.rev_swig_ptr(vec.data(), vec.size()), collapse)
