"""Media API against the real stack: images, metadata stripping, sealing at rest, errors, delete."""

from __future__ import annotations

import hashlib
import io
import uuid

import psycopg
import pytest
from PIL import Image

from tests.media import samples


def _upload(client, headers, body: bytes, **params):  # type: ignore[no-untyped-def]
    return client.post("/v1/media", params=params, content=body,
                       headers={**headers, "Content-Type": "application/octet-stream"})


def _row(admin_dsn: str, media_id: str) -> tuple | None:  # type: ignore[type-arg]
    with psycopg.connect(admin_dsn) as conn:
        return conn.execute("SELECT object_key, kind, wrapped_dek IS NOT NULL FROM media WHERE id = %s",
                            (media_id,)).fetchone()


def test_image_round_trip_serves_exactly_the_stored_plaintext(client, media_headers):
    original = samples.jpeg()
    r = _upload(client, media_headers, original, camera_id="cam-1")
    assert r.status_code == 201, r.text
    info = r.json()
    assert info["kind"] == "image" and info["content_type"] == "image/jpeg"
    assert info["thumbnails"] == [128, 256] and (info["width"], info["height"]) == (640, 480)
    got = client.get(f"/v1/media/{info['id']}", headers=media_headers)
    assert got.status_code == 200
    assert got.headers["content-type"] == "image/jpeg"
    assert hashlib.sha256(got.content).hexdigest() == info["sha256"] and len(got.content) == info["size_bytes"]
    # Lossless strip: the pixels are exactly those of the upload.
    assert Image.open(io.BytesIO(got.content)).tobytes() == Image.open(io.BytesIO(original)).tobytes()


def test_exif_gps_and_comments_are_gone_from_what_is_served(client, media_headers):
    original = samples.jpeg(gps=True)
    assert Image.open(io.BytesIO(original)).getexif().get_ifd(0x8825)
    media_id = _upload(client, media_headers, original).json()["id"]
    served = client.get(f"/v1/media/{media_id}", headers=media_headers).content
    im = Image.open(io.BytesIO(served))
    assert not im.getexif() and "comment" not in im.info and "xmp" not in im.info
    for needle in (b"Exif\0\0", b"ACME", b"SERIAL-0042", b"52.52N", b"http://ns.adobe.com/xap"):
        assert needle not in served


def test_rotated_jpeg_is_stored_upright_without_exif(client, media_headers):
    # Orientation 6: the camera was turned 90°; the served image must look the same, without the tag.
    info = _upload(client, media_headers, samples.jpeg(orientation=6)).json()
    assert (info["width"], info["height"]) == (480, 640)
    served = Image.open(io.BytesIO(client.get(f"/v1/media/{info['id']}", headers=media_headers).content))
    assert served.size == (480, 640) and not served.getexif()


def test_png_and_webp_are_accepted_and_stripped(client, media_headers):
    for body, ctype in ((samples.png(gps=True), "image/png"), (samples.webp(), "image/webp")):
        info = _upload(client, media_headers, body).json()
        assert info["content_type"] == ctype
        served = client.get(f"/v1/media/{info['id']}", headers=media_headers)
        assert served.headers["content-type"] == ctype
        assert not Image.open(io.BytesIO(served.content)).getexif()


def _stored(admin_dsn: str, media_id: str) -> list[tuple]:  # type: ignore[type-arg]
    """(kind, object_key, sealed) of a media row and its thumbnails, parent first."""
    with psycopg.connect(admin_dsn) as conn:
        return conn.execute("SELECT kind, object_key, sealed FROM media WHERE id = %s OR parent_id = %s "
                            "ORDER BY parent_id NULLS FIRST, thumb_size", (media_id, media_id)).fetchall()


