"""Media linked to a subject: sealed with the subject's DEK (so the crypto-shred covers it), refused
once erasure has begun, and removed completely by the erasure hook ``delete_subject_media``."""

from __future__ import annotations

import uuid

import psycopg
import pytest

from media.retention import delete_subject_media
from tests.media import samples


@pytest.fixture
def subject(admin_dsn) -> uuid.UUID:  # type: ignore[no-untyped-def]
    sid = uuid.uuid4()
    with psycopg.connect(admin_dsn) as conn:
        conn.execute("INSERT INTO subjects (id) VALUES (%s)", (sid,))
    return sid


def _upload(client, headers, sid, body=None, **params):  # type: ignore[no-untyped-def]
    return client.post("/v1/media", params={"subject_id": str(sid), **params}, content=body or samples.jpeg(),
                       headers={**headers, "Content-Type": "application/octet-stream"})


def test_subject_media_uses_the_subject_key_and_is_shredded_with_it(client, media_headers, admin_dsn, subject):
    info = _upload(client, media_headers, subject).json()
    with psycopg.connect(admin_dsn) as conn:
        rows = conn.execute("SELECT wrapped_dek, subject_id FROM media WHERE id = %s OR parent_id = %s",
                            (info["id"], info["id"])).fetchall()
        assert len(rows) == 3 and all(w is None and s == subject for w, s in rows)
        assert client.get(f"/v1/media/{info['id']}", headers=media_headers).status_code == 200
        conn.execute("DELETE FROM subject_keys WHERE subject_id = %s", (subject,))  # the crypto-shred
    client.app.state.appliance.subject_keys.evict(subject)
    r = client.get(f"/v1/media/{info['id']}", headers=media_headers)
    assert r.status_code == 410 and r.headers["content-type"] == "application/problem+json"


def test_enrolment_crops_never_expire(client, media_headers, subject):
    info = _upload(client, media_headers, subject, kind="enrolment").json()
    assert info["kind"] == "enrolment" and info["expires_at"] is None


def test_no_media_for_unknown_or_erasing_subjects(client, media_headers, admin_dsn, subject):
    assert _upload(client, media_headers, uuid.uuid4()).status_code == 404
    with psycopg.connect(admin_dsn) as conn:
        conn.execute("UPDATE subjects SET state = 'erasing' WHERE id = %s", (subject,))
    assert _upload(client, media_headers, subject).status_code == 409


def test_delete_subject_media_removes_every_version_and_row(client, media_headers, settings, media_store, subject):
    ids = [_upload(client, media_headers, subject).json()["id"] for _ in range(2)]
    clip = client.post("/v1/media", params={"subject_id": str(subject)}, content=samples.mp4(100_000),
                       headers=media_headers).json()
    state = client.app.state.appliance
    with psycopg.connect(settings.database_url.get_secret_value()) as conn, conn.transaction():
        keys = delete_subject_media(state.media.store, conn, subject)
    assert len(keys) == 2 + 1  # one object per image and clip; thumbnails are sealed in their rows
    for key in keys:
        assert media_store.versions(key) == []
    with psycopg.connect(settings.database_url.get_secret_value()) as conn:
        left = conn.execute("SELECT count(*) FROM media WHERE subject_id = %s", (subject,)).fetchone()
        assert left == (0,)
        again = delete_subject_media(state.media.store, conn, subject)  # idempotent: a resumed erasure re-runs it
    assert again == []
    for media_id in [*ids, clip["id"]]:
        assert client.get(f"/v1/media/{media_id}", headers=media_headers).status_code == 404
