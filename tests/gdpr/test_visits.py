"""Visits against the real stack: one row per passage across workers, the timeline and its counts,
bad filters as 422 problems, erasure removes them (and the receipt counts them), the export has them."""

from __future__ import annotations

import io
import json
import uuid
import zipfile
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest

from appliance.visits import queries
from appliance.visits.recorder import VisitRecorder


def _hours_ago(days: int) -> datetime:
    """A past hour no other test of this file uses (each test picks its own day)."""
    return datetime.now(UTC).replace(minute=0, second=0, microsecond=0) - timedelta(days=days)


def _write(state: Any, passages: list[tuple[Any, ...]]) -> None:
    """(camera, track, decision, subject uuid|None, similarity, first datetime, last datetime) -> visits."""
    rec = VisitRecorder(state.pool)
    for cam, track, decision, subject, sim, first, last in passages:
        rec.record(cam, track, decision, uuid.UUID(subject).bytes if subject else None, sim,
                   first.timestamp(), last.timestamp())
    rec.write_once()
    assert not rec._pending  # written, not put back


def _rows(admin_dsn: str, where: str, params: tuple[Any, ...]) -> list[tuple[Any, ...]]:
    with psycopg.connect(admin_dsn) as conn:
        return conn.execute(f"SELECT camera_id, track_id, first_seen, last_seen, decision, subject_id, frames, "
                            f"similarity FROM visits WHERE {where} ORDER BY first_seen", params).fetchall()


@pytest.fixture(scope="module")
def audit_headers(make_key):  # type: ignore[no-untyped-def]
    return make_key("audit", name="visits-reader")


def test_frames_of_one_track_on_two_workers_make_one_visit(state, admin_dsn, make_subject) -> None:
    subject = make_subject(person=2, n=1, photo=False)
    cam = f"door-{uuid.uuid4().hex[:8]}"
    t0 = _hours_ago(1) + timedelta(minutes=3)
    worker_a, worker_b = VisitRecorder(state.pool), VisitRecorder(state.pool)
    for i in range(3):  # frames 0, 2, 4 on worker A, 1, 3 on worker B; B decides "match" on its last frame
        ts = (t0 + timedelta(seconds=2 * i)).timestamp()
        worker_a.record(cam, "17", "unknown", None, 0.5, t0.timestamp(), ts)
    for i in range(2):
        ts = (t0 + timedelta(seconds=2 * i + 1)).timestamp()
        decided = i == 1
        worker_b.record(cam, "17", "match" if decided else "unknown",
                        uuid.UUID(subject["id"]).bytes if decided else None, 0.97 if decided else 0.6,
                        t0.timestamp() + 1, ts)
    worker_a.write_once()
    worker_b.write_once()
    worker_a.record(cam, "17", "unknown", None, 0.4, t0.timestamp(), t0.timestamp() + 6)  # a later flush of A
    worker_a.write_once()
    rows = _rows(admin_dsn, "camera_id = %s", (cam,))
    assert len(rows) == 1, rows
    _, track, first, last, decision, sid, frames, sim = rows[0]
    assert (track, decision, str(sid), frames) == ("17", "match", subject["id"], 6)
    assert first == t0 and last == t0 + timedelta(seconds=6)
    assert sim == pytest.approx(0.97)
    with psycopg.connect(admin_dsn) as conn:  # the last accepted match moved, in the same batch
        seen = conn.execute("SELECT last_seen_at FROM subjects WHERE id = %s", (subject["id"],)).fetchone()[0]
    assert seen == t0 + timedelta(seconds=3)


def test_each_match_without_a_track_is_its_own_visit(state, admin_dsn) -> None:
    cam = f"door-{uuid.uuid4().hex[:8]}"
    t0 = _hours_ago(2)
    _write(state, [(cam, None, "unknown", None, 0.3, t0, t0), (cam, None, "unknown", None, 0.2, t0, t0)])
    rows = _rows(admin_dsn, "camera_id = %s", (cam,))
    assert [r[6] for r in rows] == [1, 1] and all(r[1] is None for r in rows)


