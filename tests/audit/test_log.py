"""The audit log appends in the caller's transaction or through the batch writer, chained and sanitised."""

from __future__ import annotations

import threading
import uuid

import psycopg
import pytest
from psycopg.rows import dict_row

from appliance.audit import AuditEvent
from appliance.audit.chain import ZERO_HASH, canonical_json, header_hash, header_of, unpack_bytes
from appliance.audit.export import records_of
from tests.freeze import freeze


def _chain_rows(conn, chain):  # type: ignore[no-untyped-def]
    """The chain's records in the exported form, match blocks expanded."""
    cur = conn.cursor(row_factory=dict_row)
    rows = cur.execute("SELECT * FROM audit_log WHERE chain = %s ORDER BY seq", (chain,)).fetchall()
    return [rec for row in rows for rec in records_of(row)]


def _assert_chained(records) -> None:  # type: ignore[no-untyped-def]
    prev = None
    for rec in records:
        assert header_hash(header_of(rec)).hex() == rec["hash"]
        if prev is None:
            assert (rec["seq"] == 1 and rec["prev_hash"] == ZERO_HASH.hex()) or rec["seq"] > 1
        else:
            assert rec["seq"] == prev["seq"] + 1 and rec["prev_hash"] == prev["hash"]
        prev = rec


def test_submitted_events_are_written_in_order_on_one_chain(audit, service_pool) -> None:
    subject = uuid.uuid4()
    for i in range(500):
        audit.submit(AuditEvent("match", "apikey:test", outcome="match", subject_id=subject, details={"i": i}))
    assert audit.flush(10)
    with service_pool.connection() as conn:
        rows = _chain_rows(conn, audit.chains["match"].name)
    assert [r["details"]["i"] for r in rows] == list(range(500))
    assert all(r["class"] == "match" for r in rows)
    _assert_chained(rows)


def test_awkward_text_survives_the_copy_path_byte_for_byte(audit, service_pool) -> None:
    """Tabs, newlines, backslashes, a literal \\N and non-ASCII in every text column of the COPY stream."""
    from tests.audit.test_chain import EVENTS

    for event in EVENTS:
        audit.submit(event)
    assert audit.flush(10)
    with service_pool.connection() as conn:
        chains = [_chain_rows(conn, audit.chains[c].name) for c in ("audit", "match")]
    rows = chains[0] + chains[1]
    got = {(r["actor"], r["action"], r["object_id"], r["request_id"]) for r in rows}
    for e in EVENTS:
        obj = None if e.object_id is None else e.object_id.replace("\x00", "")
        assert (e.actor, e.action, obj, e.request_id) in got
    for chain_rows in chains:
        _assert_chained(chain_rows)


def test_a_killed_writer_process_is_replaced_and_the_chain_goes_on(service_pool, keys) -> None:
    """SIGKILL the writer child between batches: a new child continues the same chains from their stored
    heads (no fork, no gap) and nothing submitted is lost."""
    import os
    import signal

    from appliance.audit.log import AuditLog

    log = AuditLog(service_pool, keys=lambda: keys, flush_interval=0.02, checkpoint_interval=0, writer_process=True,
                   writer_lanes=2)
    try:
        for i in range(300):
            log.submit(AuditEvent("match", "apikey:test", outcome="unknown", details={"i": i}))
        assert log.flush(20)
        first = log.child.pid
        os.kill(first, signal.SIGKILL)
        for i in range(300, 600):
            log.submit(AuditEvent("match", "apikey:test", outcome="unknown", details={"i": i}))
        assert log.flush(30)
        assert log.child.restarts >= 1 and log.child.pid != first
        with service_pool.connection() as conn:
            lanes = [_chain_rows(conn, lane["match"].name) for lane in log.lanes]
    finally:
        log.stop(checkpoint=False)
    seen = [r["details"]["i"] for rows in lanes for r in rows]
    assert set(seen) == set(range(600))  # a batch in flight may be written twice, never lost
    for rows in lanes:
        if rows:
            _assert_chained(rows)


