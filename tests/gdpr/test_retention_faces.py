"""Faces expire: the sweep erases subjects past their retention (each with a signed receipt), keeps the
others, and ``--dry-run`` changes nothing. Time is injected: rows are dated in the past, ``now`` is passed."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta

import psycopg

from appliance.gdpr.receipts import verify_receipt
from appliance.gdpr.retention import sweep_subjects


def _backdate(admin_dsn: str, subject_id: str, when: datetime, last_seen: datetime | None = None) -> None:
    with psycopg.connect(admin_dsn) as conn:
        conn.execute("UPDATE subjects SET created_at = %s, last_seen_at = %s WHERE id = %s",
                     (when, last_seen, subject_id))
        conn.execute("UPDATE encodings SET created_at = %s WHERE subject_id = %s", (when, subject_id))


def _states(admin_dsn: str, ids: list[str]) -> dict[str, str]:
    with psycopg.connect(admin_dsn) as conn:
        rows = conn.execute("SELECT id::text, state FROM subjects WHERE id = ANY(%s::uuid[])", (ids,)).fetchall()
    return dict(rows)


def test_expired_faces_are_erased_with_receipts_and_recent_ones_kept(
        gdpr_client, state, admin_dsn, staff_headers, make_subject, public_key_pem) -> None:
    now = datetime.now(UTC)
    long_ago = now - timedelta(days=800)
    old, seen, consent, kept, fresh = (make_subject(person=p, n=1, photo=False)["id"] for p in (7, 8, 9, 10, 11))
    _backdate(admin_dsn, old, long_ago)
    _backdate(admin_dsn, seen, long_ago, last_seen=now - timedelta(days=10))  # recognised lately: kept
    _backdate(admin_dsn, kept, long_ago)
    r = gdpr_client.patch(f"/v1/subjects/{consent}", json={"retain_until": (now - timedelta(days=1)).isoformat()},
                          headers=staff_headers)
    assert r.status_code == 200, r.text
    r = gdpr_client.patch(f"/v1/subjects/{kept}", json={"retain_until": (now + timedelta(days=365)).isoformat()},
                          headers=staff_headers)
    assert r.status_code == 200 and r.json()["retain_until"] is not None and r.json()["label"] == "Person 10"
    mine = [old, seen, consent, kept, fresh]

    expired, jobs = sweep_subjects(state, now=now, dry_run=True)
    assert {str(e.subject_id) for e in expired} & set(mine) == {old, consent}
    assert jobs == [] and set(_states(admin_dsn, mine).values()) == {"active"}  # a dry run changes nothing
    reasons = {str(e.subject_id): e.reason for e in expired}
    assert "more than 730 days" in reasons[old] and "retain_until" in reasons[consent]

    expired, jobs = sweep_subjects(state, now=now)
    assert {str(j["subject_id"]) for j in jobs} == {str(e.subject_id) for e in expired}
    assert {str(j["subject_id"]) for j in jobs} & set(mine) == {old, consent}
    for job in jobs:
        assert job["state"] == "done"
        assert verify_receipt(job["receipt"], job["receipt_signature"], public_key_pem)
        assert job["receipt"]["requested_by"] == "system:retention"
    assert _states(admin_dsn, mine) == {old: "erased", consent: "erased", seen: "active", kept: "active",
                                        fresh: "active"}
    with psycopg.connect(admin_dsn) as conn:
        reasons_audited = conn.execute("SELECT subject_id::text FROM audit_log WHERE action = 'subject.expire' "
                                       "AND subject_id = ANY(%s::uuid[])", (mine,)).fetchall()
    assert {r[0] for r in reasons_audited} == {old, consent}


def test_the_dry_run_command_lists_who_and_why_and_changes_nothing(stack, admin_dsn, make_subject) -> None:
    sid = make_subject(person=12, n=1, photo=False)["id"]
    _backdate(admin_dsn, sid, datetime.now(UTC) - timedelta(days=1000))
    env = {**os.environ, "APPLIANCE_CONFIG": str(stack.config_file)}
    out = subprocess.run([sys.executable, "-m", "appliance", "retention", "sweep", "--dry-run"], env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    line = next(x for x in out.stdout.splitlines() if sid in x)
    assert "would be erased" in line and "more than 730 days" in line
    assert "visits: would drop" in out.stdout
    assert _states(admin_dsn, [sid]) == {sid: "active"}


def test_retain_until_is_validated_and_can_be_cleared(gdpr_client, staff_headers, make_subject) -> None:
    sid = make_subject(person=13, n=1, photo=False)["id"]
    for body in ({}, {"retain_until": "2030-01-01T00:00:00"}, {"retain_until": 1900000000},
                 {"retain_until": "soon"}, {"colour": "red"}):
        r = gdpr_client.patch(f"/v1/subjects/{sid}", json=body, headers=staff_headers)
        assert r.status_code == 422, (body, r.text)
        assert r.headers["content-type"].startswith("application/problem+json")
    r = gdpr_client.patch(f"/v1/subjects/{sid}", json={"retain_until": "2030-01-01T00:00:00Z"}, headers=staff_headers)
    assert r.json()["retain_until"].startswith("2030-01-01") and r.json()["label"] == "Person 13"
    r = gdpr_client.patch(f"/v1/subjects/{sid}", json={"retain_until": None}, headers=staff_headers)
    assert r.status_code == 200 and r.json()["retain_until"] is None


def test_the_sweep_drops_old_visit_days_and_audits_both_retentions(stack, state, admin_dsn, monkeypatch) -> None:
    from appliance.commands.retention import _expire_faces_and_visits
    from appliance.visits.recorder import VisitRecorder

    old = datetime.now(UTC) - timedelta(days=45)
    rec = VisitRecorder(state.pool)
    rec.record("door-old", None, "unknown", None, 0.2, old.timestamp(), old.timestamp())
    rec.write_once()
    monkeypatch.setenv("APPLIANCE_CONFIG", str(stack.config_file))
    _expire_faces_and_visits(dry_run=False)
    with psycopg.connect(admin_dsn) as conn:
        assert conn.execute("SELECT to_regclass(%s)", (f"visits_{old:%Y%m%d}",)).fetchone()[0] is None
        dropped = conn.execute("SELECT details FROM audit_log WHERE action = 'visits.retention' "
                               "ORDER BY ts DESC LIMIT 1").fetchone()[0]
        swept = conn.execute("SELECT details FROM audit_log WHERE action = 'subject.retention' "
                             "ORDER BY ts DESC LIMIT 1").fetchone()[0]
    assert f"visits_{old:%Y%m%d}" in dropped["dropped"] and dropped["days"] == 30
    assert swept["dry_run"] is False and swept["subject_retention_days"] == 730
