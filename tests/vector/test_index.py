"""The hot index, matcher rules and snapshots, without servers (pure FAISS/NumPy and a local KEK)."""

from __future__ import annotations

import threading
import uuid
from pathlib import Path

import numpy as np
import pytest

from vector import snapshot
from vector.errors import InvalidVector, SnapshotError
from vector.index import HotIndex, IndexParams
from vector.matcher import best_per_subject, candidates_from_rows, search_candidates
from vector.store import TemplateBatch, uuids_to_bytes
from vector.templates import as_matrix, from_float32_bytes

DIM = 32


def _batch(n: int, start: int = 1, per_subject: int = 1, seed: int = 0) -> TemplateBatch:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, DIM)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    subjects = [uuid.UUID(int=1 + i // per_subject) for i in range(n)]
    return TemplateBatch(np.arange(start, start + n, dtype=np.int64), uuids_to_bytes(subjects),
                         uuids_to_bytes([uuid.uuid4() for _ in range(n)]), x)


@pytest.mark.parametrize("exact_max", [10_000, 100], ids=["exact", "hnsw"])
def test_search_finds_each_vector_itself_and_never_a_deleted_label(exact_max: int) -> None:
    batch = _batch(500)
    index = HotIndex.build(DIM, batch, IndexParams(exact_max=exact_max, ef_search=64))
    assert index.kind == ("exact" if exact_max > 500 else "hnsw")
    hits = index.search(batch.templates[:50], 1)
    assert (hits.labels[:, 0] == batch.labels[:50]).mean() >= 0.98
    assert index.delete(batch.labels[:50]) == 50
    hits = index.search(batch.templates[:50], 5)
    assert not np.isin(hits.labels, batch.labels[:50]).any()
    assert len(index) == 450


def test_rebuild_compacts_deleted_and_switches_to_hnsw_past_the_exact_limit() -> None:
    index = HotIndex(DIM, IndexParams(exact_max=300, rebuild_dead_fraction=0.05))
    index.add(_batch(400))
    assert index.kind == "exact" and index.needs_rebuild()
    index.delete(list(range(1, 101)))
    index.rebuild()
    assert index.kind == "exact" and len(index) == 300 and index.dead_count == 0
    index.add(_batch(200, start=1000, seed=1))
    index.rebuild()
    assert index.kind == "hnsw" and len(index) == 500
    assert set(index.labels()) == set(range(101, 401)) | set(range(1000, 1200))


def test_searches_run_while_a_writer_adds() -> None:
    index = HotIndex(DIM, IndexParams(exact_max=50))
    index.add(_batch(200))
    index.rebuild()
    errors: list[Exception] = []
    stop = threading.Event()

    def searcher() -> None:
        q = _batch(8, seed=9).templates
        while not stop.is_set():
            try:
                hits = index.search(q, 3)
                assert (hits.labels >= 1).all()
            except Exception as exc:  # pragma: no cover - reported below
                errors.append(exc)

    threads = [threading.Thread(target=searcher) for _ in range(4)]
    for t in threads:
        t.start()
    for i in range(20):
        index.add(_batch(50, start=10_000 + 50 * i, seed=100 + i))
    stop.set()
    for t in threads:
        t.join()
    assert not errors and len(index) == 1200


def test_candidates_are_one_per_subject_best_first_without_tombstones() -> None:
    batch = _batch(60, per_subject=6)  # 10 subjects x 6 encodings
    index = HotIndex.build(DIM, batch)
    q = batch.templates[:1]
    dead = {int(batch.labels[0])}
    [cands] = search_candidates(lambda w: index.search(q, w), 1, 5, len(index), dead, oversample=1)
    assert len(cands) == 5
    assert len({c.subject_id for c in cands}) == 5
    assert all(c.label not in dead for c in cands)
    assert [c.similarity for c in cands] == sorted((c.similarity for c in cands), reverse=True)
    hits = index.search(q, 60)
    all_cands, exhausted = best_per_subject(hits, 0, 100, set())
    assert exhausted and len(all_cands) == 10


def test_cold_rows_follow_the_hot_rules() -> None:
    """The cold path's PostgreSQL rows: one candidate per subject, best first, never a dead label,
    similarities within [-1, 1] (rounding past 1 trimmed), at most k."""
    a, b, c = (uuid.UUID(int=i).bytes for i in (1, 2, 3))
    rows = [(7, b, uuid.uuid4().bytes, 1.0000002), (8, a, uuid.uuid4().bytes, 0.9), (9, b, uuid.uuid4().bytes, 0.8),
            (10, c, uuid.uuid4().bytes, 0.7)]
    cands = candidates_from_rows(rows, 5, {7})
    assert [(x.label, x.subject) for x in cands] == [(8, a), (9, b), (10, c)]
    assert cands[1].encoding == rows[2][2]
    got = candidates_from_rows(rows, 2, set())
    assert [(x.label, x.similarity) for x in got] == [(7, 1.0), (8, 0.9)]
    assert candidates_from_rows([], 3, {1}) == []


@pytest.mark.parametrize("bad", [[1.0] * 31, [float("nan")] + [1.0] * 31, [float("inf")] + [1.0] * 31, [0.0] * 32,
                                 [[1.0] * 32, [0.0] * 32], "text"],
                         ids=["wrong-dim", "nan", "inf", "zero", "zero-in-batch", "not-numbers"])
def test_invalid_embeddings_are_rejected(bad: object) -> None:
    with pytest.raises(InvalidVector):
        as_matrix(bad, DIM)


def test_raw_float32_body_must_hold_whole_vectors() -> None:
    x = np.ones((3, DIM), "<f4")
    assert from_float32_bytes(x.tobytes(), DIM).shape == (3, DIM)
    with pytest.raises(InvalidVector):
        from_float32_bytes(x.tobytes()[:-4], DIM)
    with pytest.raises(InvalidVector):
        as_matrix(np.full(DIM, 1e39), DIM)  # overflows float32 to inf


def test_snapshot_round_trips_and_rejects_tampering(tmp_path: Path) -> None:
    from crypto.providers.local import LocalFileProvider

    provider = LocalFileProvider(tmp_path / "keys")
    batch = _batch(300)
    index = HotIndex.build(DIM, batch, IndexParams(exact_max=100))
    index.delete([5, 6])
    path = tmp_path / "idx.snap"
    snapshot.save(path, index, provider, model="m", version=2, feed_seq=77)
    loaded, meta = snapshot.load(path, provider, IndexParams(exact_max=100))
    assert (meta["feed_seq"], meta["version"], loaded.kind) == (77, 2, "hnsw")
    assert sorted(loaded.labels()) == sorted(index.labels())
    assert raw_not_in_file(path, batch)
    data = bytearray(path.read_bytes())
    data[-100] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(SnapshotError):
        snapshot.load(path, provider)


@pytest.mark.parametrize("exact_max", [10_000, 100], ids=["exact", "hnsw"])
def test_snapshot_index_answers_like_the_original_and_grows_after_load(tmp_path: Path, exact_max: int) -> None:
    """A loaded index reads FAISS arrays in place from the snapshot buffer; the first add gives FAISS its
    own copy (growing a borrowed array would abort the process), and searches agree throughout."""
    from crypto.providers.local import LocalFileProvider

    provider = LocalFileProvider(tmp_path / "keys")
    params = IndexParams(exact_max=exact_max, ef_search=64)
    batch = _batch(400)
    index = HotIndex.build(DIM, batch, params)
    index.delete([7])
    snapshot.save(tmp_path / "idx.snap", index, provider, model="m", version=1, feed_seq=1)
    loaded, _ = snapshot.load(tmp_path / "idx.snap", provider, params)
    assert loaded._borrowed is not None
    before, after = index.search(batch.templates[:40], 5), loaded.search(batch.templates[:40], 5)
    assert np.array_equal(before.labels, after.labels) and np.array_equal(before.subjects, after.subjects)
    assert 7 not in loaded.search(batch.templates[6:7], 5).labels
    more = _batch(50, start=1000, seed=3)
    loaded.add(more)
    assert loaded._borrowed is None and len(loaded) == 449
    assert (loaded.search(more.templates, 1).labels[:, 0] == more.labels).mean() >= 0.98
    assert np.array_equal(loaded.search(batch.templates[:40], 5).labels[:, 0], before.labels[:, 0])
    loaded.delete(list(range(1, 101)))
    loaded.rebuild()
    assert set(loaded.labels()) == set(range(101, 401)) | set(range(1000, 1050))


def test_truncated_snapshot_is_refused(tmp_path: Path) -> None:
    from crypto.providers.local import LocalFileProvider

    provider = LocalFileProvider(tmp_path / "keys")
    path = tmp_path / "idx.snap"
    snapshot.save(path, HotIndex.build(DIM, _batch(300), IndexParams(exact_max=100)), provider, model="m",
                  version=1, feed_seq=1)
    path.write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(SnapshotError):
        snapshot.load(path, provider)


def raw_not_in_file(path: Path, batch: TemplateBatch) -> bool:
    """The snapshot is sealed: no template's bytes appear in the clear."""
    blob = path.read_bytes()
    return all(batch.templates[i].tobytes()[:32] not in blob for i in range(0, len(batch), 50))


def test_fast_and_slow_de_duplication_agree() -> None:
    """The dict-based common case and the loop used with tombstones or padding choose the same hits."""
    from vector.matcher import _best_per_subject_slow

    rng = np.random.default_rng(5)
    for trial in range(200):
        n = int(rng.integers(1, 120))
        batch = _batch(n, per_subject=int(rng.integers(1, 8)))
        index = HotIndex.build(DIM, batch)
        hits = index.search(batch.templates[int(rng.integers(0, n)):][:1], int(rng.integers(1, n + 1)))
        k = int(rng.integers(1, 12))
        fast = best_per_subject(hits, 0, k, set())
        slow = _best_per_subject_slow(hits, 0, hits.labels[0].tolist(), k, set())
        assert fast == slow, trial


# --- search breadth measured from the index (issue 19 item 5) ------------------------------------------


def _clustered(n: int, dim: int, seed: int, per: int = 10, spread: float = 0.35) -> tuple[TemplateBatch, np.ndarray]:
    """Identities = random centres, samples = centre + noise (like bench/common.identities); returns the
    batch (subject = identity) and the centres, from which fresh probes are drawn."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n // per, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    ident = np.repeat(np.arange(n // per), per)
    x = centres[ident] + rng.standard_normal((n, dim)).astype(np.float32) * (spread / np.sqrt(dim))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    subjects = uuids_to_bytes([uuid.UUID(int=1 + int(i)) for i in ident])
    return TemplateBatch(np.arange(1, n + 1, dtype=np.int64), subjects, subjects.copy(), x), centres


def _fresh_recall(index: HotIndex, batch: TemplateBatch, centres: np.ndarray, ef: int, seed: int = 99) -> float:
    """Recall@1 per subject of new captures (not the probes the index measured itself with) against exact search."""
    import faiss

    rng = np.random.default_rng(seed)
    dim = centres.shape[1]
    noise = rng.standard_normal((1000, dim)).astype(np.float32) * (0.35 / np.sqrt(dim))
    q = centres[rng.choice(len(centres), 1000)] + noise
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    _, exact = faiss.knn(q, batch.templates, 1, faiss.METRIC_INNER_PRODUCT)
    params = faiss.SearchParametersHNSW()
    params.efSearch = ef
    _, got = index._faiss.search(q, 1, params=params)
    return float((batch.subjects[got[:, 0]] == batch.subjects[exact[:, 0]]).all(axis=1).mean())


@pytest.mark.parametrize(("m", "ef_construction"), [(16, 40), (4, 8)], ids=["default-graph", "poor-graph"])
def test_measured_breadth_reaches_the_recall_target_on_new_captures(m: int, ef_construction: int) -> None:
    """The breadth the index picks for itself gives recall@1 >= 0.99 on probes it never saw; a poorer graph
    (fewer links) is measured to need a wider search, where a fixed 96 would fall short."""
    batch, centres = _clustered(30_000, 32, seed=1)
    index = HotIndex.build(32, batch, IndexParams(exact_max=1000, hnsw_m=m, ef_construction=ef_construction))
    assert index.kind == "hnsw" and index.tuned_recall is not None and index.tuned_recall >= 0.99
    assert _fresh_recall(index, batch, centres, index.ef_search) >= 0.99
    if m == 4:
        assert index.ef_search > 96 and _fresh_recall(index, batch, centres, 96) < 0.99


def test_explicit_breadth_overrides_the_measurement() -> None:
    batch, _ = _clustered(5_000, 32, seed=2)
    index = HotIndex.build(32, batch, IndexParams(exact_max=1000, ef_search=40))
    assert (index.ef_search, index.tuned_recall, index.tune()) == (40, None, False)
    assert index.search_width(5) == 40


def test_breadth_is_remeasured_after_growth_and_kept_in_snapshots(tmp_path: Path) -> None:
    from crypto.providers.local import LocalFileProvider

    batch, _ = _clustered(8_000, 32, seed=3)
    index = HotIndex.build(32, batch.take(slice(0, 4_000)), IndexParams(exact_max=1000))
    assert index.tuning_state()[1] == 4_000
    index.add(batch.take(slice(4_000, 8_000)))  # doubled: measured again in the background
    for _ in range(600):
        if index.tuning_state()[1] == 8_000:
            break
        threading.Event().wait(0.05)
    assert index.tuning_state()[1] == 8_000 and not index.needs_tuning()
    provider = LocalFileProvider(tmp_path / "keys")
    snapshot.save(tmp_path / "idx.snap", index, provider, model="m", version=1, feed_seq=1)
    loaded, meta = snapshot.load(tmp_path / "idx.snap", provider, IndexParams(exact_max=1000))
    assert loaded.tuning_state() == index.tuning_state() == (meta["ef_search"], meta["tuned_at"])
    assert loaded.tuned_recall is None  # taken from the snapshot, not measured again
