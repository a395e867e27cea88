"""The erasure job: resumable, idempotent, and ending in a signed receipt (DESIGN.md, "GDPR").

Steps, in order; each commits its facts into ``erasure_jobs.progress`` together with its own
database changes, so a crash between any two steps resumes at the first step not yet recorded,
and the receipt is built only from recorded facts (a resumed job signs the same contents):

1. ``mark_erasing``  subject state ``erasing``; label, external reference and its blind index nulled.
2. ``tombstone``     labels tombstoned in this process and in Redis: from here on no worker returns them.
3. ``delete_data``   encodings rows, media rows and every version of every object (one transaction
                     for the rows; objects are removed first and the removal is idempotent).
4. ``purge_index``   the deletions are sequenced in each model's feed so hot indexes drop the labels.
5. ``shred_key``     the crypto-shred: the subject's owner key is destroyed in the key provider (a
                     Vault transit key deleted, or a local key slot overwritten), checked absent, then
                     the wrapped DEK row is deleted. Every copy of that wrapped DEK, and so of every
                     blob sealed with the DEK (dead tuples, WAL, backups, object versions), stops
                     opening for anyone, the appliance's own credentials included.
6. ``evict_keys``    the cached DEK is evicted from this process.
7. ``vacuum``        VACUUM of the touched tables with the owner role (outside any transaction).
8. ``mark_erased``   subject state ``erased``.
9. ``receipt``       the receipt is signed, stored, and the erasure audited; job ``done``.

One runner per job at a time (a session advisory lock); a second caller waits, then sees ``done``.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from appliance.audit import AuditEvent
from appliance.audit.chain import ts_text
from appliance.errors import Conflict
from appliance.gdpr import EXPORT_LOCK, ErasureInterrupted, ErasureNotFound, SubjectNotFound
from appliance.gdpr.receipts import RECEIPT_TYPE, sign_receipt
from appliance.logs import get_logger
from appliance.state import AppState
from appliance.subject_keys import owner_name

log = get_logger(__name__)

STEPS = ("mark_erasing", "tombstone", "delete_data", "purge_index", "shred_key", "record_ledger", "evict_keys",
         "vacuum", "mark_erased", "receipt")
VACUUM_TABLES = ("encodings", "media", "subject_keys", "subjects")
LOCK_NAMESPACE = 0x45524153  # "ERAS"

# Failure injection for tests: raise after this step has committed (or, with
# APPLIANCE_ERASURE_FAIL_MODE=exit, end the process as a kill would).
fail_after: str | None = None


class InjectedFailure(RuntimeError):
    """A test asked the job to stop right after a step."""


def _maybe_fail(step: str) -> None:
    target = fail_after or os.environ.get("APPLIANCE_ERASURE_FAIL_AFTER")
    if target == step:
        if os.environ.get("APPLIANCE_ERASURE_FAIL_MODE") == "exit":
            os._exit(75)
        raise InjectedFailure(f"injected failure after step {step}")


def _now() -> str:
    return ts_text(datetime.now(UTC))


# --- starting and reading jobs ----------------------------------------------------------------------------


def start_erasure(state: AppState, subject_id: uuid.UUID, actor: str, request_id: str | None) -> uuid.UUID:
    """Create the job for this subject (or return the existing one: erasure is idempotent)."""
    with state.pool.connection() as conn, conn.transaction():
        if conn.execute("SELECT 1 FROM subjects WHERE id = %s", (subject_id,)).fetchone() is None:
            raise SubjectNotFound(f"no subject {subject_id}")
        job_id = uuid.uuid4()
        created = conn.execute(
            """INSERT INTO erasure_jobs (id, subject_id, request_id, progress) VALUES (%s, %s, %s, %s)
               ON CONFLICT (subject_id) DO NOTHING RETURNING id""",
            (job_id, subject_id, request_id, Jsonb({"actor": actor, "steps": {}})),
        ).fetchone()
        if created is None:
            return conn.execute("SELECT id FROM erasure_jobs WHERE subject_id = %s", (subject_id,)).fetchone()[0]
        state.audit.record(conn, AuditEvent("subject.erase.request", actor, subject_id=subject_id,
                                                 object_id=str(job_id), request_id=request_id))
    return job_id


def get_job(conn: psycopg.Connection[Any], job_id: uuid.UUID) -> dict[str, Any]:
    row = conn.execute(
        """SELECT id, subject_id, state, step, progress, receipt, receipt_signature, request_id, created_at,
                  updated_at, finished_at, attempts FROM erasure_jobs WHERE id = %s""", (job_id,)
    ).fetchone()
    if row is None:
        raise ErasureNotFound(f"no erasure job {job_id}")
    keys = ("id", "subject_id", "state", "step", "progress", "receipt", "receipt_signature", "request_id",
            "created_at", "updated_at", "finished_at", "attempts")
    job = dict(zip(keys, row, strict=True))
    job["receipt_signature"] = bytes(job["receipt_signature"]).hex() if job["receipt_signature"] else None
    return job


def job_status(state: AppState, job_id: uuid.UUID) -> dict[str, Any]:
    with state.pool.connection() as conn:
        return get_job(conn, job_id)


# --- running ---------------------------------------------------------------------------------------------


def run_erasure(state: AppState, job_id: uuid.UUID, wait: float = 60.0) -> dict[str, Any]:
    """Run (or resume) the job to the end; returns the job with its receipt. Idempotent."""
    with state.pool.connection() as lock_conn:
        lock_conn.autocommit = True
        key = (LOCK_NAMESPACE << 32) ^ (uuid.UUID(str(job_id)).int & 0xFFFFFFFF)
        deadline = time.monotonic() + wait
        while not lock_conn.execute("SELECT pg_try_advisory_lock(%s)", (key,)).fetchone()[0]:
            if time.monotonic() > deadline:
                raise Conflict(f"erasure {job_id} is being run by another process")
            time.sleep(0.1)
        try:
            return _run_locked(state, job_id)
        finally:
            lock_conn.execute("SELECT pg_advisory_unlock(%s)", (key,))
            lock_conn.autocommit = False


def _run_locked(state: AppState, job_id: uuid.UUID) -> dict[str, Any]:
    with state.pool.connection() as conn, conn.transaction():
        job = get_job(conn, job_id)
        if job["state"] == "done":
            return job
        conn.execute(
            """UPDATE erasure_jobs SET state = 'running', attempts = attempts + 1, updated_at = now(),
                      started_at = coalesce(started_at, now()) WHERE id = %s""", (job_id,))
    progress = job["progress"]
    progress.setdefault("steps", {})
    for step in STEPS:
        if step in progress["steps"]:
            continue
        try:
            _STEP_FUNCS[step](state, job, progress)
        except Exception as exc:
            _failed(state, job_id, step, exc)
            if isinstance(exc, InjectedFailure | Conflict):
                raise
            raise ErasureInterrupted(f"erasure {job_id} stopped at step {step!r} ({type(exc).__name__}); "
                                     "retry or restart to resume it", job_id=str(job_id), step=step) from exc
        _maybe_fail(step)
    with state.pool.connection() as conn:
        return get_job(conn, job_id)


def _failed(state: AppState, job_id: uuid.UUID, step: str, exc: BaseException) -> None:
    log.warning("erasure: step failed", job_id=str(job_id), step=step, error=type(exc).__name__)
    try:
        with state.pool.connection() as conn, conn.transaction():
            conn.execute(
                """UPDATE erasure_jobs SET state = 'failed', updated_at = now(),
                          progress = progress || jsonb_build_object('error', %s::text, 'failed_step', %s::text)
                   WHERE id = %s""", (f"{type(exc).__name__}: {str(exc)[:200]}", step, job_id))
    except Exception:  # PostgreSQL itself is down: the job stays 'running' and resumes anyway
        log.warning("erasure: could not record the failure", job_id=str(job_id))


def _complete(conn: psycopg.Connection[Any], job: dict[str, Any], progress: dict[str, Any], step: str,
              **facts: Any) -> None:
    """Record a step and its facts, in the caller's transaction (with the step's own changes)."""
    progress.update(facts)
    progress["steps"][step] = _now()
    progress.pop("error", None)
    progress.pop("failed_step", None)
    conn.execute("UPDATE erasure_jobs SET step = %s, progress = %s, updated_at = now() WHERE id = %s",
                 (step, Jsonb(progress), job["id"]))


def _mark_erasing(state: AppState, job: dict[str, Any], progress: dict[str, Any]) -> None:
    sid = job["subject_id"]
    with state.pool.connection() as conn, conn.transaction():
        conn.execute(
            """UPDATE subjects SET state = 'erasing', label_sealed = NULL, external_ref = NULL,
                      external_ref_hash = NULL, external_ref_sealed = NULL, updated_at = now()
               WHERE id = %s AND state <> 'erased'""", (sid,))
        state.audit.record(conn, AuditEvent("subject.erase.start", progress.get("actor", "system:erasure"),
                                                 subject_id=sid, object_id=str(job["id"]),
                                                 request_id=job["request_id"]))
        _complete(conn, job, progress, "mark_erasing")


def _tombstone(state: AppState, job: dict[str, Any], progress: dict[str, Any]) -> None:
    from appliance.index_admin import tombstone_subject

    labels = sorted(tombstone_subject(state, job["subject_id"]))
    with state.pool.connection() as conn, conn.transaction():
        _complete(conn, job, progress, "tombstone", labels=labels)


def _delete_data(state: AppState, job: dict[str, Any], progress: dict[str, Any]) -> None:
    from appliance.visits.queries import delete_subject_visits
    from media.retention import delete_subject_media

    sid = job["subject_id"]
    with state.pool.connection() as conn, conn.transaction():
        conn.execute("SELECT 1 FROM subjects WHERE id = %s FOR UPDATE", (sid,))  # no enrolment races the delete
        try:  # an access export streaming this subject's zip finishes first (appliance.gdpr.export)
            conn.execute("SELECT pg_advisory_xact_lock(%s, hashtext(%s))", (EXPORT_LOCK, str(sid)))
        except psycopg.errors.LockNotAvailable:
            raise Conflict(f"an access export of subject {sid} is streaming; retry the erasure when it has "
                           "finished (the job resumes where it stopped)") from None
        media_rows = conn.execute("SELECT count(*) FROM media WHERE subject_id = %s", (sid,)).fetchone()[0]
        versions = dict(conn.execute("SELECT model, max(template_version) FROM encodings WHERE subject_id = %s "
                                     "GROUP BY model", (sid,)).fetchall())
        object_keys = sorted(delete_subject_media(state.media.store, conn, sid))
        encodings = conn.execute("DELETE FROM encodings WHERE subject_id = %s RETURNING id", (sid,)).fetchall()
        visits = delete_subject_visits(conn, sid)  # a visit written later cannot name them (appliance.visits)
        _complete(conn, job, progress, "delete_data", encodings=len(encodings), media_rows=int(media_rows),
                  visits=visits,
                  object_keys=object_keys, template_versions=progress.get("template_versions") or versions)


def _purge_index(state: AppState, job: dict[str, Any], progress: dict[str, Any]) -> None:
    from appliance.index_admin import purge_labels

    purge_labels(state, list(progress.get("labels", [])))
    with state.pool.connection() as conn, conn.transaction():
        _complete(conn, job, progress, "purge_index")


def _shred_key(state: AppState, job: dict[str, Any], progress: dict[str, Any]) -> None:
    """Destroy the owner key first, then the row: a crash in between resumes here and destroys again (a no-op)."""
    sid = job["subject_id"]
    with state.pool.connection() as conn:
        row = conn.execute("SELECT key_id, scheme, kek_version FROM subject_keys WHERE subject_id = %s",
                           (sid,)).fetchone()
    destroyed = state.subject_keys.destroy(sid)
    if state.keys.owned_exists(owner_name(sid)):  # never sign a receipt for a key that survived
        raise ErasureInterrupted(f"owner key of subject {sid} still exists after its destruction",
                                 job_id=str(job["id"]), step="shred_key")
    destroyed_at = _now()
    with state.pool.connection() as conn, conn.transaction():
        conn.execute("DELETE FROM subject_keys WHERE subject_id = %s", (sid,))
        facts: dict[str, Any] = {"subject_key_id": str(row[0]) if row else progress.get("subject_key_id")}
        if row is not None:
            facts |= {"key_scheme": row[1], "kek_version": row[2]}
        if destroyed.existed or "owner_key" not in progress:
            facts["owner_key"] = {"provider": destroyed.provider, "location": destroyed.location,
                                  "method": destroyed.method, "existed": destroyed.existed,
                                  "destroyed_at": destroyed_at, "verified_absent": True}
        _complete(conn, job, progress, "shred_key", **facts)


def _record_ledger(state: AppState, job: dict[str, Any], progress: dict[str, Any]) -> None:
    """Backups taken before this erasure still hold the wrapped key: the ledger makes restores re-erase."""
    from appliance.backup import record_erasure

    key = record_erasure(state.s3, state.settings.s3_backup_bucket, job["subject_id"], job["id"])
    with state.pool.connection() as conn, conn.transaction():
        _complete(conn, job, progress, "record_ledger", ledger_object=key)


def _evict_keys(state: AppState, job: dict[str, Any], progress: dict[str, Any]) -> None:
    state.subject_keys.evict(job["subject_id"])
    with state.pool.connection() as conn, conn.transaction():
        _complete(conn, job, progress, "evict_keys")


def _vacuum(state: AppState, job: dict[str, Any], progress: dict[str, Any]) -> None:
    admin = state.settings.database_admin_url
    vacuumed: list[str] = []
    if admin is not None:
        from appliance.db.pool import BoundedConnection, connection_kwargs

        settings = state.settings
        with BoundedConnection.connect(admin.get_secret_value(), autocommit=True,
                                       **connection_kwargs(settings)) as conn:
            # Bounded like any job: a frozen server fails the step (the job resumes) instead of the request
            # hanging; a live one cancels a VACUUM past db_job_timeout itself.
            conn.reply_timeout = settings.db_job_timeout + settings.db_request_timeout
            conn.execute(f"SET statement_timeout = {int(settings.db_job_timeout * 1000)}".encode())
            # Prune the subject's dead tuples now. No ANALYZE (it samples 30,000 rows per table on every
            # erasure; autovacuum keeps statistics) and no TRUNCATE (its exclusive lock would queue
            # behind enrolments). The crypto-shred does not depend on this: it is hygiene.
            for table in VACUUM_TABLES:  # VACUUM cannot run inside a transaction block
                conn.execute(f"VACUUM (TRUNCATE OFF) {table}".encode())
                vacuumed.append(table)
    else:
        log.warning("erasure: no database_admin_url, VACUUM skipped", job_id=str(job["id"]))
    with state.pool.connection() as conn, conn.transaction():
        _complete(conn, job, progress, "vacuum", vacuumed=vacuumed)


def _mark_erased(state: AppState, job: dict[str, Any], progress: dict[str, Any]) -> None:
    with state.pool.connection() as conn, conn.transaction():
        row = conn.execute(
            """UPDATE subjects SET state = 'erased', label_sealed = NULL, external_ref = NULL,
                      external_ref_hash = NULL, external_ref_sealed = NULL,
                      erased_at = coalesce(erased_at, now()), updated_at = now()
               WHERE id = %s RETURNING erased_at""", (job["subject_id"],)).fetchone()
        _complete(conn, job, progress, "mark_erased", erased_at=ts_text(row[0]))


SEALED_WITH_SUBJECT_DEK = ("raw encodings", "display label", "external reference",
                           "media objects and thumbnails of the subject, every version")
STALE_COPIES = ("live database rows", "dead tuples and free space in the database files", "WAL and any WAL archive",
                "database backups", "deleted object versions and object-store volume files")


def _caveats(progress: dict[str, Any]) -> list[str]:
    """What the erasure does not make unrecoverable, stated so the receipt never claims more than is true."""
    versions = ", ".join(f"{m} v{v}" for m, v in sorted(progress.get("template_versions", {}).items())) or "none"
    notes = [
        "protected templates (R*v, the searchable form) were deleted and vacuumed, but stale copies in database "
        "free space, WAL and backups are rotations under the model's template key, not sealed with the subject "
        f"DEK ({versions}): they stay invertible by whoever can unwrap that template key until it is destroyed by "
        "the next template re-key (the daily retention sweep re-keys after erasures; audit action key.destroy "
        "records it)",
        "the audit log keeps the subject id and the actions on it (no biometric data): it is the accountability "
        "record of this erasure",
        "another API worker may hold the unwrapped DEK in memory for at most dek_cache_ttl seconds; never on disk",
    ]
    if progress.get("key_scheme") == "kek":
        notes.insert(0, "this subject's DEK was wrapped by the shared KEK (enrolled before owner keys): older WAL "
                        "and backups keep KEK-wrapped copies that open until the KEK versions up to "
                        f"{progress.get('kek_version')} are destroyed")
    return notes


def build_receipt(job: dict[str, Any], progress: dict[str, Any]) -> dict[str, Any]:
    """The receipt, from recorded facts only: the same for a job that ran straight through or resumed."""
    owner_key = progress.get("owner_key")
    final = owner_key is not None and progress.get("key_scheme", "owner") == "owner"
    return {
        "type": RECEIPT_TYPE,
        "v": 2,
        "job_id": str(job["id"]),
        "subject_id": str(job["subject_id"]),
        "request_id": job["request_id"],
        "requested_by": progress.get("actor"),
        "requested_at": ts_text(job["created_at"]),
        "erased_at": progress.get("erased_at"),
        "destroyed": {
            "encodings": progress.get("encodings", 0),
            "index_labels": progress.get("labels", []),
            "media_rows": progress.get("media_rows", 0),
            "visits": progress.get("visits", 0),
            "object_keys": progress.get("object_keys", []),
            "object_versions": "all versions of each object key",
            "subject_key_id": progress.get("subject_key_id"),
            "subject_key_kek_version": progress.get("kek_version"),
            "owner_key": owner_key,
            "template_versions": progress.get("template_versions", {}),
        },
        "unrecoverable": {
            "since": owner_key["destroyed_at"] if final else None,
            "data": list(SEALED_WITH_SUBJECT_DEK),
            "copies": list(STALE_COPIES) if final else ["live database rows"],
            "because": "each was sealed with the subject's DEK, stored only wrapped by the subject's owner key, "
                       "which the key provider no longer has" if final else
                       "the rows were deleted; stale copies are not covered (see caveats)",
        },
        "caveats": _caveats(progress),
        "vacuumed_tables": progress.get("vacuumed", []),
        "steps": {s: progress["steps"][s] for s in STEPS if s in progress["steps"]},
    }


def _receipt(state: AppState, job: dict[str, Any], progress: dict[str, Any]) -> None:
    receipt, signature = sign_receipt(state.keys, build_receipt(job, progress))
    with state.pool.connection() as conn, conn.transaction():
        progress["steps"]["receipt"] = receipt["erased_at"]  # fixed: re-signing yields the same receipt
        conn.execute(
            """UPDATE erasure_jobs SET state = 'done', step = 'receipt', progress = %s, receipt = %s,
                      receipt_signature = %s, finished_at = now(), updated_at = now() WHERE id = %s""",
            (Jsonb(progress), Jsonb(receipt), bytes.fromhex(signature), job["id"]))
        destroyed = receipt["destroyed"]
        state.audit.record(conn, AuditEvent(
            "subject.erase", progress.get("actor", "system:erasure"), subject_id=job["subject_id"],
            object_id=str(job["id"]), request_id=job["request_id"],
            details={"encodings": destroyed["encodings"], "media_rows": destroyed["media_rows"],
                     "visits": destroyed["visits"],
                     "objects": len(destroyed["object_keys"]), "key_id": destroyed["subject_key_id"]}))


_STEP_FUNCS: dict[str, Callable[[AppState, dict[str, Any], dict[str, Any]], None]] = {
    "mark_erasing": _mark_erasing,
    "tombstone": _tombstone,
    "delete_data": _delete_data,
    "purge_index": _purge_index,
    "shred_key": _shred_key,
    "record_ledger": _record_ledger,
    "evict_keys": _evict_keys,
    "vacuum": _vacuum,
    "mark_erased": _mark_erased,
    "receipt": _receipt,
}


def resume_unfinished(state: AppState) -> int:
    """Finish every job a crash or an outage left behind (startup hook, in a background thread)."""
    with state.pool.connection() as conn:
        ids = [r[0] for r in conn.execute("SELECT id FROM erasure_jobs WHERE state <> 'done' ORDER BY created_at")]
    finished = 0
    for job_id in ids:
        try:
            run_erasure(state, job_id)
            finished += 1
        except Exception as exc:  # leave it for the next start or a manual retry
            log.warning("erasure: resume failed", job_id=str(job_id), error=type(exc).__name__)
    return finished


def resume_in_background(state: AppState) -> threading.Thread:
    thread = threading.Thread(target=resume_unfinished, args=(state,), name="erasure-resume", daemon=True)
    thread.start()
    return thread
