"""Every place a KEK-wrapped key is stored, and KEK rotation over all of them.

A KEK rotation is complete only when no stored key is wrapped by an older version; then the old
version can be retired (``min_decryption_version``). Forgetting one table here would make its rows
unreadable after retirement, so ``status`` counts per table and ``retire`` refuses while any lag.
"""

from __future__ import annotations

import base64
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psycopg
from minio import Minio
from minio.commonconfig import REPLACE, CopySource

from appliance.blind_index import lookup_context
from appliance.subject_keys import wrap_context as subject_context
from crypto.providers.base import KeyProvider
from crypto.rotation import RewrapProgress, rewrap_all
from media.crypt import wrap_context as media_context
from vector.templates import seed_context


@dataclass(frozen=True)
class WrappedKeyTable:
    """A table column of wrapped keys: how to find rows below a version and the wrap context of a row."""

    table: str
    id_sql: str  # an orderable SQL expression naming one row, backed by an index
    id_type: str  # its SQL type, for casts of the text ids the driver passes around
    column: str
    context: Callable[[Any], bytes]
    parse_id: Callable[[Any], Any] = lambda v: v
    only: str = "TRUE"  # rows of this table under the KEK (subject keys moved to owner keys are not)


def _template_ctx(row_id: str) -> bytes:
    model, _, version = row_id.rpartition("/")
    return seed_context(model, int(version))


TABLES = (
    WrappedKeyTable("subject_keys", "subject_id", "uuid", "wrapped_dek",
                    lambda i: subject_context(uuid.UUID(str(i))), only="scheme = 'kek'"),
    WrappedKeyTable("lookup_keys", "name", "text", "wrapped_key", lambda i: lookup_context(str(i))),
    WrappedKeyTable("template_keys", "model || '/' || version", "text", "wrapped_seed", _template_ctx,
                    only="scheme = 'kek'"),
    WrappedKeyTable("media", "id", "uuid", "wrapped_dek", lambda i: media_context(uuid.UUID(str(i)))),
)


def version_counts(conn: psycopg.Connection) -> dict[str, dict[int, int]]:
    """``{table: {kek_version: rows}}`` over every wrapped-key table."""
    out: dict[str, dict[int, int]] = {}
    for t in TABLES:
        rows = conn.execute(
            f"SELECT kek_version, count(*) FROM {t.table} WHERE {t.column} IS NOT NULL AND {t.only} GROUP BY 1"  # noqa: S608
        ).fetchall()
        out[t.table] = {int(v): int(n) for v, n in rows}
    return out


def rewrap_table(
    conn: psycopg.Connection,
    provider: KeyProvider,
    t: WrappedKeyTable,
    batch_size: int,
    progress: Callable[[RewrapProgress], None] | None = None,
) -> RewrapProgress:
    """Rewrap one table in batches, each committed on its own (so a kill loses at most one batch)."""

    def fetch(below: int, after: Any, limit: int) -> list[tuple[Any, bytes]]:
        rows = conn.execute(
            f"""SELECT {t.id_sql} AS rid, {t.column} FROM {t.table}
                WHERE {t.column} IS NOT NULL AND {t.only} AND kek_version < %s
                  AND (%s::{t.id_type} IS NULL OR {t.id_sql} > %s::{t.id_type})
                ORDER BY {t.id_sql} LIMIT %s""",  # noqa: S608 - identifiers from TABLES only
            (below, after, after, limit),
        ).fetchall()
        conn.commit()
        return [(str(r[0]), bytes(r[1])) for r in rows]

    def store(rows: list[tuple[Any, bytes]]) -> None:
        with conn.transaction(), conn.cursor() as cur:
            cur.executemany(
                f"UPDATE {t.table} SET {t.column} = %s, kek_version = %s WHERE {t.id_sql} = %s::{t.id_type}",  # noqa: S608
                [(w, provider.wrapped_version(w), rid) for rid, w in rows],
            )

    return rewrap_all(provider, fetch, store, batch_size=batch_size, context=t.context, progress=progress)


def rewrap_backups(s3: Minio, bucket: str, provider: KeyProvider) -> int:
    """Backups carry their wrapped key in object metadata: rewrite it (a new version, old one removed)."""
    from appliance.backup import _backup_aad, list_backups

    target = provider.kek_version()
    done = 0
    for b in list_backups(s3, bucket):
        stat = s3.stat_object(bucket, b.key)
        meta = {k.lower(): v for k, v in (stat.metadata or {}).items()}
        wrapped = base64.b64decode(meta.get("x-amz-meta-wrapped-dek", ""))
        if not wrapped or provider.wrapped_version(wrapped) >= target:
            continue
        new = provider.rewrap_many([wrapped], _backup_aad(b.key))[0]
        s3.copy_object(
            bucket, b.key, CopySource(bucket, b.key, version_id=stat.version_id),
            metadata={"wrapped-dek": base64.b64encode(new).decode(),
                      "format": meta.get("x-amz-meta-format", "pgdump-custom+stream-v1")},
            metadata_directive=REPLACE,
        )
        if stat.version_id:
            s3.remove_object(bucket, b.key, version_id=stat.version_id)
        done += 1
    return done
