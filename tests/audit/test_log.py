"""The audit log appends in the caller's transaction or through the batch writer thread, chained and sanitised."""

from __future__ import annotations

import threading
import uuid

import psycopg
import pytest
from psycopg.rows import dict_row

from appliance.audit import AuditEvent
from appliance.audit.chain import ZERO_HASH, canonical_json, header_hash, header_of, unpack_bytes
from appliance.audit.export import records_of


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


def test_a_full_queue_makes_submitters_wait_and_loses_nothing(service_pool, keys, admin_dsn) -> None:
    """While the writer cannot commit (a lock on the head table stands in for a stalled PostgreSQL), the
    queue fills to ``queue_size`` and submitters wait (counted); once it can, every event is written in order."""
    from appliance.audit.log import AuditLog
    from appliance.audit.queue import BACKPRESSURE

    log = AuditLog(service_pool, keys=lambda: keys, queue_size=50, batch_max=10, flush_interval=0.01,
                   checkpoint_interval=0)
    waited = BACKPRESSURE._value.get()
    submitter = threading.Thread(target=lambda: [log.submit(AuditEvent("match", "apikey:test", outcome="unknown",
                                                                       details={"i": i})) for i in range(200)])
    try:
        with psycopg.connect(admin_dsn) as blocker:
            blocker.execute("LOCK TABLE audit_heads IN EXCLUSIVE MODE")
            submitter.start()
            assert _eventually(lambda: BACKPRESSURE._value.get() > waited)
            assert submitter.is_alive() and log.queue_depth == 50  # bounded, waiting, nothing dropped
            blocker.rollback()
        submitter.join(60)
        assert not submitter.is_alive() and log.flush(30)
        with service_pool.connection() as conn:
            rows = _chain_rows(conn, log.chains["match"].name)
    finally:
        log.stop(checkpoint=False)
    assert [r["details"]["i"] for r in rows] == list(range(200))
    _assert_chained(rows)


def _eventually(check, timeout: float = 60.0) -> bool:  # type: ignore[no-untyped-def]
    """Poll ``check`` until true (a generous bound: a slow host only makes this slower, not flaky)."""
    import time

    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_events_submitted_after_stop_are_written_directly(service_pool, keys) -> None:
    """A late hook that submits while (or after) the writer stops is not lost: it goes on a transaction chain."""
    from appliance.audit.log import AuditLog

    run = uuid.uuid4().hex
    log = AuditLog(service_pool, keys=lambda: keys, flush_interval=0.02, checkpoint_interval=0)
    log.submit(AuditEvent("match", "apikey:test", outcome="unknown"))
    log.stop(checkpoint=False, timeout=5)
    for i in range(3):
        log.submit(AuditEvent("match", "apikey:test", outcome="unknown", details={"run": run, "i": i}))
    with service_pool.connection() as conn:
        cur = conn.cursor(row_factory=dict_row)
        rows = cur.execute("SELECT * FROM audit_log WHERE chain LIKE 'tx:%%' AND details->>'run' = %s",
                           (run,)).fetchall()
    assert sorted(r["details"]["i"] for r in rows) == [0, 1, 2]


def test_an_api_process_killed_mid_stream_leaves_a_chain_that_verifies(settings, service_pool, keys) -> None:
    """An API process killed without a shutdown loses at most what it had not yet committed (one flush
    interval): what it committed is a whole chain prefix whose head row matches its last record, and
    an export of it verifies."""
    import subprocess
    import sys

    from appliance.audit.export import ExportFilter, export_lines
    from appliance.audit.verify import verify_export

    code = (
        "import os, sys\n"
        "from psycopg_pool import ConnectionPool\n"
        "from appliance.audit import AuditEvent\n"
        "from appliance.audit.log import AuditLog\n"
        "pool = ConnectionPool(sys.stdin.readline().strip(), min_size=1, max_size=2, open=True)\n"
        "log = AuditLog(pool, checkpoint_interval=0, flush_interval=0.05)\n"
        "for i in range(3000):\n"
        "    log.submit(AuditEvent('match', 'apikey:test', outcome='unknown', details={'i': i}))\n"
        "assert log.flush(60)\n"
        "for i in range(3000, 3500):\n"
        "    log.submit(AuditEvent('match', 'apikey:test', outcome='unknown', details={'i': i}))\n"
        "print(log.chains['match'].name, flush=True)\n"
        "os._exit(0)  # no flush, no stop(): as if killed\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], input=settings.database_url.get_secret_value() + "\n",
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    chain = proc.stdout.split()[-1]
    with service_pool.connection() as conn:
        rows = _chain_rows(conn, chain)
        head = conn.execute("SELECT seq, hash FROM audit_heads WHERE chain = %s", (chain,)).fetchone()
    seen = [r["details"]["i"] for r in rows]
    assert seen == list(range(len(seen))) and len(seen) >= 3000  # a prefix: nothing committed out of order
    assert head == (rows[-1]["seq"], bytes.fromhex(rows[-1]["hash"]))
    _assert_chained(rows)
    flt = ExportFilter.build(None, None, None, "match")
    data = b"".join(export_lines(settings.database_url.get_secret_value(), keys, flt))
    report = verify_export(data, keys.public_key_pem())
    assert report.ok, [str(p) for p in report.problems]


def test_an_event_with_oversized_details_is_cut_not_lost(audit, service_pool) -> None:
    """Oversized details are sanitised on the way: the event is kept, its details replaced by their size."""
    marker = uuid.uuid4().hex
    audit.submit(AuditEvent("match", "apikey:test", outcome="unknown", object_id=marker,
                            details={"note": "x" * 200_000, "model": "dlib-resnet-v1"}))
    assert audit.flush(10)
    with service_pool.connection() as conn:
        rows = [r for r in _chain_rows(conn, audit.chains["match"].name) if r["object_id"] == marker]
    assert len(rows) == 1
    assert len(canonical_json(rows[0]["details"])) <= 4096
