"""The match path's side of visits: fold each result into an in-memory buffer; a thread upserts it.

``record`` costs the match one lock and one dict update: the buffer holds one entry per passage
(``camera_id`` + ``track_id``), not per frame. Every ``visits_flush_interval`` the writer thread swaps
the buffer out, COPYs it into a temporary table and upserts ``visits`` from there, in one transaction
that also moves ``subjects.last_seen_at`` (the last accepted match, for the expiry of faces): one
write per batch, never one per match.

One passage, one row, across API workers: a tracked visit's id is ``uuid5(camera, track, day)``, where
``day`` is the UTC day of the track's first frame as this process saw it, so each worker that saw
frames of the track upserts the same row (frames add up, first/last seen widen, a match wins over
unknown). The one case that gives two rows: two workers whose first frames of one track fall either
side of midnight UTC. Track ids must therefore be unique per camera and day (a tracker's counter is).

Memory is bounded: at ``visits_buffer_size`` passages waiting (PostgreSQL down for a while), new
passages are dropped, counted (``appliance_visits_dropped_total``) and logged once per minute, so the
match path never waits for the database. Passages already buffered keep folding in their frames.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from itertools import count
from typing import Any

from prometheus_client import Counter, Gauge
from psycopg_pool import ConnectionPool

from appliance.logs import get_logger
from appliance.visits.queries import ROLLUP_HOURS_PER_ROUND, ROLLUP_SETTLE, roll_up, roll_up_days

log = get_logger(__name__)
DROPPED = Counter("appliance_visits_dropped_total", "Passages not recorded because the visit buffer was full")
WRITTEN = Counter("appliance_visits_written_total", "Visit rows upserted (one per passage per flush)")
WRITE_ERRORS = Counter("appliance_visits_write_errors_total", "Failed visit batch writes (retried)")
BUFFERED = Gauge("appliance_visits_buffered", "Passages waiting for the visit writer")

VISIT_NAMESPACE = uuid.UUID("6f1d2c1e-7a43-5b8e-9c1d-3e0a5f7b2d90")
RECENT_MAX = 50_000  # tracks remembered after a flush, so a track's later frames keep its day
RECENT_SECONDS = 3600.0
_COLUMNS = "day, id, camera_id, track_id, first_seen, last_seen, decision, subject_id, similarity, frames"
_TYPES = ["date", "uuid", "text", "text", "timestamptz", "timestamptz", "text", "uuid", "float4", "int4"]


@dataclass(slots=True)
class Passage:
    """What the buffer holds per passage until the next flush (this process's frames only)."""

    camera_id: str | None
    track_id: str | None
    first_seen: float
    last_seen: float
    decision: str
    subject: bytes | None
    similarity: float | None
    frames: int

    def fold(self, other: Passage) -> None:
        """Merge a later frame (or an unwritten batch back): the same rule as the upsert's."""
        self.first_seen = min(self.first_seen, other.first_seen)
        self.last_seen = max(self.last_seen, other.last_seen)
        self.frames += other.frames
        if other.similarity is not None and (self.similarity is None or other.similarity > self.similarity):
            self.similarity = other.similarity
        if other.decision == "match":
            self.decision, self.subject = "match", other.subject


def utc_day(ts: float) -> date:
    return datetime.fromtimestamp(ts, UTC).date()


def visit_id(camera_id: str | None, track_id: str, day: date) -> uuid.UUID:
    """The id every worker computes for the same track on the same day (so their writes meet)."""
    return uuid.uuid5(VISIT_NAMESPACE, f"{camera_id or ''}\x1f{track_id}\x1f{day.isoformat()}")


class VisitRecorder:
    """The process's visit buffer and its writer thread."""

    def __init__(self, pool: ConnectionPool, *, flush_interval: float = 1.0, buffer_size: int = 100_000,
                 partitions_ahead: int = 7, retention_days: int = 30, rollup_interval: float = 60.0) -> None:
        self.pool, self.flush_interval, self.buffer_size = pool, flush_interval, buffer_size
        self.partitions_ahead, self.retention_days = partitions_ahead, retention_days
        self.rollup_interval = rollup_interval
        self._rolled_at = 0.0
        self._pending: dict[Any, Passage] = {}
        self._lock = threading.Lock()
        self._single = count()  # keys for passages without a track (each its own visit)
        self._recent: OrderedDict[tuple[str | None, str], tuple[date, float, float]] = OrderedDict()
        self._days: set[date] = set()  # partitions known to exist
        self._dropped_logged = 0.0
        self._written = 0  # flushes completed (for flush())
        self._cond = threading.Condition()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # --- the match path -------------------------------------------------------------------------------
    def record_match(self, result: Any, camera_id: str | None, track_id: str | None) -> None:
        """Fold one match result (``appliance.matching.MatchResult``) into its passage. Never blocks on I/O."""
        best = result.best
        similarity = best.similarity if best is not None else None
        track = result.track
        if track is not None:
            cam = track.camera_id if track.camera_id is not None else camera_id
            self.record(cam, track.track_id, track.decision, track.subject if track.decision == "match" else None,
                        similarity, track.first_seen, track.last_seen)
        else:
            now = time.time()
            subject = best.subject if best is not None and result.decision == "match" else None
            self.record(camera_id, track_id, result.decision, subject, similarity, now, now)

    def record(self, camera_id: str | None, track_id: str | None, decision: str, subject: bytes | None,
               similarity: float | None, first_seen: float, last_seen: float) -> None:
        passage = Passage(camera_id, track_id, first_seen, last_seen, decision, subject, similarity, 1)
        key: Any = (camera_id, track_id) if track_id is not None else next(self._single)
        with self._lock:
            held = self._pending.get(key)
            if held is not None:
                held.fold(passage)
                return
            if len(self._pending) >= self.buffer_size:
                self._dropped()
                return
            self._pending[key] = passage

    def _dropped(self) -> None:
        DROPPED.inc()
        now = time.monotonic()
        if now - self._dropped_logged > 60:
            self._dropped_logged = now
            log.warning("visits: buffer full, new passages are dropped (is PostgreSQL down?)",
                        buffered=len(self._pending), buffer_size=self.buffer_size)

    # --- the writer thread ----------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="visit-writer", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Write what is buffered (one last try, bounded by ``timeout``), then end the thread."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until what was recorded before this call is written; False on timeout (tests, exports)."""
        with self._cond:
            target = self._written + 2  # the flush under way may have swapped before our records arrived
            deadline = time.monotonic() + timeout
            while self._written < target:
                self._wake.set()
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.05))
        return True

    def _run(self) -> None:
        while True:
            stopping = self._stop.is_set()
            self.write_once(retry_until=time.monotonic() + (2.0 if stopping else 0.0))
            if stopping:
                return
            if time.monotonic() - self._rolled_at >= self.rollup_interval:
                self._rolled_at = time.monotonic()
                self.roll_up_closed_hours()
            self._wake.wait(self.flush_interval)
            self._wake.clear()

    def write_once(self, retry_until: float = 0.0) -> int:
        """Swap the buffer out and upsert it; on failure put it back (folded) for the next round."""
        with self._lock:
            batch, self._pending = self._pending, {}
        BUFFERED.set(len(batch))
        written = 0
        if batch:
            delay = 0.05
            while True:
                try:
                    written = self._write(batch)
                    break
                except Exception as exc:  # PostgreSQL down or restarting: keep the passages, retry later
                    WRITE_ERRORS.inc()
                    if time.monotonic() >= retry_until:
                        log.warning("visits: batch write failed, kept for the next flush", passages=len(batch),
                                    error=f"{type(exc).__name__}: {exc}"[:300])
                        self._put_back(batch)
                        break
                    time.sleep(delay)
                    delay = min(delay * 2, 0.5)
        with self._cond:
            self._written += 1
            self._cond.notify_all()
        return written

    def roll_up_closed_hours(self, now: datetime | None = None) -> int:
        """Count up to a day of closed, not yet rolled-up hours within retention (newest first), so
        dashboard summaries read the roll-up. Failures wait for the next round."""
        now = now or datetime.now(UTC)
        end = (now - ROLLUP_SETTLE).replace(minute=0, second=0, microsecond=0)
        try:
            with self.pool.connection() as conn:
                hours = roll_up(conn, end - timedelta(days=self.retention_days), end, ROLLUP_HOURS_PER_ROUND)
                roll_up_days(conn, (end - timedelta(days=self.retention_days)).date(), end.date())
                return hours
        except Exception as exc:
            log.warning("visits: roll-up failed, retried next round", error=f"{type(exc).__name__}: {exc}"[:300])
            return 0

    def _put_back(self, batch: dict[Any, Passage]) -> None:
        with self._lock:
            for key, passage in batch.items():
                held = self._pending.get(key)
                if held is not None:
                    passage.fold(held)
                self._pending[key] = passage

    def rows(self, batch: dict[Any, Passage], now: float) -> list[tuple[Any, ...]]:
        """The batch as ``visits`` rows: each tracked passage keeps the day (and id) its track started on."""
        out = []
        recent = self._recent
        for p in batch.values():
            if p.track_id is not None:
                rkey = (p.camera_id, p.track_id)
                seen = recent.get(rkey)
                if seen is not None and p.first_seen - seen[2] < RECENT_SECONDS:
                    day, first = seen[0], min(seen[1], p.first_seen)
                else:
                    day, first = utc_day(p.first_seen), p.first_seen
                recent[rkey] = (day, first, max(p.last_seen, seen[2] if seen else 0.0))
                recent.move_to_end(rkey)
                vid = visit_id(p.camera_id, p.track_id, day)
            else:
                day, first, vid = utc_day(p.first_seen), p.first_seen, uuid.uuid4()
            out.append((day, vid, p.camera_id, p.track_id, datetime.fromtimestamp(first, UTC),
                        datetime.fromtimestamp(p.last_seen, UTC), p.decision,
                        uuid.UUID(bytes=p.subject) if p.subject is not None else None, p.similarity, p.frames))
        while len(recent) > RECENT_MAX or (recent and now - next(iter(recent.values()))[2] > RECENT_SECONDS):
            recent.popitem(last=False)
        return out

    def _write(self, batch: dict[Any, Passage]) -> int:
        rows = self.rows(batch, time.time())
        days = {r[0] for r in rows}
        closed = datetime.now(UTC) - ROLLUP_SETTLE
        late = any(r[4] < closed.replace(minute=0, second=0, microsecond=0) for r in rows)
        with self.pool.connection() as conn:
            missing = sorted(days - self._days)
            if missing:
                with conn.transaction():
                    conn.execute("SELECT visits_ensure_partitions(%s, %s)",
                                 (missing[0], (missing[-1] - missing[0]).days + self.partitions_ahead))
                self._days.update(missing[0] + timedelta(days=i)
                                  for i in range((missing[-1] - missing[0]).days + self.partitions_ahead))
            with conn.transaction():
                upsert(conn, rows, invalidate_closed=late)
        WRITTEN.inc(len(rows))
        return len(rows)