def test_a_passage_naming_a_subject_being_erased_is_kept_as_unknown(state, admin_dsn, make_subject) -> None:
    subject = make_subject(person=3, n=1, photo=False)
    with psycopg.connect(admin_dsn) as conn:
        conn.execute("UPDATE subjects SET state = 'erasing' WHERE id = %s", (subject["id"],))
    cam = f"door-{uuid.uuid4().hex[:8]}"
    t0 = _hours_ago(3)
    try:
        _write(state, [(cam, "1", "match", subject["id"], 0.99, t0, t0)])
    finally:
        with psycopg.connect(admin_dsn) as conn:
            conn.execute("UPDATE subjects SET state = 'active' WHERE id = %s", (subject["id"],))
    assert [(r[4], r[5]) for r in _rows(admin_dsn, "camera_id = %s", (cam,))] == [("unknown", None)]


def test_the_timeline_pages_newest_first_and_filters(gdpr_client, state, audit_headers, make_subject) -> None:
    subject = make_subject(person=4, n=1, photo=False)
    cam, other = f"door-{uuid.uuid4().hex[:8]}", f"gate-{uuid.uuid4().hex[:8]}"
    t0 = _hours_ago(4)
    passages = [(cam if i % 3 else other, f"t{i}", "match" if i % 4 == 0 else "unknown",
                 subject["id"] if i % 4 == 0 else None, 0.5, t0 + timedelta(minutes=i),
                 t0 + timedelta(minutes=i, seconds=5)) for i in range(11)]
    _write(state, passages)
    window = {"from": t0.isoformat(), "to": (t0 + timedelta(hours=1)).isoformat()}
    seen: list[dict[str, Any]] = []
    cursor = None
    for _ in range(10):
        params = {**window, "camera_id": cam, "limit": 3, **({"cursor": cursor} if cursor else {})}
        r = gdpr_client.get("/v1/visits", params=params, headers=audit_headers)
        assert r.status_code == 200, r.text
        seen += r.json()["items"]
        cursor = r.json()["next_cursor"]
        if cursor is None:
            break
    want = sorted((p for p in passages if p[0] == cam), key=lambda p: p[5], reverse=True)
    assert [v["track_id"] for v in seen] == [p[1] for p in want]
    r = gdpr_client.get("/v1/visits", params={**window, "subject_id": subject["id"]}, headers=audit_headers)
    assert sorted(v["track_id"] for v in r.json()["items"]) == sorted(p[1] for p in passages if p[3])
    r = gdpr_client.get("/v1/visits", params={**window, "camera_id": other, "decision": "unknown"},
                        headers=audit_headers)
    assert {v["track_id"] for v in r.json()["items"]} == {p[1] for p in passages if p[0] == other and not p[3]}
    assert all(v["subject_id"] is None for v in r.json()["items"])  # unknown visitors stay unknown


def _expected(passages: list[tuple[Any, ...]], lo: datetime, hi: datetime, interval: str, dim: int,
              keys: set[Any]) -> Counter:
    out: Counter = Counter()
    for p in passages:
        if lo <= p[5] < hi and p[dim] in keys:
            start = p[5].replace(minute=0) if interval == "hour" else p[5].replace(hour=0, minute=0)
            out[(start, p[dim])] += 1
    return out


def _got(body: dict[str, Any], keys: set[Any]) -> Counter:
    return Counter({(datetime.fromisoformat(b["start"]), b["key"]): b["visits"]
                    for b in body["buckets"] if b["key"] in keys})


