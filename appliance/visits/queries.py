"""Reading, erasing, exporting and expiring visits (the table and roll-up of migration 0010).

Every query names the ``day`` partitions it needs (``day`` is the UTC day of ``first_seen``), so
PostgreSQL reads only those. Summaries take closed hours from ``visit_rollup``, counting any closed
hour not rolled up yet from ``visits`` first (once; erasure and late writes remove the hours they
touch, so those are recounted), and count the open edges of the range from ``visits`` directly.
"""

from __future__ import annotations

import base64
import binascii
import uuid
from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any, Literal

from psycopg import sql

Interval = Literal["hour", "day"]
GroupBy = Literal["camera", "decision", "subject"]
MAX_RANGE = timedelta(days=400)
MAX_HOURLY_RANGE = timedelta(days=31)  # hourly buckets beyond a month make replies of megabytes: use days
ROLLUP_SETTLE = timedelta(minutes=15)  # an hour is rolled up once it ended this long ago
ROLLUP_HOURS_PER_ROUND = 24  # the writer's roll-up work per round (each round one short transaction)
ROLLUP_LOCK = "SELECT pg_advisory_xact_lock(hashtext('visit_rollup'))"  # also taken by visits_invalidate_hours
_COLUMNS = "id, camera_id, track_id, first_seen, last_seen, decision, subject_id, similarity, frames"
_GROUP_SQL = {"camera": "coalesce(camera_id, '')", "decision": "decision",
              "subject": "coalesce(subject_id::text, '')"}


class VisitQueryError(ValueError):
    """A filter that cannot be answered (the API maps it to 422)."""


@dataclass(frozen=True)
class VisitFilter:
    start: datetime  # inclusive, on first_seen
    end: datetime  # exclusive
    camera_id: str | None = None
    subject_id: uuid.UUID | None = None
    decision: str | None = None

    @classmethod
    def build(cls, start: datetime | None, end: datetime | None, camera_id: str | None = None,
              subject_id: uuid.UUID | None = None, decision: str | None = None,
              now: datetime | None = None, default_span: timedelta = timedelta(days=1)) -> VisitFilter:
        """Defaults: up to now, over the last day. Refuses naive times, empty and over-long ranges."""
        for name, value in (("from", start), ("to", end)):
            if value is not None and value.tzinfo is None:
                raise VisitQueryError(f"'{name}' needs a time zone (e.g. 2026-01-31T08:00:00Z)")
        end = end or (now or datetime.now(UTC))
        start = start or end - default_span
        if start >= end:
            raise VisitQueryError("'from' must be before 'to'")
        if end - start > MAX_RANGE:
            raise VisitQueryError(f"the range spans more than {MAX_RANGE.days} days")
        if decision is not None and decision not in ("match", "unknown"):
            raise VisitQueryError("decision must be 'match' or 'unknown'")
        return cls(start.astimezone(UTC), end.astimezone(UTC), camera_id, subject_id, decision)

    def where(self) -> tuple[sql.Composed, list[Any]]:
        clauses = [sql.SQL("day BETWEEN %s AND %s"), sql.SQL("first_seen >= %s"), sql.SQL("first_seen < %s")]
        params: list[Any] = [self.start.date(), self.end.date(), self.start, self.end]
        for column, value in (("camera_id", self.camera_id), ("subject_id", self.subject_id),
                              ("decision", self.decision)):
            if value is not None:
                clauses.append(sql.SQL("{} = %s").format(sql.Identifier(column)))
                params.append(value)
        return sql.SQL(" AND ").join(clauses), params

    def describe(self) -> dict[str, Any]:
        return {"from": self.start.isoformat(), "to": self.end.isoformat(), "camera_id": self.camera_id,
                "subject_id": str(self.subject_id) if self.subject_id else None, "decision": self.decision}


