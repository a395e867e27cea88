"""Several workers over one PostgreSQL and Redis: they converge, honour tombstones while lagging,
survive Redis going away, restart from a snapshot, and follow a template-key rotation."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import numpy as np
import psycopg
import pytest

from appliance.clients import redis_client
from appliance.index_admin import purge_labels, rotate_template_key, tombstone_subject
from appliance.matching import IndexService, ServiceConfig
from tests.vector.conftest import MODEL, unit, wait_until


@pytest.fixture
def state(ready_client):  # type: ignore[no-untyped-def]
    return ready_client.app.state.appliance


@pytest.fixture
def second_worker(state, tmp_path) -> Iterator[IndexService]:  # type: ignore[no-untyped-def]
    """Another worker's index service: own Redis client, own snapshot folder, same servers."""
    config = ServiceConfig.from_settings(state.settings)
    config.snapshot_dir = tmp_path / "worker-b"
    worker = IndexService(state.settings, state.pool, redis_client(state.settings), lambda: state.keys, config)
    worker.start()
    assert worker.wait_ready(60), worker.last_error
    yield worker
    worker.stop(save=False)


def _subjects(worker: IndexService, probe: np.ndarray) -> set[str]:
    [result] = worker.match(MODEL, probe[None, :], k=5)
    return {str(c.subject_id) for c in result.candidates if c.similarity > 0.99}


def _erase_rows(admin_dsn: str, subject_id: str) -> None:
    with psycopg.connect(admin_dsn) as conn:
        conn.execute("DELETE FROM encodings WHERE subject_id = %s", (subject_id,))


def test_two_workers_converge_after_enrol_and_delete(state, second_worker, new_subject, enrol, admin_dsn):
    rng = np.random.default_rng(10)
    v = unit(rng, 2)
    sid = new_subject()
    enrol(sid, v)
    first = state.matcher
    assert sid in _subjects(first, v[0])  # read-your-write on the enrolling worker
    assert wait_until(lambda: sid in _subjects(second_worker, v[1]))
    labels = tombstone_subject(state, uuid.UUID(sid))
    _erase_rows(admin_dsn, sid)
    purge_labels(state, labels)
    for worker in (first, second_worker):
        assert wait_until(lambda w=worker: not set(labels) & set(w.models[MODEL].index.labels().tolist()))
        assert sid not in _subjects(worker, v[0])
    assert first.models[MODEL].applied_seq == second_worker.models[MODEL].applied_seq or wait_until(
        lambda: first.models[MODEL].applied_seq == second_worker.models[MODEL].applied_seq)


def test_erased_subject_never_matches_while_feed_lags(state, second_worker, new_subject, enrol):
    rng = np.random.default_rng(11)
    v = unit(rng, 1)
    sid = new_subject()
    enrol(sid, v)
    assert wait_until(lambda: sid in _subjects(second_worker, v[0]))
    assert second_worker.pause()
    try:
        tombstone_subject(state, uuid.UUID(sid))
        # Worker B has not read the feed, yet it checks the host's tombstone file after every search.
        assert sid not in _subjects(second_worker, v[0])
        assert sid not in _subjects(state.matcher, v[0])
    finally:
        second_worker.resume()


def _other_host_worker(state, path, redis_probe: bool) -> IndexService:  # type: ignore[no-untyped-def]
    config = ServiceConfig.from_settings(state.settings)
    config.snapshot_dir = path / "snap"
    config.tombstone_file = path / "tombstones.bin"  # another host: it never sees our file
    config.redis_probe = redis_probe
    worker = IndexService(state.settings, state.pool, redis_client(state.settings), lambda: state.keys, config)
    worker.start()
    assert worker.wait_ready(60), worker.last_error
    return worker