def test_summary_counts_from_roll_up_and_raw_edges_and_erasure_removes_visits(
        gdpr_client, state, admin_dsn, audit_headers, admin_headers, make_subject) -> None:
    subject = make_subject(person=5, n=1, photo=False)
    cams = [f"door-{uuid.uuid4().hex[:8]}", f"gate-{uuid.uuid4().hex[:8]}"]
    t0 = _hours_ago(6)
    passages = [(cams[i % 2], f"s{i}", "match" if i % 3 == 0 else "unknown", subject["id"] if i % 3 == 0 else None,
                 0.7, t0 + timedelta(minutes=17 * i), t0 + timedelta(minutes=17 * i, seconds=3)) for i in range(12)]
    _write(state, passages)
    lo, hi = t0 + timedelta(minutes=30), t0 + timedelta(hours=3)  # partial first hour: always counted raw
    for rolled_up in (False, True):  # counted from visits, then from the writer's roll-up: the same answers
        if rolled_up:
            with state.pool.connection() as conn:  # (the app's writer may have done some already)
                queries.roll_up(conn, t0 + timedelta(hours=1), hi)
                assert conn.execute("SELECT count(*) FROM visit_rollup_hours WHERE hour >= %s AND hour < %s",
                                    (t0 + timedelta(hours=1), hi)).fetchone()[0] == 2
        for interval in ("hour", "day"):
            for group_by, dim, keys in (("camera", 0, set(cams)), ("subject", 3, {subject["id"]})):
                r = gdpr_client.get("/v1/visits/summary", params={"from": lo.isoformat(), "to": hi.isoformat(),
                                    "interval": interval, "group_by": group_by}, headers=audit_headers)
                assert r.status_code == 200, r.text
                want = _expected(passages, lo, hi, interval, dim, keys)
                assert _got(r.json(), keys) == want, (rolled_up, interval, group_by)

    r = gdpr_client.delete(f"/v1/subjects/{subject['id']}", headers=admin_headers)
    assert r.status_code == 200, r.text
    assert r.json()["receipt"]["destroyed"]["visits"] == sum(1 for p in passages if p[3])
    assert _rows(admin_dsn, "subject_id = %s", (subject["id"],)) == []
    r = gdpr_client.get("/v1/visits/summary", params={"from": lo.isoformat(), "to": hi.isoformat(),
                        "group_by": "camera"}, headers=audit_headers)
    remaining = [p for p in passages if not p[3]]
    assert _got(r.json(), set(cams)) == _expected(remaining, lo, hi, "hour", 0, set(cams))  # roll-up recounted


def test_the_access_export_includes_the_subjects_visits(gdpr_client, state, admin_headers, make_subject) -> None:
    subject = make_subject(person=6, n=1, photo=False)
    cam = f"door-{uuid.uuid4().hex[:8]}"
    t0 = _hours_ago(7)
    _write(state, [(cam, "a", "match", subject["id"], 0.95, t0, t0 + timedelta(seconds=4)),
                   (cam, "b", "unknown", None, 0.2, t0, t0)])
    r = gdpr_client.get(f"/v1/subjects/{subject['id']}/export", headers=admin_headers)
    assert r.status_code == 200, r.text
    with zipfile.ZipFile(io.BytesIO(r.content)) as zf:
        visits = json.loads(zf.read("visits.json"))
        assert "visits.json" in json.loads(zf.read("manifest.json"))["files"]
    assert [(v["camera_id"], v["track_id"], v["subject_id"]) for v in visits] == [(cam, "a", subject["id"])]


@pytest.mark.parametrize(("path", "params"), [
    ("/v1/visits", {"from": "2026-03-02T00:00:00Z", "to": "2026-03-01T00:00:00Z"}),
    ("/v1/visits", {"from": "2024-01-01T00:00:00Z", "to": "2026-03-01T00:00:00Z"}),
    ("/v1/visits", {"from": "1700000000"}),
    ("/v1/visits", {"to": "2026-03-01T00:00:00"}),
    ("/v1/visits", {"limit": "0"}),
    ("/v1/visits", {"limit": "1001"}),
    ("/v1/visits", {"decision": "maybe"}),
    ("/v1/visits", {"subject_id": "not-a-uuid"}),
    ("/v1/visits", {"cursor": "garbage"}),
    ("/v1/visits", {"camera_id": "a\x00b"}),
    ("/v1/visits/summary", {"interval": "week"}),
    ("/v1/visits/summary", {"group_by": "colour"}),
    ("/v1/visits/summary", {"interval": "hour", "from": "2026-01-01T00:00:00Z", "to": "2026-02-02T00:00:00Z"}),
    ("/v1/visits/summary", {"from": "2026-03-02T00:00:00Z", "to": "2026-03-01T00:00:00Z"}),
])
def test_bad_filters_are_422_problems(gdpr_client, audit_headers, path: str, params: dict[str, str]) -> None:
    r = gdpr_client.get(path, params=params, headers=audit_headers)
    assert r.status_code == 422, r.text
    assert r.headers["content-type"].startswith("application/problem+json")


