"""The auditor's export: records, the stubs that keep a filtered export verifiable, checkpoints, a signature.

File layout (JSON Lines, canonical JSON per line; CSV carries the same objects in its ``json`` column):

1. ``{"type": "header", ...}`` — filters, time of export, the public key (PEM) and its key id.
2. ``{"type": "checkpoint", ...}`` — the signed checkpoints of every exported chain that fall inside
   its segment, the one just before it and the first one after it (which proves a cut tail).
3. ``{"type": "record", ...}`` / ``{"type": "stub", "reason": ...}`` — per chain, in ``seq`` order, one
   contiguous segment: every record of the time window, full when it matches ``subject_id``/``action``,
   else a stub (header only: see ``appliance.audit.chain``); plus the neighbour just before
   (``reason: before``) and just after (``after``) the window as stubs.
4. ``{"type": "end", ...}`` — line count, SHA-256 of every byte before it, and its signature.

The export runs in one REPEATABLE READ READ ONLY transaction on its own connection: a consistent
snapshot, streamed from a server-side cursor, without holding a pool connection.
"""

from __future__ import annotations

import csv
import hashlib
import io
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import psycopg
from psycopg.rows import dict_row

from appliance.audit.chain import canonical_json, record_from_row, stub_of, subject_digest, ts_text, unpack_block
from appliance.audit.checkpoints import key_fingerprint, row_to_checkpoint
from crypto.providers.base import KeyProvider

EXPORT_FORMAT = "appliance-audit-export"
CSV_COLUMNS = ("type", "chain", "seq", "ts", "action", "outcome", "subject_id", "actor", "object_id", "request_id",
               "json")
_RECORD_COLUMNS = "ts, chain, seq, class, actor, action, subject_id, object_id, outcome, request_id, details, " \
                  "prev_hash, hash, first_ts, events, packed, hashes"
# A block row holds records seq - events + 1 .. seq (see "match blocks" in appliance.audit.chain).
_FIRST_SEQ = "seq - coalesce(events, 1) + 1"


class ExportError(ValueError):
    """The export request is invalid (bad filter)."""


@dataclass(frozen=True)
class ExportFilter:
    start: datetime | None = None
    end: datetime | None = None
    subject_id: uuid.UUID | None = None
    action: str | None = None

    @classmethod
    def build(cls, start: datetime | None, end: datetime | None, subject_id: str | uuid.UUID | None,
              action: str | None) -> ExportFilter:
        try:
            sid = uuid.UUID(str(subject_id)) if subject_id else None
        except ValueError as exc:
            raise ExportError(f"subject_id {subject_id!r} is not a UUID") from exc
        start, end = (t.replace(tzinfo=UTC) if t is not None and t.tzinfo is None else t for t in (start, end))
        if start and end and end <= start:
            raise ExportError("'to' must be after 'from'")
        return cls(start, end, sid, action or None)

    def describe(self) -> dict[str, Any]:
        return {
            "from": ts_text(self.start) if self.start else None,
            "to": ts_text(self.end) if self.end else None,
            "subject_id": str(self.subject_id) if self.subject_id else None,
            "action": self.action,
        }

    def matches(self, rec: dict[str, Any]) -> bool:
        if self.action is not None and rec["action"] != self.action:
            return False
        return self.subject_id is None or rec["subject_id"] == str(self.subject_id)


def _window_sql(flt: ExportFilter) -> tuple[str, list[Any]]:
    """Rows holding at least one record of the window's time range (a block row spans first_ts..ts)."""
    clauses, params = [], []
    if flt.start is not None:
        clauses.append("ts >= %s")
        params.append(flt.start)
    if flt.end is not None:
        clauses.append("coalesce(first_ts, ts) < %s")
        params.append(flt.end)
    return (" WHERE " + " AND ".join(clauses)) if clauses else "", params


def records_of(row: dict[str, Any]) -> list[dict[str, Any]]:
    """The records a row holds, in the exported form: one, or a whole match block."""
    return unpack_block(row) if row.get("events") is not None else [record_from_row(row)]


def _in_window(rec: dict[str, Any], flt: ExportFilter) -> bool:
    ts = datetime.fromisoformat(rec["ts"])
    return (flt.start is None or ts >= flt.start) and (flt.end is None or ts < flt.end)


def _row_holding(cur: psycopg.Cursor[Any], chain: str, seq: int) -> dict[str, Any] | None:
    """The row of ``chain`` that holds record ``seq``: its own, or the block's (whose seq is its last)."""
    return cur.execute(  # type: ignore[no-any-return]
        f"SELECT {_RECORD_COLUMNS} FROM audit_log WHERE chain = %s AND seq >= %s ORDER BY seq LIMIT 1",  # noqa: S608
        (chain, seq),
    ).fetchone()


def _row_at(cur: psycopg.Cursor[Any], chain: str, seq: int) -> dict[str, Any] | None:
    """The record ``seq`` of ``chain``, from its own row or from the block holding it."""
    row = _row_holding(cur, chain, seq)
    if row is None:
        return None
    return next((r for r in records_of(row) if r["seq"] == seq), None)


