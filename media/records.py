"""The ``media`` table (migrations 0001, 0003, 0005): one row per stored object, thumbnails as children.

A row's sealed bytes are in the bucket under ``object_key`` or, for thumbnails since 0005, in the
row itself (``sealed``); never both.

Every function takes the caller's connection, so a row change and its audit record commit together.
"""

from __future__ import annotations

import base64
import uuid
from collections.abc import Callable
from dataclasses import dataclass, fields
from datetime import datetime
from operator import attrgetter
from typing import Any

import psycopg
from psycopg import sql

from media.errors import MalformedMedia

__all__ = [
    "AuditHook",
    "MediaRow",
    "decode_cursor",
    "delete_rows",
    "encode_cursor",
    "get",
    "insert",
    "of_subject",
    "page",
    "subject_state",
    "thumb_sizes",
    "thumbnail",
    "with_thumbnails",
]


# (conn, action, subject_id, object_id, details): records one audit event inside the caller's transaction.
AuditHook = Callable[[psycopg.Connection, str, "uuid.UUID | None", "str | None", dict[str, Any]], None]


@dataclass(frozen=True)
class MediaRow:
    id: uuid.UUID
    subject_id: uuid.UUID | None
    parent_id: uuid.UUID | None
    camera_id: str | None
    kind: str  # image | clip | enrolment | thumbnail
    object_key: str | None  # None: the sealed bytes are in ``sealed`` (thumbnails), not in the bucket
    content_type: str
    size_bytes: int
    sha256: bytes
    wrapped_dek: bytes | None  # None: sealed with the subject's DEK
    kek_version: int | None
    captured_at: datetime | None
    expires_at: datetime | None
    thumb_size: int | None = None
    width: int | None = None
    height: int | None = None
    sealed: bytes | None = None  # the sealed object itself when it lives in the row
    created_at: datetime | None = None

    def __repr__(self) -> str:  # the sealed bytes are noise in logs and tracebacks
        return f"MediaRow(id={self.id}, kind={self.kind!r}, object_key={self.object_key!r})"


_COLS = [f.name for f in fields(MediaRow)]
_INSERT_COLS = [c for c in _COLS if c != "created_at"]  # set by the database
COLUMNS = sql.SQL(", ").join(map(sql.Identifier, _COLS))
_SELECT = sql.SQL("SELECT {} FROM media ").format(COLUMNS)
_INSERT = sql.SQL("INSERT INTO media ({}) VALUES ({})").format(
    sql.SQL(", ").join(map(sql.Identifier, _INSERT_COLS)), sql.SQL(", ").join([sql.Placeholder()] * len(_INSERT_COLS))
)
_FOR_UPDATE = sql.SQL(" FOR UPDATE")
_NOTHING = sql.SQL("")


_insert_values = attrgetter(*_INSERT_COLS)


def _row(values: tuple) -> MediaRow:  # type: ignore[type-arg]
    return MediaRow(*values)  # psycopg loads bytea as bytes


def insert(conn: psycopg.Connection, rows: list[MediaRow]) -> None:
    """Insert parents before children (callers pass them in that order)."""
    # attrgetter, not dataclasses.astuple: astuple deep-copies every field, sealed bytes included.
    with conn.cursor() as cur:
        cur.executemany(_INSERT, [_insert_values(r) for r in rows])


def get(conn: psycopg.Connection, media_id: uuid.UUID, lock: bool = False) -> MediaRow | None:
    found = conn.execute(
        _SELECT + sql.SQL("WHERE id = %s") + (_FOR_UPDATE if lock else _NOTHING), (media_id,)
    ).fetchone()
    return _row(found) if found else None


def thumbnail(conn: psycopg.Connection, parent_id: uuid.UUID, size: int) -> MediaRow | None:
    found = conn.execute(
        _SELECT + sql.SQL("WHERE parent_id = %s AND thumb_size = %s"), (parent_id, size)
    ).fetchone()
    return _row(found) if found else None