def test_visits_need_the_audit_scope_and_reads_are_audited(gdpr_client, make_key, admin_dsn, audit_headers) -> None:
    assert gdpr_client.get("/v1/visits", headers=make_key("match", "enroll")).status_code == 403
    cam = f"door-{uuid.uuid4().hex[:8]}"
    assert gdpr_client.get("/v1/visits", params={"camera_id": cam}, headers=audit_headers).status_code == 200
    with psycopg.connect(admin_dsn) as conn:
        n = conn.execute("SELECT count(*) FROM audit_log WHERE action = 'visits.list' "
                         "AND details -> 'filters' ->> 'camera_id' = %s", (cam,)).fetchone()[0]
    assert n == 1


def test_retention_drops_whole_old_days_and_keeps_recent_ones(state, admin_dsn) -> None:
    cam = f"door-{uuid.uuid4().hex[:8]}"
    old, recent = _hours_ago(40), _hours_ago(8)
    _write(state, [(cam, "old", "unknown", None, 0.1, old, old), (cam, "new", "unknown", None, 0.1, recent, recent)])
    now = datetime.now(UTC)
    cutoff = queries.retention_cutoff(now, 30)
    with state.pool.connection() as conn, conn.transaction():
        due = queries.partitions_due(conn, cutoff)
        assert f"visits_{old:%Y%m%d}" in due and f"visits_{recent:%Y%m%d}" not in due
        assert queries.drop_expired(conn, cutoff) == due
        assert queries.partitions_due(conn, cutoff) == []
    assert [r[1] for r in _rows(admin_dsn, "camera_id = %s", (cam,))] == ["new"]


def test_the_writer_rolls_up_closed_hours_and_a_late_write_invalidates_its_hour(state, admin_dsn) -> None:
    cam = f"door-{uuid.uuid4().hex[:8]}"
    t0 = _hours_ago(9)
    rec = VisitRecorder(state.pool, retention_days=30)
    rec.record(cam, None, "unknown", None, 0.1, t0.timestamp(), t0.timestamp())
    rec.write_once()
    for _ in range(40):  # a day per round, newest first, until the test's hour is reached
        if rec.roll_up_closed_hours() == 0:
            break

    def rolled() -> int:
        with psycopg.connect(admin_dsn) as conn:
            return conn.execute("SELECT count(*) FROM visit_rollup_hours WHERE hour = %s", (t0,)).fetchone()[0]

    assert rolled() == 1
    rec.record(cam, None, "unknown", None, 0.1, t0.timestamp() + 60, t0.timestamp() + 60)  # late
    rec.write_once()
    assert rolled() == 0  # recounted on the next round; until then summaries count it from visits


def test_matches_become_visits_one_per_track_and_one_per_untracked_match(
        gdpr_client, state, admin_dsn, staff_headers, make_subject) -> None:
    subject = make_subject(person=14, n=3, photo=False)
    cam = f"door-{uuid.uuid4().hex[:8]}"
    frames = subject["vectors"][:3].tolist()
    for vector in frames:  # three frames of one passer-by
        r = gdpr_client.post("/v1/match", json={"model": "dlib-resnet-v1", "embedding": vector, "camera_id": cam,
                                                "track_id": "track-1"}, headers=staff_headers)
        assert r.status_code == 200, r.text
    for vector in frames[:2]:  # two matches without a track
        r = gdpr_client.post("/v1/match", json={"model": "dlib-resnet-v1", "embedding": vector, "camera_id": cam},
                             headers=staff_headers)
        assert r.status_code == 200 and r.json()["decision"] == "match", r.text
    assert state.visits.flush(10)
    rows = _rows(admin_dsn, "camera_id = %s", (cam,))
    tracked = [r for r in rows if r[1] == "track-1"]
    assert len(tracked) == 1 and tracked[0][6] == 3 and str(tracked[0][5]) == subject["id"]
    assert tracked[0][4] == "match"
    assert sorted(r[6] for r in rows if r[1] is None) == [1, 1]