@pytest.mark.parametrize("idle", [True, False])
def test_the_writer_process_runs_at_its_niceness_and_the_api_process_keeps_its_own(service_pool, keys,
                                                                                    idle: bool) -> None:
    """The child lowers only its own CPU priority (nice, and SCHED_IDLE unless told not to), so a match
    wins a contended core against it at once."""
    import os

    from appliance.audit.log import AuditLog

    before = os.getpriority(os.PRIO_PROCESS, 0)
    policy = os.sched_getscheduler(0)
    log = AuditLog(service_pool, keys=lambda: keys, flush_interval=0.02, checkpoint_interval=0, writer_process=True,
                   writer_nice=7, writer_idle=idle)
    try:
        log.submit(AuditEvent("match", "apikey:test", outcome="unknown"))
        assert log.flush(20)  # the child has read its config and written: its priority was set before that
        assert os.getpriority(os.PRIO_PROCESS, log.child.pid) == min(19, before + 7)
        assert os.sched_getscheduler(log.child.pid) == (os.SCHED_IDLE if idle else policy)
        assert os.getpriority(os.PRIO_PROCESS, 0) == before
        assert os.sched_getscheduler(0) == policy
    finally:
        log.stop(checkpoint=False)


def test_writer_lanes_each_keep_their_own_chain_and_a_marker_waits_for_all(service_pool, keys) -> None:
    """The writer process's pipeline spreads batches over lanes (own chains, own connections); a flush
    marker is released only when every lane has committed what came before it."""
    from appliance.audit.chain import event_tuple
    from appliance.audit.log import AuditLog

    log = AuditLog(service_pool, keys=lambda: keys, checkpoint_interval=0, writer_lanes=2)
    put, close = log.pipeline()
    batches = [[event_tuple(AuditEvent("match", "apikey:lanes", outcome="unknown", details={"i": b * 100 + i}))
                for i in range(100)] for b in range(4)]
    marker = threading.Event()
    flushed = type("Marker", (), {"done": marker})()
    for batch in batches:
        put(batch, [])
    put([], [flushed])
    assert marker.wait(30)
    with service_pool.connection() as conn:  # committed before the marker fired, on both lanes
        lanes = [_chain_rows(conn, lane["match"].name) for lane in log.lanes]
    close()
    assert [len(rows) for rows in lanes] == [200, 200]
    assert {r["details"]["i"] for rows in lanes for r in rows} == set(range(400))
    assert len({lane["match"].name for lane in log.lanes}) == 2
    for rows in lanes:
        _assert_chained(rows)


def test_record_commits_with_the_callers_transaction_and_vanishes_on_rollback(audit, service_pool) -> None:
    marker = uuid.uuid4().hex
    with service_pool.connection() as conn, conn.transaction():
        audit.record(conn, AuditEvent("subject.create", "apikey:test", object_id="kept-" + marker))
    with pytest.raises(RuntimeError), service_pool.connection() as conn, conn.transaction():
        audit.record(conn, AuditEvent("subject.create", "apikey:test", object_id="gone-" + marker))
        raise RuntimeError("the caller's write failed")
    with service_pool.connection() as conn:
        found = conn.execute("SELECT object_id FROM audit_log WHERE object_id LIKE %s", ("%" + marker,)).fetchall()
    assert found == [("kept-" + marker,)]


def test_concurrent_transactions_never_fork_a_transaction_chain(audit, service_pool) -> None:
    errors: list[BaseException] = []

    def work() -> None:
        try:
            for _ in range(25):
                with service_pool.connection() as conn, conn.transaction():
                    audit.record(conn, AuditEvent("subject.read", "apikey:test"))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    with service_pool.connection() as conn:
        for i in range(8):
            _assert_chained(_chain_rows(conn, f"tx:audit:{i}"))


def test_sensitive_details_never_reach_the_log(audit, service_pool) -> None:
    marker = uuid.uuid4().hex
    audit.submit(AuditEvent("enrol", "apikey:test", object_id=marker, details={
        "vector": [0.1] * 128, "token": "apl_abcdef123456_secret", "model": "dlib-resnet-v1",
        "nested": {"dek": "x", "count": 3}, "note": "Bearer abc.def", "blob": b"\x00\x01",
    }))
    assert audit.flush(10)
    with service_pool.connection() as conn:
        (details,) = conn.execute("SELECT details FROM audit_log WHERE object_id = %s", (marker,)).fetchone()
    assert details["model"] == "dlib-resnet-v1" and details["nested"] == {"count": 3}
    text = str(details)
    assert "apl_" not in text and "0.1" not in text and "Bearer" not in text
    assert set(details["_redacted"]) >= {"vector", "token", "nested.dek", "note", "blob"}