@pytest.mark.parametrize("redis_probe", [True, False], ids=["redis-probe", "no-probe-control"])
def test_lagging_worker_on_another_host_needs_the_redis_probe(state, tmp_path, new_subject, enrol, redis_probe):
    """With its own tombstone file (another host) a paused worker is saved only by the Redis probe; the
    control run without the probe shows the check is what hides the subject, not luck."""
    v = unit(np.random.default_rng(14), 1)
    sid = new_subject()
    enrol(sid, v)
    worker = _other_host_worker(state, tmp_path, redis_probe)
    try:
        assert wait_until(lambda: sid in _subjects(worker, v[0]))
        assert worker.pause()
        tombstone_subject(state, uuid.UUID(sid))
        assert (sid in _subjects(worker, v[0])) is not redis_probe
        worker.resume()
        assert wait_until(lambda: sid not in _subjects(worker, v[0]))  # the feed delivers it in the end
    finally:
        worker.stop(save=False)


def test_matching_continues_without_redis_and_resyncs_when_it_returns(stack, state, second_worker, new_subject,
                                                                       enrol, ready_client, match_headers):
    rng = np.random.default_rng(12)
    before, during = unit(rng, 1), unit(rng, 1)
    sid = new_subject()
    enrol(sid, before)
    assert wait_until(lambda: sid in _subjects(second_worker, before[0]))
    stack.redis.stop()
    stack._save()
    try:
        r = ready_client.post("/v1/match", json={"model": MODEL, "embedding": before[0].tolist()},
                              headers=match_headers)
        assert r.status_code == 200 and r.json()["subject_id"] == sid
        assert sid in _subjects(second_worker, before[0])
        enrol(sid, during)  # committed to PostgreSQL; the publish fails quietly
    finally:
        stack.redis.start()
        stack._save()
    assert wait_until(lambda: sid in _subjects(second_worker, during[0]), timeout=60), second_worker.last_error


def test_worker_restarts_from_its_snapshot(state, tmp_path, new_subject, enrol):
    sid = new_subject()
    v = unit(np.random.default_rng(13), 1)
    enrol(sid, v)
    config = ServiceConfig.from_settings(state.settings)
    config.snapshot_dir = tmp_path / "snap"
    one = IndexService(state.settings, state.pool, state.redis, lambda: state.keys, config)
    one.start()
    assert one.wait_ready(60)
    one.stop(save=True)
    two = IndexService(state.settings, state.pool, state.redis, lambda: state.keys, config)
    two.start()
    try:
        assert two.wait_ready(60)
        assert two.models[MODEL].from_snapshot  # warmed from the sealed snapshot, then diffed
        assert sid in _subjects(two, v[0])
    finally:
        two.stop(save=False)


def test_template_key_rotation_reprotects_and_workers_swap(state, second_worker, new_subject, enrol, admin_dsn):
    rng = np.random.default_rng(14)
    v = unit(rng, 3)
    sid = new_subject()
    enrol(sid, v)
    assert wait_until(lambda: sid in _subjects(second_worker, v[0]))
    with psycopg.connect(admin_dsn) as conn:
        old = conn.execute("SELECT template::text FROM encodings WHERE subject_id = %s ORDER BY label",
                           (sid,)).fetchall()
    first = state.matcher
    version = first.models[MODEL].version
    assert rotate_template_key(state, MODEL, batch_size=2, stop_after_batches=1) is None  # interrupted
    assert sid in _subjects(first, v[0])  # matching works mid-rotation
    result = rotate_template_key(state, MODEL, batch_size=500)  # resumes
    assert result is not None and result.to_version == version + 1
    assert first.models[MODEL].version == version + 1 and sid in _subjects(first, v[1])
    assert wait_until(lambda: second_worker.models[MODEL].version == version + 1, timeout=60)
    assert sid in _subjects(second_worker, v[2])
    with psycopg.connect(admin_dsn) as conn:
        new = conn.execute("SELECT template::text FROM encodings WHERE subject_id = %s ORDER BY label",
                           (sid,)).fetchall()
        states = dict(conn.execute("SELECT version, state FROM template_keys WHERE model = %s", (MODEL,)).fetchall())
    assert old != new
    assert states[version] == "retired" and states[version + 1] == "active"
