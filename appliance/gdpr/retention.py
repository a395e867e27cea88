"""Faces expire (DESIGN.md, "Visits and retention"): a subject not enrolled or recognised for
``subject_retention_days`` is erased by the daily sweep, through the ordinary erasure job.

A subject's retention runs from the latest of: its creation, its last enrolment (newest encoding),
its last accepted match (``subjects.last_seen_at``, moved in batches by the visit writer). A
per-subject ``retain_until`` (``PATCH /v1/subjects/{id}``, e.g. the end of a consent) replaces that
rule for the subject. ``subject_retention_days = null`` keeps subjects without ``retain_until``.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from appliance.audit import AuditEvent
from appliance.logs import get_logger
from appliance.state import AppState

log = get_logger(__name__)
ACTOR = "system:retention"


@dataclass(frozen=True)
class Expiry:
    subject_id: uuid.UUID
    expires_at: datetime
    reason: str  # why it expires, for --dry-run and the audit record

    def as_dict(self) -> dict[str, Any]:
        return {"subject_id": str(self.subject_id), "expires_at": self.expires_at.isoformat(), "reason": self.reason}


def expiry_of(retain_until: datetime | None, created: datetime, last_enrolled: datetime | None,
              last_seen: datetime | None, days: int | None) -> tuple[datetime | None, str]:
    """When a subject expires and why (pure: the rule, testable without a server). None: kept."""
    if retain_until is not None:
        return retain_until, f"retain_until {retain_until.isoformat()} passed"
    if days is None:
        return None, "subject_retention_days is null"
    basis, what = created, "created"
    if last_enrolled is not None and last_enrolled > basis:
        basis, what = last_enrolled, "last enrolled"
    if last_seen is not None and last_seen > basis:
        basis, what = last_seen, "last recognised"
    return basis + timedelta(days=days), f"{what} {basis.isoformat()}, more than {days} days ago"


def expired_subjects(conn: Any, now: datetime, days: int | None) -> list[Expiry]:
    """Active subjects whose retention ended before ``now`` (time injected: tests pass their own)."""
    rows = conn.execute(
        """SELECT s.id, s.retain_until, s.created_at,
                  (SELECT max(e.created_at) FROM encodings e WHERE e.subject_id = s.id), s.last_seen_at
           FROM subjects s
           WHERE s.state = 'active'
             AND (s.retain_until < %(now)s
                  OR (s.retain_until IS NULL AND %(days)s::integer IS NOT NULL
                      AND greatest(s.created_at, s.last_seen_at,
                                   (SELECT max(e.created_at) FROM encodings e WHERE e.subject_id = s.id))
                          < %(now)s - make_interval(days => %(days)s::integer)))
           ORDER BY s.id""", {"now": now, "days": days}).fetchall()
    out = []
    for sid, retain_until, created, enrolled, seen in rows:
        expires_at, reason = expiry_of(retain_until, created, enrolled, seen, days)
        if expires_at is not None and expires_at < now:  # the SQL and the rule agree; the rule has the last word
            out.append(Expiry(sid, expires_at, reason))
    return out


def sweep_subjects(state: AppState, *, now: datetime | None = None, dry_run: bool = False,
                   actor: str = ACTOR) -> tuple[list[Expiry], list[dict[str, Any]]]:
    """Erase every expired subject (each with its signed receipt); ``dry_run`` only lists them.

    Returns who expired and the finished erasure jobs. Audited either way (``subject.retention``)."""
    from appliance.gdpr.erasure import run_erasure, start_erasure

    now = now or datetime.now(UTC)
    days = state.settings.subject_retention_days
    with state.pool.connection() as conn, conn.transaction():
        expired = expired_subjects(conn, now, days)
        state.audit.record(conn, AuditEvent("subject.retention", actor, details={
            "dry_run": dry_run, "expired": len(expired), "subject_retention_days": days, "now": now.isoformat()}))
    jobs = []
    if not dry_run:
        for e in expired:
            with state.pool.connection() as conn, conn.transaction():
                state.audit.record(conn, AuditEvent("subject.expire", actor, subject_id=e.subject_id, details={
                    "expires_at": e.expires_at.isoformat(), "reason": e.reason}))
            job_id = start_erasure(state, e.subject_id, actor, None)
            jobs.append(run_erasure(state, job_id))
            log.info("retention: subject erased", subject_id=str(e.subject_id), reason=e.reason)
    return expired, jobs
