"""Calibrated thresholds: measure a model on the site's own enrolments, store the result, apply it everywhere.

- ``measure`` reads the protected templates of active subjects (binary COPY, no DEK unwrapped: the
  template transform preserves inner products) and runs ``vector.calibration`` twice: single frames
  (``score_sets``) and simulated tracks (``track_scores``: the fused decision's own threshold, for the
  same FAR target per stranger track).
- ``record`` inserts a versioned ``model_thresholds`` row and its audit record in one transaction;
  ``applied=True`` makes it the model's threshold, after which ``notify`` tells every worker through the
  change feed.
- ``ThresholdRefresher`` (one per API worker) holds what applies in memory: it re-reads PostgreSQL on
  a feed message and every ``model_threshold_refresh_interval`` seconds (the fallback while Redis is
  down), and writes ``IndexService.thresholds``. The match path only reads that dict.

Precedence on a match, for the frame's threshold and the track's alike: the request's own ``threshold`` >
the applied calibration > the configured default (``threshold``, ``track_threshold``).
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np
from psycopg import Connection
from psycopg.types.json import Jsonb

from appliance.audit import AuditEvent
from appliance.audit.transaction import record_event
from appliance.logs import get_logger
from vector import calibration, store
from vector.feed import Feed

log = get_logger(__name__)
DEFAULT_SOURCE = "configured default"


@dataclass(frozen=True)
class Measurement:
    """A calibration report (single frames, and the fused decision of tracks) and the data it was measured on."""

    model: str
    report: calibration.Report
    template_version: int | None
    feed_seq: int | None
    track: calibration.Report | None = None  # genuine "pairs" are 3-frame tracks, impostor trials stranger tracks
    track_tar: dict[str, float | int] | None = None  # TAR of 3- and 5-frame tracks at the chosen track threshold

    def to_json(self) -> dict[str, Any]:
        track = None if self.track is None else {**self.track.to_json(), "tar_by_frames": self.track_tar}
        return {"model": self.model, "template_version": self.template_version, "feed_seq": self.feed_seq,
                **self.report.to_json(), "track": calibration._finite(track)}

    @property
    def refused(self) -> str | None:
        """Why ``--apply`` is refused: either threshold missing its target (both are applied, or neither)."""
        if self.report.chosen is None:
            return self.report.refused or "target refused"
        if self.track is None or self.track.chosen is None:
            return "track threshold: " + (self.track.refused if self.track is not None and self.track.refused
                                          else "not measured")
        return None


def measure(conn: Connection[Any], model: str, dim: int, target_far: float, min_frames: int = 2,
            window: int = 10) -> Measurement:
    """Score every active encoding of ``model`` against the others (one snapshot of the table), as single
    frames and as simulated tracks fused with ``min_frames`` / ``window`` (the settings ``track_*``)."""
    with conn.transaction():
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
        pos = store.feed_position(conn, model)
        if pos is None:
            batch, seq, version = store.TemplateBatch.empty(dim), None, None
        else:
            seq, version = pos
            batch = store.load_templates(conn, model, dim, version)
            gone = conn.execute(
                "SELECT e.label FROM encodings e JOIN subjects s ON s.id = e.subject_id "
                "WHERE e.model = %s AND s.state <> 'active'", (model,)).fetchall()
            if gone:
                batch = batch.take(~np.isin(batch.labels, [int(r[0]) for r in gone]))
    scores = calibration.score_sets(batch.templates, batch.subjects)
    tracks = calibration.track_scores(batch.templates, batch.subjects, min_frames=min_frames, window=window)
    track = calibration.calibrate(tracks.scores(calibration.TRACK_GENUINE_FRAMES[0]), target_far)
    tar = calibration.track_tar(tracks, track.chosen.threshold) if track.chosen is not None else None
    return Measurement(model, calibration.calibrate(scores, target_far), version, seq, track, tar)


def record(conn: Connection[Any], m: Measurement, actor: str, apply: bool, request_id: str | None = None) -> int:
    """Store a calibration (``apply``: as the model's threshold) with its audit record; returns its version.

    Raises ``calibration.InsufficientData`` (nothing stored) when ``apply`` but either target was refused
    (single frames or tracks: they are applied together).
    """
    chosen = m.report.chosen
    fused = m.track.chosen if m.track is not None else None
    if apply and m.refused is not None:
        short = m.track if chosen is not None and m.track is not None else m.report
        raise calibration.InsufficientData(m.refused, needed=short.subjects_needed, have=short.subjects)
    with conn.transaction():
        version = _next_version(conn, m.model)
        conn.execute(
            "INSERT INTO model_thresholds (model, version, applied, threshold, track_threshold, target_far, subjects, "
            "encodings, template_version, feed_seq, report, created_by) "
            "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
            (m.model, version, apply, chosen.threshold if chosen else None, fused.threshold if fused else None,
             m.report.target_far, m.report.subjects,
             m.report.encodings, m.template_version, m.feed_seq, Jsonb(m.to_json()), actor))
        details: dict[str, Any] = {"model": m.model, "version": version, "target_far": m.report.target_far,
                                   "subjects": m.report.subjects, "encodings": m.report.encodings,
                                   "template_version": m.template_version, "feed_seq": m.feed_seq}
        if chosen is not None:
            details.update(threshold=chosen.threshold, far_upper_bound=chosen.far_upper_bound, tar=chosen.tar)
        if fused is not None:
            details.update(track_threshold=fused.threshold, track_far_upper_bound=fused.far_upper_bound,
                           track_tar_3_frames=fused.tar)
        record_event(conn, AuditEvent(action="model.threshold.apply" if apply else "model.calibrate", actor=actor,
                                      object_id=f"{m.model}/v{version}", request_id=request_id, details=details))
    return version


def reset(conn: Connection[Any], model: str, actor: str) -> int:
    """Return ``model`` to its configured default threshold (a versioned, audited row with no threshold)."""
    with conn.transaction():
        version = _next_version(conn, model)
        conn.execute("INSERT INTO model_thresholds (model, version, applied, threshold, report, created_by) "
                     "VALUES (%s, %s, true, NULL, %s, %s)", (model, version, Jsonb({"reset": True}), actor))
        record_event(conn, AuditEvent(action="model.threshold.reset", actor=actor, object_id=f"{model}/v{version}",
                                      details={"model": model, "version": version}))
    return version


def _next_version(conn: Connection[Any], model: str) -> int:
    """Serialise writers of one model (transaction-scoped advisory lock) and take the next version."""
    conn.execute("SELECT pg_advisory_xact_lock(hashtext('model_thresholds:' || %s))", (model,))
    row = conn.execute("SELECT coalesce(max(version), 0) + 1 FROM model_thresholds WHERE model = %s",
                       (model,)).fetchone()
    assert row is not None
    return int(row[0])


def notify(redis_client: Any, model: str) -> bool:
    """Tell every worker to re-read ``model``'s threshold now; False when Redis is down (they re-read it
    within ``model_threshold_refresh_interval`` anyway)."""
    try:
        Feed(redis_client).publish_threshold(model)
    except Exception as exc:
        log.warning("threshold_notify_failed", model=model, error=type(exc).__name__)
        return False
    return True


@dataclass(frozen=True)
class Applied:
    """The newest applied row of a model (threshold None: reset to the configured default)."""

    version: int
    threshold: float | None
    target_far: float | None
    created_by: str
    created_at: datetime
    track_threshold: float | None = None  # None with a threshold: applied before 0012, the track uses ``threshold``

    def fused(self, default: float) -> float:
        """The track threshold this row applies (``default``: the configured one, after a reset)."""
        if self.threshold is None:
            return default
        return self.threshold if self.track_threshold is None else self.track_threshold


def thresholds_of(row: Applied | None, default: float, track_default: float) -> tuple[float, float]:
    """The (frame, track) thresholds a model applies: its applied calibration's, else the configured
    defaults (the API, the CLI and every worker's refresher answer with this one rule)."""
    if row is None:
        return default, track_default
    return (default if row.threshold is None else row.threshold), row.fused(track_default)


def applied_thresholds(conn: Connection[Any]) -> dict[str, Applied]:
    rows = conn.execute(
        "SELECT DISTINCT ON (model) model, version, threshold, target_far, created_by, created_at, track_threshold "
        "FROM model_thresholds WHERE applied ORDER BY model, version DESC").fetchall()
    return {r[0]: Applied(int(r[1]), None if r[2] is None else float(r[2]), r[3], r[4], r[5],
                          None if r[6] is None else float(r[6])) for r in rows}


def latest(conn: Connection[Any], model: str) -> dict[str, Any] | None:
    """The newest calibration of ``model`` (applied or not), with its row's metadata."""
    row = conn.execute(
        "SELECT version, applied, threshold, created_by, created_at, report, track_threshold FROM model_thresholds "
        "WHERE model = %s AND NOT (applied AND threshold IS NULL) ORDER BY version DESC LIMIT 1", (model,)).fetchone()
    if row is None:
        return None
    return {"version": int(row[0]), "applied": bool(row[1]), "threshold": row[2], "track_threshold": row[6],
            "created_by": row[3], "created_at": row[4].isoformat(), "report": row[5]}


def source_of(applied: Applied | None) -> str:
    if applied is None or applied.threshold is None:
        return DEFAULT_SOURCE
    return f"calibrated v{applied.version} at {applied.created_at.isoformat()} by {applied.created_by}"


class ThresholdRefresher:
    """One per API worker: keeps ``matcher.thresholds`` and ``matcher.track_thresholds`` equal to what
    PostgreSQL says applies."""

    def __init__(self, pool: Any, matcher: Any, defaults: dict[str, float], interval: float,
                 track_defaults: dict[str, float] | None = None) -> None:
        self.pool = pool
        self.matcher = matcher
        self.defaults = dict(defaults)
        # the configured track thresholds: what the matcher started with unless given (ModelSpec.fused_threshold)
        self.track_defaults = dict(track_defaults if track_defaults is not None
                                   else getattr(matcher, "track_thresholds", None) or defaults)
        self.interval = interval
        self.applied: dict[str, Applied] = {}
        self.loaded = False
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self.matcher.on_threshold = lambda _model: self._wake.set()
        self._thread = threading.Thread(target=self._run, name="threshold-refresh", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def refresh(self) -> None:
        with self.pool.connection() as conn:
            found = applied_thresholds(conn)
        fresh = {m: a for m, a in found.items() if m in self.defaults}
        for model, default in self.defaults.items():
            row, before = fresh.get(model), self.applied.get(model)
            value, fused = thresholds_of(row, default, self.track_defaults.get(model, default))
            version = None if row is None else row.version
            tracks = getattr(self.matcher, "track_thresholds", {})
            if (self.matcher.thresholds.get(model) != value or tracks.get(model) != fused
                    or version != (before.version if before else None)):
                tracks[model] = fused  # one dict store each: the match path reads them lock-free
                self.matcher.thresholds[model] = value
                log.info("model_threshold_applied", model=model, threshold=value, track_threshold=fused,
                         source=source_of(row), worker=os.getpid())
        self.applied = fresh
        self.loaded = True

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.clear()
            try:
                self.refresh()
            except Exception as exc:  # PostgreSQL briefly down: keep what applies, try again later
                log.warning("model_threshold_refresh_failed", error=type(exc).__name__)
            self._wake.wait(self.interval)


def report_json(m: Measurement) -> str:
    return json.dumps(m.to_json(), indent=2, default=str) + "\n"