def upsert(conn: Any, rows: list[tuple[Any, ...]], invalidate_closed: bool = False) -> None:
    """Merge ``rows`` into ``visits`` in the caller's transaction, and move the subjects' last seen.

    A subject that is no longer active (being erased) is not named: its passage stays, as unknown."""
    conn.execute("CREATE TEMP TABLE IF NOT EXISTS visits_in (day date, id uuid, camera_id text, track_id text, "
                 "first_seen timestamptz, last_seen timestamptz, decision text, subject_id uuid, similarity real, "
                 "frames integer) ON COMMIT DELETE ROWS")
    with conn.cursor().copy(f"COPY visits_in ({_COLUMNS}) FROM STDIN (FORMAT BINARY)") as copy:
        copy.set_types(_TYPES)
        for row in rows:
            copy.write_row(row)
    conn.execute(
        """INSERT INTO visits (day, id, camera_id, track_id, first_seen, last_seen, decision, subject_id,
                               similarity, frames)
            SELECT v.day, v.id, v.camera_id, v.track_id, v.first_seen, v.last_seen,
                   CASE WHEN s.id IS NULL THEN 'unknown' ELSE v.decision END, s.id, v.similarity, v.frames
            FROM visits_in v LEFT JOIN subjects s ON s.id = v.subject_id AND s.state = 'active'
            ON CONFLICT (day, id) DO UPDATE SET
                first_seen = least(visits.first_seen, EXCLUDED.first_seen),
                last_seen = greatest(visits.last_seen, EXCLUDED.last_seen),
                frames = visits.frames + EXCLUDED.frames,
                similarity = greatest(visits.similarity, EXCLUDED.similarity),
                decision = CASE WHEN EXCLUDED.decision = 'match' THEN 'match' ELSE visits.decision END,
                subject_id = CASE WHEN EXCLUDED.decision = 'match' THEN EXCLUDED.subject_id
                                  ELSE visits.subject_id END""")
    conn.execute(
        """UPDATE subjects s SET last_seen_at = v.seen
           FROM (SELECT subject_id, max(last_seen) AS seen FROM visits_in
                 WHERE decision = 'match' AND subject_id IS NOT NULL GROUP BY subject_id) v
           WHERE s.id = v.subject_id AND s.state = 'active' AND (s.last_seen_at IS NULL OR s.last_seen_at < v.seen)""")
    if invalidate_closed:  # a late write into an hour already rolled up: recount that hour on the next read
        conn.execute("SELECT visits_invalidate_hours(ARRAY(SELECT DISTINCT date_trunc('hour', first_seen, 'UTC') "
                     "FROM visits_in))")