def test_stored_details_are_the_exact_text_that_was_hashed(audit, service_pool) -> None:
    """Details are `json`, not `jsonb`, in a row, and the canonical body text in a match block: the
    database keeps the bytes that were hashed, so nothing re-prints them."""
    marker = uuid.uuid4().hex
    details = {"similarity": 0.9512, "k": 5, "camera_id": "cam-\u00e9", "zeta": None, "alpha": [1, 2.5]}
    audit.submit(AuditEvent("match", "apikey:test", outcome="match", object_id=marker, details=details))
    with service_pool.connection() as conn, conn.transaction():
        audit.record(conn, AuditEvent("subject.read", "apikey:test", object_id=marker, details=details))
    assert audit.flush(10)
    with service_pool.connection() as conn:
        rows = conn.execute("SELECT details::text, pg_typeof(details)::text FROM audit_log WHERE object_id = %s",
                            (marker,)).fetchall()
        packed = conn.execute("SELECT packed FROM audit_log WHERE chain = %s AND events IS NOT NULL",
                              (audit.chains["match"].name,)).fetchall()
    assert len(rows) == 1
    text, kind = rows[0]
    assert kind == "json" and text.encode() == canonical_json(details)
    stored = b"".join(unpack_bytes(p) for (p,) in packed)
    assert b'"details":' + canonical_json(details) + b',"object_id":"' + marker.encode() in stored


def test_match_events_are_stored_as_blocks_an_access_request_can_find(audit, service_pool) -> None:
    """Hundreds of match events become a few block rows (not a row each); each block lists its subjects
    (GIN-indexed) and holds exactly its records' hashes; its row carries the last record's seq and hash."""
    subjects = [uuid.uuid4() for _ in range(3)]
    for i in range(900):
        audit.submit(AuditEvent("match", "apikey:test", outcome="match", subject_id=subjects[i % 3], details={"i": i}))
    audit.submit(AuditEvent("match", "apikey:test", outcome="unknown", details={"i": 900}))
    assert audit.flush(10)
    chain = audit.chains["match"].name
    with service_pool.connection() as conn:
        cur = conn.cursor(row_factory=dict_row)
        blocks = cur.execute("SELECT * FROM audit_log WHERE chain = %s ORDER BY seq", (chain,)).fetchall()
        found = conn.execute(
            "SELECT count(*) FROM audit_log WHERE chain = %s AND subjects @> ARRAY[%s]::uuid[]", (chain, subjects[1])
        ).fetchone()[0]
    assert 1 <= len(blocks) <= 20 and all(b["events"] for b in blocks)
    assert sum(b["events"] for b in blocks) == 901 and found >= 1
    records = [rec for b in blocks for rec in records_of(b)]
    assert [r["details"]["i"] for r in records] == list(range(901))
    for b in blocks:
        recs = records_of(b)
        assert b["hash"].hex() == recs[-1]["hash"] and b["prev_hash"].hex() == recs[0]["prev_hash"]
        assert b["seq"] == recs[-1]["seq"] and b["ts"].isoformat(timespec="microseconds") == recs[-1]["ts"]
        assert set(b["subjects"] or []) == {uuid.UUID(r["subject_id"]) for r in recs if r["subject_id"]}
    _assert_chained(records)


def test_service_role_cannot_update_delete_or_truncate_the_audit_trail(audit, settings, service_pool) -> None:
    with service_pool.connection() as conn, conn.transaction():
        audit.record(conn, AuditEvent("subject.read", "apikey:test"))
    dsn = settings.database_url.get_secret_value()
    for sql in ("UPDATE audit_log SET outcome = 'x'", "DELETE FROM audit_log", "TRUNCATE audit_log",
                "TRUNCATE audit_log_default", "UPDATE audit_checkpoints SET kind = 'manual'",
                "DELETE FROM audit_checkpoints", "DELETE FROM audit_heads"):
        with psycopg.connect(dsn) as conn, pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute(sql)


def test_even_the_owner_cannot_rewrite_audit_rows(audit, admin_dsn, service_pool) -> None:
    with service_pool.connection() as conn, conn.transaction():
        audit.record(conn, AuditEvent("subject.read", "apikey:test"))
    for sql in ("UPDATE audit_log SET outcome = 'x'", "DELETE FROM audit_log", "TRUNCATE audit_log"):
        with psycopg.connect(admin_dsn) as conn, pytest.raises(psycopg.errors.InsufficientPrivilege) as info:
            conn.execute(sql)
        assert "append-only" in str(info.value)


