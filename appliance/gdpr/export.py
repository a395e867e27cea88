"""The access/portability export: one signed zip of everything the appliance holds about a subject.

Contents: ``subject.json`` (metadata, decrypted label), ``encodings.json`` (decrypted raw vectors),
``visits.json`` (every visit naming the subject), ``media/<id>.<ext>`` (decrypted captures and
thumbnails), ``audit.jsonl`` (every audit record naming
the subject, with its chain hashes), then ``manifest.json`` (SHA-256 of each file) and
``signature.json`` (Ed25519 over the manifest's canonical JSON, the key id and the public key PEM).

Decrypted data never touches the disk: the zip is streamed as it is written.
"""

from __future__ import annotations

import hashlib
import json
import uuid
import zipfile
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import numpy as np
from psycopg.rows import dict_row

from appliance.audit import AuditEvent
from appliance.audit.chain import canonical_json, ts_text
from appliance.audit.checkpoints import provider_key_id
from appliance.audit.export import records_of
from appliance.errors import Conflict
from appliance.gdpr import EXPORT_LOCK, SubjectNotFound
from appliance.state import AppState

MANIFEST_TYPE = "appliance-subject-export"
_EXT = {"image/jpeg": "jpg", "image/png": "png", "image/webp": "webp", "video/mp4": "mp4", "video/webm": "webm"}


class _Sink:
    """A write-only file for ZipFile (no seek/tell: zipfile then streams with data descriptors)."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []

    def write(self, data: bytes) -> int:
        self.parts.append(bytes(data))
        return len(data)

    def flush(self) -> None:
        pass

    def take(self) -> bytes:
        out, self.parts = b"".join(self.parts), []
        return out


def _subject_dek(state: AppState, conn: Any, subject_id: uuid.UUID) -> bytes | None:
    key = state.subject_keys.get(conn, subject_id, missing_ok=True)
    return None if key is None else key.dek


def access_archive(state: AppState, subject_id: uuid.UUID, actor: str, request_id: str | None) -> Iterator[bytes]:
    """Check, audit and gather (raising before any byte is sent), then return the zip stream.

    The subject's export lock is held until the stream ends, so an erasure waits for it (or answers
    409 after ``db_lock_timeout``) instead of deleting objects under a half-sent zip."""
    lock = _hold_export_lock(state, subject_id)
    try:
        with state.pool.connection() as conn, conn.transaction():
            _, meta, encodings, media, dek = _gather(state, conn, subject_id, actor, request_id)
    except BaseException:
        _release(state, lock)
        raise

    def stream() -> Iterator[bytes]:
        try:
            yield from _stream(state, subject_id, meta, encodings, media, dek)
        finally:
            _release(state, lock)

    return stream()


def _hold_export_lock(state: AppState, subject_id: uuid.UUID) -> Any:
    """A pooled connection holding the subject's export lock (shared) until the zip is streamed."""
    conn = state.pool.getconn()
    try:
        conn.autocommit = True
        held = conn.execute("SELECT pg_try_advisory_lock_shared(%s, hashtext(%s))",
                            (EXPORT_LOCK, str(subject_id))).fetchone()[0]
    except BaseException:
        state.pool.putconn(conn)
        raise
    if not held:
        state.pool.putconn(conn)
        raise Conflict(f"subject {subject_id} is being erased; its export is no longer available")
    return conn


def _release(state: AppState, conn: Any) -> None:
    try:
        conn.execute("SELECT pg_advisory_unlock_all()")
        conn.autocommit = False
    except Exception:  # the connection broke: closing it releases the lock anyway
        conn.close()
    state.pool.putconn(conn)


def _gather(state: AppState, conn: Any, subject_id: uuid.UUID, actor: str,
            request_id: str | None) -> tuple[Any, dict[str, Any], list[dict[str, Any]], list[Any], bytes | None]:
    """Check, audit and read everything (raising before any byte is sent)."""
    from appliance.enrolment import encoding_aad, external_ref_aad, label_aad
    from appliance.visits.queries import subject_visits
    from crypto.seal import open_sealed

    cur = conn.cursor(row_factory=dict_row)
    subject = cur.execute("SELECT * FROM subjects WHERE id = %s", (subject_id,)).fetchone()
    if subject is None:
        raise SubjectNotFound(f"no subject {subject_id}")
    dek = _subject_dek(state, conn, subject_id)
    label = None
    if subject["label_sealed"] is not None and dek is not None:
        label = open_sealed(dek, bytes(subject["label_sealed"]), label_aad(subject_id)).decode()
    external_ref = subject["external_ref"]  # plaintext only on rows from before migration 0008
    if subject["external_ref_sealed"] is not None and dek is not None:
        external_ref = open_sealed(dek, bytes(subject["external_ref_sealed"]),
                                   external_ref_aad(subject_id)).decode()
    encodings = []
    for row in cur.execute("SELECT id, model, template_version, raw_sealed, created_at FROM encodings "
                           "WHERE subject_id = %s ORDER BY created_at, id", (subject_id,)).fetchall():
        raw = open_sealed(dek, bytes(row["raw_sealed"]), encoding_aad(subject_id, row["id"], row["model"]))
        encodings.append({"id": str(row["id"]), "model": row["model"], "template_version": row["template_version"],
                          "created_at": ts_text(row["created_at"]),
                          "vector": np.frombuffer(raw, "<f4").astype(float).tolist()})
    media = cur.execute("SELECT * FROM media WHERE subject_id = %s ORDER BY created_at, id",
                        (subject_id,)).fetchall()
    meta_visits = subject_visits(conn, subject_id)
    state.audit.record(conn, AuditEvent(
        "subject.export", actor, subject_id=subject_id, request_id=request_id,
        details={"encodings": len(encodings), "media": len(media), "visits": len(meta_visits)}))
    meta = {
        "id": str(subject_id), "external_ref": external_ref, "label": label, "state": subject["state"],
        "created_at": ts_text(subject["created_at"]), "updated_at": ts_text(subject["updated_at"]),
        "erased_at": ts_text(subject["erased_at"]) if subject["erased_at"] else None,
        "retain_until": ts_text(subject["retain_until"]) if subject["retain_until"] else None,
        "last_seen_at": ts_text(subject["last_seen_at"]) if subject["last_seen_at"] else None,
        "visits": [{**v, "id": str(v["id"]), "subject_id": str(v["subject_id"]),
                    "first_seen": ts_text(v["first_seen"]), "last_seen": ts_text(v["last_seen"])}
                   for v in meta_visits],
    }
    return subject, meta, encodings, media, dek