def test_raw_objects_in_the_bucket_and_rows_contain_none_of_the_plaintext(client, media_headers, media_store,
                                                                         admin_dsn):
    info = _upload(client, media_headers, samples.jpeg()).json()
    plaintext = client.get(f"/v1/media/{info['id']}", headers=media_headers).content
    thumbs = [client.get(f"/v1/media/{info['id']}/thumbnail", params={"size": size}, headers=media_headers).content
              for size in (128, 256)]
    stored = _stored(admin_dsn, info["id"])
    # One object (the image) in the bucket; each thumbnail sealed in its own row, no object.
    assert [(kind, key is None, sealed is None) for kind, key, sealed in stored] == [
        ("image", False, True), ("thumbnail", True, False), ("thumbnail", True, False)]
    key = stored[0][1]
    assert key.startswith("captures/") and key.endswith(info["id"])  # captures/YYYY/MM/DD/<uuid> only
    for raw in [media_store.read(key), *(bytes(sealed) for _, _, sealed in stored[1:])]:
        for pt in (plaintext, *thumbs):
            for start in range(0, len(pt) - 32, max(1, len(pt) // 16)):
                assert pt[start : start + 32] not in raw
        assert b"JFIF" not in raw and b"WEBP" not in raw


def test_a_thumbnail_sealed_in_its_row_opens_only_in_that_row(client, media_headers, admin_dsn):
    """The AEAD binds the sealed bytes to the row's id: copied onto another thumbnail they fail to open."""
    a, b = (_upload(client, media_headers, samples.jpeg(samples.photo(seed=seed))).json()["id"] for seed in (1, 2))
    with psycopg.connect(admin_dsn) as conn:
        conn.execute("UPDATE media SET sealed = (SELECT sealed FROM media WHERE parent_id = %s AND thumb_size = 128) "
                     "WHERE parent_id = %s AND thumb_size = 128", (a, b))
    assert client.get(f"/v1/media/{a}/thumbnail", params={"size": 128}, headers=media_headers).status_code == 200
    r = client.get(f"/v1/media/{b}/thumbnail", params={"size": 128}, headers=media_headers)
    assert r.status_code == 500 and r.headers["content-type"] == "application/problem+json"


def test_thumbnails_stored_as_objects_before_migration_0005_are_still_served(client, media_headers, media_store,
                                                                           admin_dsn):
    """Rows written before thumbnails moved into the database keep their objects; reads and delete find them."""
    media_id = _upload(client, media_headers, samples.jpeg()).json()["id"]
    served = client.get(f"/v1/media/{media_id}/thumbnail", params={"size": 256}, headers=media_headers).content
    key = f"captures/2025/01/01/{uuid.uuid4()}"
    with psycopg.connect(admin_dsn) as conn:  # move the sealed bytes out, as the old code stored them
        (sealed,) = conn.execute("SELECT sealed FROM media WHERE parent_id = %s AND thumb_size = 256",
                                 (media_id,)).fetchone()
        media_store.put_bytes(key, bytes(sealed))
        conn.execute("UPDATE media SET object_key = %s, sealed = NULL WHERE parent_id = %s AND thumb_size = 256",
                     (key, media_id))
    again = client.get(f"/v1/media/{media_id}/thumbnail", params={"size": 256}, headers=media_headers)
    assert again.status_code == 200 and again.content == served
    assert client.delete(f"/v1/media/{media_id}", headers=media_headers).status_code == 204
    assert media_store.versions(key) == []


def test_a_media_row_stores_its_bytes_in_exactly_one_place(client, media_headers, admin_dsn):
    media_id = _upload(client, media_headers, samples.jpeg()).json()["id"]
    with psycopg.connect(admin_dsn) as conn:
        for stmt in ("UPDATE media SET sealed = NULL WHERE parent_id = %s",  # nowhere
                     "UPDATE media SET object_key = 'captures/x' WHERE parent_id = %s",  # both
                     "UPDATE media SET object_key = NULL, sealed = '\\x00' WHERE id = %s"):  # not a thumbnail
            with pytest.raises(psycopg.errors.CheckViolation):
                conn.execute(stmt, (media_id,))
            conn.rollback()


def test_thumbnails_are_webp_within_their_size(client, media_headers):
    media_id = _upload(client, media_headers, samples.jpeg()).json()["id"]
    for size in (128, 256):
        r = client.get(f"/v1/media/{media_id}/thumbnail", params={"size": size}, headers=media_headers)
        assert r.status_code == 200 and r.headers["content-type"] == "image/webp"
        im = Image.open(io.BytesIO(r.content))
        assert im.format == "WEBP" and max(im.size) == size
    assert client.get(f"/v1/media/{media_id}/thumbnail", params={"size": 64}, headers=media_headers).status_code == 422


def test_multipart_upload_takes_fields_from_the_form(client, media_headers):
    captured = "2026-01-02T03:04:05+00:00"
    r = client.post("/v1/media", headers=media_headers,
                    files={"file": ("x.bin", samples.jpeg(), "application/octet-stream")},
                    data={"camera_id": "gate-2", "captured_at": captured})
    assert r.status_code == 201, r.text
    info = r.json()
    assert info["camera_id"] == "gate-2" and info["captured_at"].startswith("2026-01-02T03:04:05")
    assert info["expires_at"].startswith("2026-02-01T03:04:05")  # images: 30 days after capture


def _problem(r, status: int) -> dict:  # type: ignore[no-untyped-def, type-arg]
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/problem+json"
    body = r.json()
    assert body["status"] == status and body["detail"]
    return body  # type: ignore[no-any-return]


def test_bad_uploads_get_clear_problem_documents(client, media_headers):
    jpeg = samples.jpeg()
    assert "JPEG" in _problem(_upload(client, media_headers, b"%PDF-1.7\n" + b"x" * 100), 415)["detail"]
    _problem(_upload(client, media_headers, jpeg[: len(jpeg) // 2]), 422)  # truncated
    _problem(_upload(client, media_headers, b"\xff\xd8\xff\xd9"), 422)  # a JPEG with no image in it
    png = samples.png()
    _problem(_upload(client, media_headers, png[: len(png) - 100]), 422)  # truncated PNG
    assert "bomb" in _problem(_upload(client, media_headers, samples.bomb_png()), 413)["detail"]
    assert "pixel" in _problem(_upload(client, media_headers, samples.bomb_png(8000)), 413)["detail"]
    _problem(_upload(client, media_headers, jpeg, kind="clip"), 422)  # kind does not match content
    _problem(_upload(client, media_headers, jpeg, kind="enrolment"), 422)  # enrolment needs a subject
    _problem(_upload(client, media_headers, b"\x00\x00\x00\x18ftypheic" + b"\x00" * 100), 415)
    _problem(_upload(client, media_headers, jpeg, captured_at="yesterday"), 422)


def test_oversize_image_is_refused_with_413(client, media_headers):
    big = samples.jpeg(samples.photo(4000, 3000), quality=100)
    limit = client.app.state.appliance.media.limits.image_bytes
    assert len(big) < limit  # the cap below is what refuses it
    service = client.app.state.appliance.media
    old = service.limits
    from dataclasses import replace

    service.limits = replace(old, image_bytes=len(big) - 1)
    try:
        _problem(_upload(client, media_headers, big), 413)
    finally:
        service.limits = old


def test_media_needs_the_media_scope(client, make_key):
    match_only = make_key("match")
    assert client.post("/v1/media", content=samples.jpeg(), headers=match_only).status_code == 403
    assert client.get(f"/v1/media/{uuid.uuid4()}").status_code == 401


def test_delete_removes_every_object_version(client, media_headers, media_store, admin_dsn):
    media_id = _upload(client, media_headers, samples.jpeg()).json()["id"]
    keys = [key for _, key, _ in _stored(admin_dsn, media_id) if key is not None]
    # A second version and a delete marker: what a careless overwrite or plain DELETE would leave behind.
    media_store.put_bytes(keys[0], b"second version")
    media_store.client.remove_object(media_store.bucket, keys[0])
    assert len(media_store.versions(keys[0])) == 3
    assert client.delete(f"/v1/media/{media_id}", headers=media_headers).status_code == 204
    for key in keys:
        assert list(media_store.client.list_objects(media_store.bucket, prefix=key, include_version=True)) == []
    assert _row(admin_dsn, media_id) is None
    assert _stored(admin_dsn, media_id) == []  # the thumbnail rows, and the sealed bytes in them, went too
    assert client.get(f"/v1/media/{media_id}", headers=media_headers).status_code == 404
    assert client.delete(f"/v1/media/{media_id}", headers=media_headers).status_code == 404


def test_reads_and_deletes_are_audited_with_the_caller(client, media_headers, admin_dsn):
    media_id = _upload(client, media_headers, samples.jpeg()).json()["id"]
    client.get(f"/v1/media/{media_id}", headers={**media_headers, "X-Request-Id": "media-read-0001"})
    client.get(f"/v1/media/{media_id}/thumbnail", headers=media_headers)
    client.delete(f"/v1/media/{media_id}", headers=media_headers)
    with psycopg.connect(admin_dsn) as conn:
        rows = conn.execute("SELECT action, actor, request_id FROM audit_log WHERE object_id = %s ORDER BY ts",
                            (media_id,)).fetchall()
    actions = [a for a, _, _ in rows]
    assert actions.count("media.read") == 2 and "media.delete" in actions and "media.create" in actions
    assert all(actor.startswith("apikey:") for _, actor, _ in rows)
    assert ("media.read", rows[1][1], "media-read-0001") in rows


def test_listing_filters_and_pages_by_capture_time(client, media_headers):
    camera = f"cam-{uuid.uuid4().hex[:8]}"
    ids = []
    for day in range(1, 6):
        r = _upload(client, media_headers, samples.webp(), camera_id=camera, captured_at=f"2026-03-0{day}T12:00:00Z")
        ids.append(r.json()["id"])
    seen, cursor = [], None
    while True:
        params = {"camera_id": camera, "limit": 2, **({"cursor": cursor} if cursor else {})}
        page = client.get("/v1/media", params=params, headers=media_headers).json()
        seen += [i["id"] for i in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == ids
    window = client.get("/v1/media", headers=media_headers, params={
        "camera_id": camera, "from": "2026-03-02T00:00:00Z", "to": "2026-03-04T00:00:00Z"}).json()
    assert [i["id"] for i in window["items"]] == ids[1:3]
    assert window["items"][0]["thumbnails"] == [128, 256]
    assert client.get("/v1/media", params={"cursor": "garbage"}, headers=media_headers).status_code == 422