def test_a_full_queue_applies_back_pressure_and_counts_what_it_cannot_keep() -> None:
    from psycopg_pool import ConnectionPool

    from appliance.audit.log import BACKPRESSURE, DROPPED, AuditLog

    unreachable = ConnectionPool("postgresql://nobody@127.0.0.1:1/none", min_size=0, max_size=1, open=True, timeout=0.2)
    log = AuditLog(unreachable, queue_size=5, batch_max=1, block_seconds=0.2, flush_interval=0.01)
    waited, dropped = BACKPRESSURE._value.get(), DROPPED._value.get()
    try:
        for _ in range(40):
            log.submit(AuditEvent("match", "apikey:test"))
        assert BACKPRESSURE._value.get() > waited
        assert DROPPED._value.get() > dropped
        assert log.queue_depth <= 5
    finally:
        log.stop(checkpoint=False, timeout=5)
        unreachable.close()


def _tx_rows_with(conn, marker):  # type: ignore[no-untyped-def]
    """Records on transaction chains whose details carry ``marker`` (what stop() wrote directly)."""
    cur = conn.cursor(row_factory=dict_row)
    return cur.execute("SELECT * FROM audit_log WHERE chain LIKE 'tx:%%' AND details->>'run' = %s",
                       (marker,)).fetchall()


def test_events_a_killed_writer_had_not_committed_are_written_by_its_successor(service_pool, keys) -> None:
    """The ring keeps every record until a COPY has committed it: events taken by a child that is then
    killed (stopped first, so it cannot have committed them) are written by the next child."""
    import os
    import signal

    from appliance.audit.log import AuditLog

    log = AuditLog(service_pool, keys=lambda: keys, flush_interval=0.02, checkpoint_interval=0, writer_process=True)
    try:
        log.submit(AuditEvent("match", "apikey:test", outcome="unknown", details={"i": -1}))
        assert log.flush(20)
        first = log.child.pid
        freeze(first)
        for i in range(500):
            log.submit(AuditEvent("match", "apikey:test", outcome="unknown", details={"i": i}))
        assert log.queue_depth == 500  # nothing released while the child is stopped
        os.kill(first, signal.SIGKILL)
        assert log.flush(30)
        assert log.child.restarts == 1 and log.queue_depth == 0
        with service_pool.connection() as conn:
            rows = _chain_rows(conn, log.chains["match"].name)
    finally:
        log.stop(checkpoint=False)
    assert sorted(r["details"]["i"] for r in rows) == list(range(-1, 500))  # none lost, none twice
    _assert_chained(rows)


def test_a_full_ring_applies_back_pressure_and_the_writer_catches_up(service_pool, keys) -> None:
    """With the writer stalled, the ring fills: submit waits (counted), then drops (counted, logged);
    what fitted is committed once the writer runs again."""
    import os
    import signal

    from prometheus_client import REGISTRY

    from appliance.audit.log import BACKPRESSURE, DROPPED, AuditLog

    log = AuditLog(service_pool, keys=lambda: keys, queue_size=10, block_seconds=0.002, flush_interval=0.02,
                   checkpoint_interval=0, writer_process=True)
    waited, dropped = BACKPRESSURE._value.get(), DROPPED._value.get()
    try:
        log.submit(AuditEvent("match", "apikey:test", outcome="unknown", details={"i": -1}))
        assert log.flush(20)
        freeze(log.child.pid)
        for i in range(8000):  # ~180 bytes each: more than the 1 MiB smallest ring holds
            log.submit(AuditEvent("match", "apikey:test", outcome="unknown", details={"i": i, "pad": "x" * 64}))
        kept = log.queue_depth
        assert 0 < kept < 8000
        assert REGISTRY.get_sample_value("appliance_audit_queue_depth") >= kept  # visible while stalled
        # the counters are process-wide (another test's writer may still count a loss): at least ours
        assert BACKPRESSURE._value.get() > waited
        assert DROPPED._value.get() - dropped >= 8000 - kept
        os.kill(log.child.pid, signal.SIGCONT)
        assert log.flush(60)
        with service_pool.connection() as conn:
            rows = _chain_rows(conn, log.chains["match"].name)
    finally:
        log.stop(checkpoint=False)
    assert len(rows) == 1 + kept
    assert [r["details"]["i"] for r in rows[1:]] == list(range(kept))  # the first ones, in order
    _assert_chained(rows)


