"""Retention sweep against the real stack: only expired media goes, every version, audited, re-runnable."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from datetime import UTC, datetime, timedelta

import psycopg
import pytest

from appliance.audit import AuditEvent
from appliance.audit.log import record_event
from media import records, retention
from tests.media import samples


def _upload(client, headers, body, captured: datetime, **params):  # type: ignore[no-untyped-def]
    r = client.post("/v1/media", params={"captured_at": captured.isoformat(), **params}, content=body,
                    headers={**headers, "Content-Type": "application/octet-stream"})
    assert r.status_code == 201, r.text
    return r.json()["id"]


def _audit(conn, action, subject_id, object_id, details):  # type: ignore[no-untyped-def]
    record_event(conn, AuditEvent(action, "cli:test", subject_id=subject_id, object_id=object_id, details=details))


def _keys(conn, media_id: str) -> list[str]:  # type: ignore[no-untyped-def]
    """Object keys of a media and its thumbnails (thumbnails in their rows have none)."""
    return [k for (k,) in conn.execute("SELECT object_key FROM media WHERE (id = %s OR parent_id = %s) "
                                       "AND object_key IS NOT NULL", (media_id, media_id))]


@pytest.fixture
def aged(client, media_headers, admin_dsn):  # type: ignore[no-untyped-def]
    """Two expired and three live media, with the object keys of each."""
    now = datetime.now(UTC)
    sid = uuid.uuid4()
    with psycopg.connect(admin_dsn) as conn:
        conn.execute("INSERT INTO subjects (id) VALUES (%s)", (sid,))
    ids = {
        "old_image": _upload(client, media_headers, samples.jpeg(), now - timedelta(days=31)),
        "old_clip": _upload(client, media_headers, samples.mp4(200_000), now - timedelta(days=8)),
        "new_image": _upload(client, media_headers, samples.jpeg(), now - timedelta(days=29)),
        "new_clip": _upload(client, media_headers, samples.mp4(200_000), now - timedelta(days=6)),
        "enrolment": _upload(client, media_headers, samples.jpeg(), now - timedelta(days=900),
                             kind="enrolment", subject_id=str(sid)),
    }
    with psycopg.connect(admin_dsn) as conn:
        keys = {name: _keys(conn, mid) for name, mid in ids.items()}
    return ids, keys


def test_sweep_removes_only_expired_media_with_every_version(app, client, aged, media_store, admin_dsn):
    ids, keys = aged
    media_store.put_bytes(keys["old_image"][0], b"an extra version")  # must go too
    seen: list[retention.SweepReport] = []
    report = retention.sweep(app.state.appliance.pool, media_store, _audit, batch_size=1,
                             progress=lambda r: seen.append(retention.SweepReport(**vars(r))))
    assert report.media >= 2 and report.batches >= 2 and seen[-1].media == report.media
    with psycopg.connect(admin_dsn) as conn:
        present = {name for name, mid in ids.items() if conn.execute(
            "SELECT 1 FROM media WHERE id = %s", (mid,)).fetchone()}
        audited = {r[0] for r in conn.execute(
            "SELECT object_id FROM audit_log WHERE action = 'media.expire' AND object_id = ANY(%s)",
            ([ids["old_image"], ids["old_clip"]],))}
    assert present == {"new_image", "new_clip", "enrolment"}
    with psycopg.connect(admin_dsn) as conn:  # thumbnails sealed in their rows go with their parent
        assert conn.execute("SELECT count(*) FROM media WHERE parent_id = %s", (ids["old_image"],)).fetchone() == (0,)
        assert conn.execute("SELECT count(*) FROM media WHERE parent_id = %s", (ids["new_image"],)).fetchone() == (2,)
    assert audited == {ids["old_image"], ids["old_clip"]}
    for name in ("old_image", "old_clip"):
        for key in keys[name]:
            assert media_store.versions(key) == []
    for name in ("new_image", "new_clip", "enrolment"):
        assert all(media_store.versions(k) for k in keys[name])


def test_sweep_finishes_what_a_crash_left_behind(app, client, media_headers, media_store, admin_dsn):
    """A crash after deleting the objects but before the rows: the next run removes the rows quietly."""
    mid = _upload(client, media_headers, samples.jpeg(), datetime.now(UTC) - timedelta(days=40))
    with psycopg.connect(admin_dsn) as conn:
        rows = records.with_thumbnails(conn, [uuid.UUID(mid)])
    retention.remove_objects(media_store, rows)
    state = app.state.appliance
    retention.sweep(state.pool, media_store, lambda *a: None)
    with psycopg.connect(admin_dsn) as conn:
        assert conn.execute("SELECT count(*) FROM media WHERE id = %s OR parent_id = %s", (mid, mid)).fetchone() == (0,)


def test_cli_sweep_runs_against_the_configured_stack(stack, client, media_headers, admin_dsn):
    mid = _upload(client, media_headers, samples.webp(), datetime.now(UTC) - timedelta(days=60))
    env = {**os.environ, "APPLIANCE_CONFIG": str(stack.config_file)}
    out = subprocess.run([sys.executable, "-m", "appliance", "retention", "sweep", "--batch-size", "50"],
                         env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "deleted" in out.stdout
    with psycopg.connect(admin_dsn) as conn:
        assert conn.execute("SELECT 1 FROM media WHERE id = %s", (mid,)).fetchone() is None
        assert conn.execute("SELECT 1 FROM audit_log WHERE action = 'retention.sweep'").fetchone()


def test_orphan_objects_without_rows_are_removed(app, client, media_store):
    """An upload that crashed between its S3 put and its row insert leaves a sealed object nobody references."""
    key = f"captures/{datetime.now(UTC):%Y/%m/%d}/{uuid.uuid4()}"
    media_store.put_bytes(key, b"sealed bytes of an upload that never got its row")
    retention.sweep_orphans(app.state.appliance.pool, media_store, grace=timedelta(hours=1))
    assert media_store.versions(key)  # within the grace period: an upload may still be inserting its row
    assert retention.sweep_orphans(app.state.appliance.pool, media_store, grace=timedelta(0)) >= 1
    assert media_store.versions(key) == []