def with_thumbnails(conn: psycopg.Connection, ids: list[uuid.UUID], lock: bool = False) -> list[MediaRow]:
    """The rows ``ids`` and their thumbnails (children last), optionally locked against a concurrent delete."""
    rows = conn.execute(
        _SELECT + sql.SQL("WHERE id = ANY(%s) OR parent_id = ANY(%s) ORDER BY parent_id NULLS FIRST")
        + (_FOR_UPDATE if lock else _NOTHING),
        (ids, ids),
    ).fetchall()
    return [_row(r) for r in rows]


def of_subject(conn: psycopg.Connection, subject_id: uuid.UUID) -> list[MediaRow]:
    """Every row of a subject, thumbnails included, locked for the erasure transaction."""
    query = _SELECT + sql.SQL(
        "WHERE subject_id = %s OR parent_id IN (SELECT id FROM media WHERE subject_id = %s) FOR UPDATE"
    )
    return [_row(r) for r in conn.execute(query, (subject_id, subject_id)).fetchall()]


def delete_rows(conn: psycopg.Connection, ids: list[uuid.UUID]) -> int:
    """Delete rows (thumbnails go with their parent by ON DELETE CASCADE)."""
    return conn.execute("DELETE FROM media WHERE id = ANY(%s)", (ids,)).rowcount


def page(
    conn: psycopg.Connection,
    *,
    subject_id: uuid.UUID | None,
    camera_id: str | None,
    start: datetime | None,
    end: datetime | None,
    after: tuple[datetime, uuid.UUID] | None,
    limit: int,
) -> list[MediaRow]:
    """Non-thumbnail rows in (captured_at, id) order, keyset-paged after ``after``; filters are ANDed."""
    where, args = ["kind <> 'thumbnail'"], []  # fixed clauses only; every value is a parameter
    for clause, value in (
        ("subject_id = %s", subject_id),
        ("camera_id = %s", camera_id),
        ("captured_at >= %s", start),
        ("captured_at < %s", end),
    ):
        if value is not None:
            where.append(clause)
            args.append(value)
    if after is not None:
        where.append("(captured_at, id) > (%s, %s)")
        args += list(after)
    query = _SELECT + sql.SQL("WHERE {} ORDER BY captured_at, id LIMIT %s").format(
        sql.SQL(" AND ").join(map(sql.SQL, where))
    )
    return [_row(r) for r in conn.execute(query, [*args, limit]).fetchall()]


def thumb_sizes(conn: psycopg.Connection, parent_ids: list[uuid.UUID]) -> dict[uuid.UUID, list[int]]:
    out: dict[uuid.UUID, list[int]] = {}
    for parent, size in conn.execute(
        "SELECT parent_id, thumb_size FROM media WHERE parent_id = ANY(%s) ORDER BY thumb_size", (parent_ids,)
    ):
        out.setdefault(parent, []).append(size)
    return out


def subject_state(conn: psycopg.Connection, subject_id: uuid.UUID, lock: bool = False) -> str | None:
    """The subject's state; ``lock`` holds FOR SHARE so an erasure cannot start until we commit."""
    found = conn.execute(
        sql.SQL("SELECT state FROM subjects WHERE id = %s") + sql.SQL(" FOR SHARE" if lock else ""), (subject_id,)
    ).fetchone()
    return found[0] if found else None


def encode_cursor(row: MediaRow) -> str:
    """The keyset position (captured_at, id) after ``row``, opaque to clients so it can change format."""
    assert row.captured_at is not None  # upload sets it (default: upload time)
    raw = f"{row.captured_at.isoformat()}|{row.id}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, uuid.UUID]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        ts, _, mid = raw.partition("|")
        return datetime.fromisoformat(ts), uuid.UUID(mid)
    except (ValueError, UnicodeDecodeError):
        raise MalformedMedia("cursor is not one this API returned") from None