def test_stop_writes_directly_what_a_stuck_writer_left_in_the_ring(service_pool, keys) -> None:
    """A writer process that does not stop in time is killed; stop() writes its uncommitted events on a
    transaction chain itself, so a shutdown loses none."""

    from appliance.audit.log import AuditLog

    run = uuid.uuid4().hex
    log = AuditLog(service_pool, keys=lambda: keys, flush_interval=0.02, checkpoint_interval=0, writer_process=True)
    log.submit(AuditEvent("match", "apikey:test", outcome="unknown"))
    assert log.flush(20)
    freeze(log.child.pid)
    for i in range(50):
        log.submit(AuditEvent("match", "apikey:test", outcome="unknown", details={"run": run, "i": i}))
    log.stop(checkpoint=False, timeout=1)
    with service_pool.connection() as conn:
        rows = _tx_rows_with(conn, run)
    assert sorted(r["details"]["i"] for r in rows) == list(range(50))


def test_an_api_process_killed_mid_stream_loses_nothing_and_leaves_no_writer_behind(settings, service_pool) -> None:
    """An API worker killed without a shutdown must not leave its writer child behind, nor lose what it
    submitted: the child still maps the ring, commits it (no flush, no stop ran) and exits."""
    import os
    import subprocess
    import sys
    import time

    code = (
        "import os, sys\n"
        "from psycopg_pool import ConnectionPool\n"
        "from appliance.audit import AuditEvent\n"
        "from appliance.audit.log import AuditLog\n"
        "pool = ConnectionPool(sys.stdin.readline().strip(), min_size=1, max_size=2, open=True)\n"
        "log = AuditLog(pool, checkpoint_interval=0, writer_process=True, flush_interval=5)\n"
        "for i in range(3000):\n"
        "    log.submit(AuditEvent('match', 'apikey:test', outcome='unknown', details={'i': i}))\n"
        "print(log.chains['match'].name, log.child.pid, flush=True)\n"
        "os._exit(0)  # no flush, no stop(): as if killed\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], input=settings.database_url.get_secret_value() + "\n",
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    chain, child = proc.stdout.split()[-2], int(proc.stdout.split()[-1])
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        raise AssertionError("the writer process outlived its parent")
    with service_pool.connection() as conn:
        rows = _chain_rows(conn, chain)
    assert [r["details"]["i"] for r in rows] == list(range(3000))
    _assert_chained(rows)


def test_an_event_with_oversized_details_is_cut_not_lost(audit, service_pool) -> None:
    """Details too big for one ring record (or a COPY line) are sanitised on the way: the event is kept."""
    marker = uuid.uuid4().hex
    audit.submit(AuditEvent("match", "apikey:test", outcome="unknown", object_id=marker,
                            details={"note": "x" * 200_000, "model": "dlib-resnet-v1"}))
    assert audit.flush(10)
    with service_pool.connection() as conn:
        rows = [r for r in _chain_rows(conn, audit.chains["match"].name) if r["object_id"] == marker]
    assert len(rows) == 1
    assert len(canonical_json(rows[0]["details"])) <= 4096


def test_without_shared_memory_the_writer_falls_back_to_a_thread(service_pool, keys, monkeypatch) -> None:
    """A host that refuses memfd_create (a stricter seccomp filter) must not cost a match its answer:
    the AuditLog says so and writes batches with its thread writer instead."""
    import os

    from appliance.audit.log import AuditLog

    def refuse(*args: object, **kwargs: object) -> int:
        raise PermissionError(1, "Operation not permitted", "memfd_create")

    monkeypatch.setattr(os, "memfd_create", refuse)
    log = AuditLog(service_pool, keys=lambda: keys, flush_interval=0.02, checkpoint_interval=0, writer_process=True)
    try:
        log.submit(AuditEvent("match", "apikey:test", outcome="unknown", details={"i": 1}))
        assert log.flush(10)
        assert log.child is None and not log.writer_process
        with service_pool.connection() as conn:
            rows = _chain_rows(conn, log.chains["match"].name)
    finally:
        log.stop(checkpoint=False)
    assert [r["details"]["i"] for r in rows] == [1]