def _stream(state: AppState, subject_id: uuid.UUID, meta: dict[str, Any], encodings: list[dict[str, Any]],
            media: list[dict[str, Any]], dek: bytes | None) -> Iterator[bytes]:
    sink = _Sink()
    files: dict[str, str] = {}
    with zipfile.ZipFile(sink, "w", compression=zipfile.ZIP_DEFLATED) as zf:  # type: ignore[arg-type]

        def put(name: str, data: bytes) -> None:
            files[name] = hashlib.sha256(data).hexdigest()
            zf.writestr(name, data)

        visits = meta.pop("visits", [])
        put("subject.json", json.dumps(meta, indent=2).encode())
        put("encodings.json", json.dumps(encodings).encode())
        put("visits.json", json.dumps(visits, indent=2).encode())
        yield sink.take()
        media_list = []
        for row in media:
            name = f"media/{row['id']}.{_EXT.get(row['content_type'], 'bin')}"
            digest = hashlib.sha256()
            with zf.open(name, "w", force_zip64=True) as out:
                for chunk in _open_media(state, row, dek):
                    digest.update(chunk)
                    out.write(chunk)
                    yield sink.take()
            files[name] = digest.hexdigest()
            media_list.append({"file": name, "id": str(row["id"]), "kind": row["kind"],
                               "content_type": row["content_type"], "camera_id": row["camera_id"],
                               "captured_at": ts_text(row["captured_at"]) if row["captured_at"] else None,
                               "size_bytes": row["size_bytes"]})
        put("media.json", json.dumps(media_list, indent=2).encode())
        put("audit.jsonl", b"".join(_audit_history(state, subject_id)))
        yield sink.take()
        manifest = {"type": MANIFEST_TYPE, "v": 1, "subject_id": str(subject_id),
                    "generated_at": ts_text(datetime.now(UTC)), "files": files}
        manifest_bytes = canonical_json(manifest)
        zf.writestr("manifest.json", manifest_bytes)
        zf.writestr("signature.json", json.dumps({
            "signed": "manifest.json (its exact bytes)", "algorithm": "Ed25519",
            "signature": state.keys.sign(manifest_bytes).hex(), "key_id": provider_key_id(state.keys),
            "public_key_pem": state.keys.public_key_pem().decode()}, indent=2).encode())
    yield sink.take()


def _open_media(state: AppState, row: dict[str, Any], subject_dek: bytes | None) -> Iterator[bytes]:
    from crypto.stream import open_stream
    from media.crypt import media_aad, wrap_context
    from media.store import read_sealed

    if row["wrapped_dek"] is None:
        dek = subject_dek
    else:
        dek = state.keys.unwrap(bytes(row["wrapped_dek"]), wrap_context(row["id"]))
    if dek is None:
        return
    store = state.media.store
    inline = None if row["sealed"] is None else bytes(row["sealed"])  # thumbnails live in their rows
    yield from open_stream(dek, read_sealed(store, row["object_key"], inline), media_aad(row["id"], row["kind"]))


def _audit_history(state: AppState, subject_id: uuid.UUID) -> Iterator[bytes]:
    """Every record naming the subject: its own rows, and its records inside match blocks."""
    wanted = str(subject_id)
    with state.pool.connection() as conn:
        cur = conn.cursor(row_factory=dict_row)
        for row in cur.execute(
            """SELECT * FROM audit_log WHERE subject_id = %s OR subjects @> ARRAY[%s]::uuid[]
               ORDER BY coalesce(first_ts, ts), chain, seq""",
            (subject_id, subject_id),
        ):
            for rec in records_of(row):
                if rec["subject_id"] == wanted:
                    yield canonical_json(rec) + b"\n"
