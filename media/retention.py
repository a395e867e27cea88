"""Retention and erasure of media: every version of every object goes, then the rows.

Order everywhere: delete the objects (all versions, idempotent), then the rows in the same
transaction as their audit records. A crash in between leaves rows whose objects are gone (reads
answer 410) and the next run finishes the job, so the sweep and erasure are safe to re-run. Rows
are claimed with ``FOR UPDATE SKIP LOCKED``, so two sweeps, or a sweep and an API delete, never
fight over one row; uploads are unaffected (their rows expire in the future).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from itertools import islice

import psycopg
from psycopg_pool import ConnectionPool

from media import records
from media.records import AuditHook, MediaRow
from media.store import MediaStore

__all__ = ["Retention", "SweepReport", "delete_subject_media", "remove_objects", "sweep", "sweep_orphans"]


@dataclass(frozen=True)
class Retention:
    """Days each kind is kept after capture; None keeps it until the subject is erased."""

    image_days: float | None = 30
    clip_days: float | None = 7
    enrolment_days: float | None = None

    def expires_at(self, kind: str, captured_at: datetime) -> datetime | None:
        days = {"image": self.image_days, "clip": self.clip_days, "enrolment": self.enrolment_days}.get(kind)
        return None if days is None else captured_at + timedelta(days=days)


@dataclass
class SweepReport:
    media: int = 0  # parent rows deleted (thumbnails not counted)
    objects: int = 0  # object keys whose every version was removed
    batches: int = 0
    orphans: int = 0


def remove_objects(store: MediaStore, rows: list[MediaRow]) -> list[str]:
    """Remove every version of each row's object; returns the keys. Raises StoreUnavailable midway.

    Rows that carry their sealed bytes themselves (thumbnails, migration 0005) have no object: they
    go with the row, and the erasure's VACUUM of ``media`` reclaims them.
    """
    keys = []
    for row in rows:
        if row.object_key is None:
            continue
        store.remove_all_versions(row.object_key)
        keys.append(row.object_key)
    return keys


def sweep(
    pool: ConnectionPool,
    store: MediaStore,
    audit: AuditHook,
    *,
    batch_size: int = 100,
    now: datetime | None = None,
    progress: Callable[[SweepReport], None] | None = None,
) -> SweepReport:
    """Delete media whose ``expires_at`` has passed, one committed batch at a time, audited per item."""
    now = now or datetime.now(UTC)
    report = SweepReport()
    while True:
        with pool.connection() as conn, conn.transaction():
            ids = [r[0] for r in conn.execute(
                "SELECT id FROM media WHERE kind <> 'thumbnail' AND expires_at <= %s "
                "ORDER BY expires_at LIMIT %s FOR UPDATE SKIP LOCKED",
                (now, batch_size),
            )]
            if not ids:
                return report
            rows = records.with_thumbnails(conn, ids, lock=True)
            keys = remove_objects(store, rows)
            records.delete_rows(conn, ids)
            for row in rows:
                if row.parent_id is None:
                    expired = row.expires_at.isoformat() if row.expires_at else None
                    audit(conn, "media.expire", row.subject_id, str(row.id), {"kind": row.kind, "expired": expired})
        report.media += len(ids)
        report.objects += len(keys)
        report.batches += 1
        if progress:
            progress(report)


def sweep_orphans(
    pool: ConnectionPool, store: MediaStore, *, days: int = 2, grace: timedelta = timedelta(hours=1),
    batch_size: int = 1000,
) -> int:
    """Remove objects of the last ``days`` upload dates that no row references (a crash mid-upload).

    ``grace`` leaves objects alone whose upload may still be about to insert its row. Keys are
    checked against PostgreSQL ``batch_size`` at a time, so a busy day costs memory for one batch.
    """
    now = datetime.now(UTC)
    removed = 0
    for back in range(days):
        prefix = f"captures/{now - timedelta(days=back):%Y/%m/%d}/"
        listing = store.list_keys(prefix)
        while page := list(islice(listing, batch_size)):
            batch = [key for key, modified in page if modified is None or modified < now - grace]
            if not batch:
                continue
            with pool.connection() as conn:
                known = {r[0] for r in conn.execute(
                    "SELECT object_key FROM media WHERE object_key = ANY(%s)", (batch,))}
            for key in batch:
                if key not in known:
                    store.remove_all_versions(key)
                    removed += 1
    return removed


def delete_subject_media(store: MediaStore, conn: psycopg.Connection, subject_id: uuid.UUID) -> list[str]:
    """For GDPR erasure: remove every object version of the subject's media, then its rows, in ``conn``.

    Call it inside the erasure transaction; it locks the rows, is idempotent, and returns the object
    keys whose every version was removed (thumbnails stored as objects included; newer thumbnails live
    in their rows and go with them). Raises ``media.errors.StoreUnavailable`` if S3 is down: retry the step.
    """
    rows = records.of_subject(conn, subject_id)
    keys = remove_objects(store, rows)
    records.delete_rows(conn, [r.id for r in rows])
    return keys