def encode_cursor(first_seen: datetime, vid: uuid.UUID) -> str:
    return base64.urlsafe_b64encode(f"{first_seen.astimezone(UTC).isoformat()}|{vid}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, uuid.UUID]:
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        ts, vid = text.split("|")
        when = datetime.fromisoformat(ts)
        if when.tzinfo is None:
            raise ValueError
        return when, uuid.UUID(vid)
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise VisitQueryError("'cursor' is not a cursor this API returned") from None


def _row(r: tuple[Any, ...]) -> dict[str, Any]:
    return {"id": r[0], "camera_id": r[1], "track_id": r[2], "first_seen": r[3], "last_seen": r[4],
            "decision": r[5], "subject_id": r[6], "similarity": None if r[7] is None else round(float(r[7]), 4),
            "frames": r[8]}


def list_visits(conn: Any, flt: VisitFilter, limit: int, cursor: str | None = None
                ) -> tuple[list[dict[str, Any]], str | None]:
    """Newest first, ``limit`` per page; the cursor is the last row's (first_seen, id) (keyset paging)."""
    where, params = flt.where()
    if cursor is not None:
        when, vid = decode_cursor(cursor)
        where = sql.SQL("{} AND (first_seen, id) < (%s, %s)").format(where)
        params += [when, vid]
    query = sql.SQL("SELECT {} FROM visits WHERE {} ORDER BY first_seen DESC, id DESC LIMIT %s").format(
        sql.SQL(_COLUMNS), where)
    rows = conn.execute(query, (*params, limit + 1)).fetchall()
    items = [_row(r) for r in rows[:limit]]
    nxt = encode_cursor(items[-1]["first_seen"], items[-1]["id"]) if len(rows) > limit else None
    return items, nxt


def _hour_floor(t: datetime) -> datetime:
    return t.replace(minute=0, second=0, microsecond=0)


def _hour_ceil(t: datetime) -> datetime:
    f = _hour_floor(t)
    return f if f == t else f + timedelta(hours=1)


def summary(conn: Any, start: datetime, end: datetime, interval: Interval, group_by: GroupBy,
            now: datetime | None = None) -> list[dict[str, Any]]:
    """Visit counts per ``interval`` bucket (UTC) and group, oldest bucket first.

    Whole days rolled up come from ``visit_rollup_days`` (for ``interval=day``), rolled-up hours from
    ``visit_rollup``; everything else (the open edges of the range, hours not rolled up yet or that an
    erasure invalidated) is counted from ``visits``. A read never writes: the visit writer keeps the
    roll-ups current (``roll_up``, ``roll_up_days``)."""
    if interval == "hour" and end - start > MAX_HOURLY_RANGE:
        raise VisitQueryError(f"interval=hour covers at most {MAX_HOURLY_RANGE.days} days; use interval=day")
    now = now or datetime.now(UTC)
    counts: dict[tuple[datetime, str], int] = defaultdict(int)
    rest = [(start, end)]
    if interval == "day":
        done = [r[0] for r in conn.execute(
            "SELECT day FROM visit_rollup_days_done WHERE day >= %s AND day < %s ORDER BY day",
            (_day_ceil(start), end.astimezone(UTC).date())).fetchall()]
        if done:
            for day, key, n in conn.execute(
                "SELECT day, key, visits FROM visit_rollup_days WHERE dim = %s AND day >= %s AND day <= %s",
                (group_by, done[0], done[-1])).fetchall():
                counts[(_midnight(day), key)] += int(n)
            rest = _gaps(start, end, [(_midnight(d), _midnight(d) + timedelta(days=1)) for d in done])
    for lo, hi in rest:
        _hourly(conn, lo, hi, interval, group_by, now, counts)
    out = [{"start": bucket, "key": key or None, "visits": n} for (bucket, key), n in counts.items() if n]
    out.sort(key=lambda x: (x["start"], x["key"] or ""))
    return out


def _midnight(day: date) -> datetime:
    return datetime(day.year, day.month, day.day, tzinfo=UTC)


def _day_ceil(t: datetime) -> date:
    t = t.astimezone(UTC)
    return t.date() if _midnight(t.date()) == t else t.date() + timedelta(days=1)


def _gaps(start: datetime, end: datetime, covered: list[tuple[datetime, datetime]]) -> list[tuple[datetime, datetime]]:
    """The parts of [start, end) outside the sorted, disjoint ``covered`` ranges."""
    out, lo = [], start
    for a, b in covered:
        if a > lo:
            out.append((lo, a))
        lo = max(lo, b)
    if lo < end:
        out.append((lo, end))
    return out


def _hourly(conn: Any, start: datetime, end: datetime, interval: Interval, group_by: GroupBy, now: datetime,
            counts: dict[tuple[datetime, str], int]) -> None:
    """Add [start, end)'s counts: rolled-up hours from ``visit_rollup``, the rest from ``visits``."""
    closed_end = min(_hour_floor(end), _hour_floor(now - ROLLUP_SETTLE))
    rolled_start = _hour_ceil(start)
    raw = [(start, end)]
    if rolled_start < closed_end:
        rolled = [r[0] for r in conn.execute(
            "SELECT hour FROM visit_rollup_hours WHERE hour >= %s AND hour < %s ORDER BY hour",
            (rolled_start, closed_end)).fetchall()]
        raw = _gaps(start, end, [(h, h + timedelta(hours=1)) for h in rolled])
        if rolled:
            for bucket, key, n in conn.execute(
                "SELECT date_trunc(%s, hour, 'UTC'), key, sum(visits) FROM visit_rollup "
                "WHERE dim = %s AND hour >= %s AND hour < %s GROUP BY 1, 2",
                (interval, group_by, rolled[0], rolled[-1] + timedelta(hours=1)),
            ).fetchall():
                counts[(bucket, key)] += int(n)
    group = sql.SQL(_GROUP_SQL[group_by])
    for lo, hi in raw:
        for bucket, key, n in conn.execute(sql.SQL(
            "SELECT date_trunc(%s, first_seen, 'UTC'), {}, count(*) FROM visits "
            "WHERE day BETWEEN %s AND %s AND first_seen >= %s AND first_seen < %s GROUP BY 1, 2").format(group),
            (interval, lo.astimezone(UTC).date(), hi.astimezone(UTC).date(), lo, hi),
        ).fetchall():
            counts[(bucket, key)] += int(n)


def roll_up(conn: Any, start: datetime, end: datetime, max_hours: int | None = None) -> int:
    """Count the closed hours in [start, end) that have no roll-up yet (the newest ``max_hours`` of
    them); returns how many hours it did. Run by the visit writer, in its own transaction.

    Two processes doing the same hour at once insert the same counts; the second's are ignored."""
    missing = [r[0] for r in conn.execute(
        """SELECT h FROM generate_series(%s::timestamptz, %s::timestamptz - interval '1 hour', interval '1 hour') h
           WHERE NOT EXISTS (SELECT 1 FROM visit_rollup_hours r WHERE r.hour = h)
           ORDER BY h""", (start, end)).fetchall()]  # ordered: an anti-join may return them in any order
    if max_hours is not None:
        missing = missing[-max_hours:]
    if not missing:
        return 0
    lo, hi = missing[0], missing[-1] + timedelta(hours=1)
    with conn.transaction():
        conn.execute(ROLLUP_LOCK)
        conn.execute(
            """INSERT INTO visit_rollup (hour, dim, key, visits)
               SELECT date_trunc('hour', v.first_seen, 'UTC') AS hour, g.dim, g.key, count(*)
               FROM visits v, LATERAL (VALUES ('camera', coalesce(v.camera_id, '')), ('decision', v.decision),
                                              ('subject', coalesce(v.subject_id::text, ''))) AS g (dim, key)
               WHERE v.day BETWEEN %s AND %s AND v.first_seen >= %s AND v.first_seen < %s
                 AND date_trunc('hour', v.first_seen, 'UTC') = ANY(%s)
               GROUP BY 1, 2, 3
               ON CONFLICT DO NOTHING""",
            (lo.astimezone(UTC).date(), hi.astimezone(UTC).date(), lo, hi, missing))
        conn.execute("INSERT INTO visit_rollup_hours (hour) SELECT unnest(%s::timestamptz[]) ON CONFLICT DO NOTHING",
                     (missing,))
    return len(missing)


def roll_up_days(conn: Any, first: date, last: date) -> int:
    """Sum each day in [first, last] whose 24 hours are rolled up into ``visit_rollup_days``."""
    with conn.transaction():
        conn.execute(ROLLUP_LOCK)
        ready = [r[0] for r in conn.execute(
            """SELECT d::date FROM generate_series(%s::date, %s::date, interval '1 day') d
               WHERE NOT EXISTS (SELECT 1 FROM visit_rollup_days_done x WHERE x.day = d::date)
                 AND (SELECT count(*) FROM visit_rollup_hours h
                      WHERE h.hour >= d::timestamp AT TIME ZONE 'UTC'
                        AND h.hour < (d + interval '1 day')::timestamp AT TIME ZONE 'UTC') = 24""",
            (first, last)).fetchall()]
        if ready:
            conn.execute(
                """INSERT INTO visit_rollup_days (day, dim, key, visits)
                   SELECT (hour AT TIME ZONE 'UTC')::date, dim, key, sum(visits) FROM visit_rollup
                   WHERE (hour AT TIME ZONE 'UTC')::date = ANY(%s) GROUP BY 1, 2, 3 ON CONFLICT DO NOTHING""",
                (ready,))
            conn.execute("INSERT INTO visit_rollup_days_done (day) SELECT unnest(%s::date[]) ON CONFLICT DO NOTHING",
                         (ready,))
    return len(ready)


def delete_subject_visits(conn: Any, subject_id: uuid.UUID) -> int:
    """Erasure: delete the subject's visits and forget the roll-up of the hours they were in (recounted)."""
    conn.execute("SELECT visits_invalidate_hours(ARRAY(SELECT DISTINCT date_trunc('hour', first_seen, 'UTC') "
                 "FROM visits WHERE subject_id = %s))", (subject_id,))
    return conn.execute("DELETE FROM visits WHERE subject_id = %s", (subject_id,)).rowcount


def subject_visits(conn: Any, subject_id: uuid.UUID) -> list[dict[str, Any]]:
    """Every visit naming the subject, oldest first (the access export)."""
    rows = conn.execute(sql.SQL("SELECT {} FROM visits WHERE subject_id = %s ORDER BY first_seen, id").format(
        sql.SQL(_COLUMNS)), (subject_id,)).fetchall()
    return [_row(r) for r in rows]


def retention_cutoff(now: datetime, retention_days: int) -> date:
    """The first UTC day kept: whole days older than ``retention_days`` go."""
    return (now.astimezone(UTC) - timedelta(days=retention_days)).date()


def partitions_due(conn: Any, cutoff: date) -> list[str]:
    """The day partitions the sweep would drop (for ``--dry-run``)."""
    return [r[0] for r in conn.execute(
        """SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
           WHERE i.inhparent = 'visits'::regclass AND c.relname ~ '^visits_[0-9]{8}$'
             AND to_date(substr(c.relname, 8), 'YYYYMMDD') < %s ORDER BY 1""", (cutoff,)).fetchall()]


def drop_expired(conn: Any, cutoff: date) -> list[str]:
    """Drop the day partitions before ``cutoff`` (and their roll-up), in the caller's transaction."""
    return [r[0] for r in conn.execute("SELECT visits_drop_before(%s)", (cutoff,)).fetchall()]


def ensure_partitions(conn: Any, today: date, ahead: int) -> int:
    return int(conn.execute("SELECT visits_ensure_partitions(%s, %s)", (today, ahead)).fetchone()[0])