def test_daily_summaries_read_the_daily_roll_up_and_an_erasure_invalidates_it(
        gdpr_client, state, admin_dsn, audit_headers, admin_headers, make_subject) -> None:
    subject = make_subject(person=15, n=1, photo=False)
    cam = f"door-{uuid.uuid4().hex[:8]}"
    midnight = _hours_ago(10).replace(hour=0)
    passages = [(cam, f"d{i}", "match" if i % 2 else "unknown", subject["id"] if i % 2 else None, 0.8,
                 midnight + timedelta(hours=2 * i, minutes=5), midnight + timedelta(hours=2 * i, minutes=6))
                for i in range(12)]
    _write(state, passages)
    day = midnight.date()
    with state.pool.connection() as conn:
        queries.roll_up(conn, midnight, midnight + timedelta(days=1))
        queries.roll_up_days(conn, day, day)
        assert conn.execute("SELECT count(*) FROM visit_rollup_days_done WHERE day = %s", (day,)).fetchone()[0] == 1
    window = {"from": (midnight - timedelta(hours=3)).isoformat(),
              "to": (midnight + timedelta(days=1, hours=2)).isoformat(), "interval": "day"}

    def by(group_by: str, keys: set[Any]) -> Counter:
        r = gdpr_client.get("/v1/visits/summary", params={**window, "group_by": group_by}, headers=audit_headers)
        assert r.status_code == 200, r.text
        return _got(r.json(), keys)

    assert by("camera", {cam}) == Counter({(midnight, cam): 12})
    assert by("subject", {subject["id"]}) == Counter({(midnight, subject["id"]): 6})
    r = gdpr_client.delete(f"/v1/subjects/{subject['id']}", headers=admin_headers)
    assert r.status_code == 200, r.text
    with psycopg.connect(admin_dsn) as conn:
        assert conn.execute("SELECT count(*) FROM visit_rollup_days_done WHERE day = %s", (day,)).fetchone()[0] == 0
    assert by("camera", {cam}) == Counter({(midnight, cam): 6})
    assert by("subject", {subject["id"]}) == Counter()


def test_the_cli_lists_and_counts_visits_as_json_and_refuses_bad_filters(stack, state) -> None:
    import os
    import subprocess
    import sys

    cam = f"door-{uuid.uuid4().hex[:8]}"
    t0 = _hours_ago(11)
    _write(state, [(cam, "c1", "unknown", None, 0.4, t0, t0), (cam, "c2", "unknown", None, 0.4,
                                                                 t0 + timedelta(minutes=1), t0 + timedelta(minutes=1))])
    env = {**os.environ, "APPLIANCE_CONFIG": str(stack.config_file)}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "appliance", "visits", *args], env=env, capture_output=True,
                              text=True, timeout=120)

    window = ["--from", t0.isoformat(), "--to", (t0 + timedelta(hours=1)).isoformat()]
    out = cli("list", *window, "--camera-id", cam, "--json")
    assert out.returncode == 0, out.stderr
    assert [v["track_id"] for v in json.loads(out.stdout)["items"]] == ["c2", "c1"]
    out = cli("summary", *window, "--group-by", "camera", "--json")
    assert out.returncode == 0, out.stderr
    assert [b["visits"] for b in json.loads(out.stdout)["buckets"] if b["key"] == cam] == [2]
    out = cli("list", *window, "--camera-id", cam)
    assert out.returncode == 0 and out.stdout.count(cam) == 2 and out.stdout.splitlines()[0].startswith("first_seen")
    assert cli("summary", "--interval", "week").returncode == 2
    assert cli("list", "--from", "2026-03-02T00:00:00Z", "--to", "2026-03-01T00:00:00Z").returncode == 2