def _exact_segment(cur: psycopg.Cursor[Any], chain: str, first: int, last: int,
                   flt: ExportFilter) -> tuple[int, int] | None:
    """Narrow a segment found by rows to the records inside the time window: a block at either end
    may hold records outside it (``ts`` never decreases along a chain, so only the ends can)."""
    for end in ("first", "last"):
        row = _row_holding(cur, chain, first if end == "first" else last)
        if row is None or row.get("events") is None:
            continue
        inside = [r["seq"] for r in records_of(row) if first <= r["seq"] <= last and _in_window(r, flt)]
        if not inside:  # an end block spans the window without a record in it: so does the chain
            return None
        if end == "first":
            first = min(inside)
        else:
            last = max(inside)
    return (first, last) if first <= last else None


def export_objects(conn: psycopg.Connection[Any], public_key_pem: str, flt: ExportFilter) -> Iterator[dict[str, Any]]:
    """Every line of the export but the end line, as objects, from a snapshot on ``conn``."""
    where, params = _window_sql(flt)
    found = conn.execute(
        f"SELECT chain, min({_FIRST_SEQ}), max(seq) FROM audit_log{where} GROUP BY chain ORDER BY chain",  # noqa: S608
        params,  # ``where`` holds fixed fragments only; values are parameters
    ).fetchall()
    windowed = flt.start is not None or flt.end is not None
    cur = conn.cursor(row_factory=dict_row)
    segments = []
    for chain, first, last in found:
        exact = _exact_segment(cur, chain, first, last, flt) if windowed else (first, last)
        if exact is not None:
            segments.append((chain, *exact))
    yield {
        "type": "header",
        "format": EXPORT_FORMAT,
        "v": 1,
        "generated_at": ts_text(datetime.now(UTC)),
        "filters": flt.describe(),
        "subject_digest": subject_digest(flt.subject_id),
        "public_key_pem": public_key_pem,
        "key_id": key_fingerprint(public_key_pem.encode()),
        "chains": len(segments),
    }
    for chain, first, last in segments:
        rows = cur.execute(
            """(SELECT * FROM audit_checkpoints WHERE chain = %s AND seq BETWEEN %s AND %s ORDER BY seq, id)
               UNION ALL
               (SELECT * FROM audit_checkpoints WHERE chain = %s AND seq > %s ORDER BY seq, id LIMIT 1)""",
            (chain, first - 1, last, chain, last),
        ).fetchall()
        for row in rows:
            yield {"type": "checkpoint", **row_to_checkpoint(row)}
    for chain, first, last in segments:
        if windowed:
            yield from _neighbour(cur, chain, first - 1, "before")
        with conn.cursor(name=f"audit_export_{uuid.uuid4().hex[:8]}", row_factory=dict_row) as scan:
            scan.itersize = 200  # a block row expands to up to BLOCK_MAX records
            scan.execute(
                f"SELECT {_RECORD_COLUMNS} FROM audit_log WHERE chain = %s AND seq >= %s "  # noqa: S608
                f"AND {_FIRST_SEQ} <= %s ORDER BY seq",
                (chain, first, last),
            )
            for row in scan:
                for rec in records_of(row):
                    if first <= rec["seq"] <= last:
                        yield {"type": "record", **rec} if flt.matches(rec) else {"type": "stub",
                                                                                  "reason": "filtered",
                                                                                  **stub_of(rec)}
        if windowed:
            yield from _neighbour(cur, chain, last + 1, "after")


def _neighbour(cur: psycopg.Cursor[Any], chain: str, seq: int, reason: str) -> Iterator[dict[str, Any]]:
    if seq < 1:
        return
    rec = _row_at(cur, chain, seq)
    if rec is not None:
        yield {"type": "stub", "reason": reason, **stub_of(rec)}


def end_message(sha256_hex: str, lines: int) -> bytes:
    return canonical_json({"type": EXPORT_FORMAT + "-end", "sha256": sha256_hex, "lines": lines})


def _csv_line(obj: dict[str, Any]) -> bytes:
    buf = io.StringIO()
    row = [obj.get(c) if c != "json" else canonical_json(obj).decode() for c in CSV_COLUMNS]
    csv.writer(buf, lineterminator="\n").writerow(["" if v is None else v for v in row])
    return buf.getvalue().encode()


def encode_line(obj: dict[str, Any], fmt: str) -> bytes:
    return _csv_line(obj) if fmt == "csv" else canonical_json(obj) + b"\n"


def export_lines(dsn_or_pool: Any, keys: KeyProvider, flt: ExportFilter, fmt: str = "jsonl") -> Iterator[bytes]:
    """The export as bytes lines, signed at the end (one signing round trip per export)."""
    dsn = dsn_or_pool if isinstance(dsn_or_pool, str) else dsn_or_pool.conninfo
    pem = keys.public_key_pem().decode()
    digest = hashlib.sha256()
    count = 0
    if fmt == "csv":
        head = (",".join(CSV_COLUMNS) + "\n").encode()
        digest.update(head)
        yield head
    with psycopg.connect(dsn, autocommit=False) as conn:
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        for obj in export_objects(conn, pem, flt):
            line = encode_line(obj, fmt)
            digest.update(line)
            count += 1
            yield line
        conn.rollback()
    sha = digest.hexdigest()
    end = {"type": "end", "lines": count, "sha256": sha, "key_id": key_fingerprint(pem.encode()),
           "signature": keys.sign(end_message(sha, count)).hex()}
    yield encode_line(end, fmt)
