"""Audit retention by dropping whole monthly partitions, never by deleting rows.

Match events (class ``match``) live in the ``_match`` leaf of each month, everything else in the
``_audit`` leaf; each leaf is dropped once its month ended longer ago than its class's retention.
Because ``ts`` never decreases along a chain and a chain has one class, a drop removes a *prefix* of
each chain it touches. Before dropping, the last removed record of each such chain is signed as a
``retention`` checkpoint, in the same transaction as the drop: the verifier accepts a chain that
starts at ``seq = k + 1`` when a signed checkpoint says record ``k`` hashed to its ``prev``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any

import psycopg
from psycopg import sql

from appliance.audit import AuditEvent
from appliance.audit.checkpoints import insert_checkpoint, sign_checkpoint
from appliance.audit.transaction import record_event
from appliance.logs import get_logger
from crypto.providers.base import KeyProvider

log = get_logger(__name__)
_MONTH = re.compile(r"^audit_log_(\d{4})_(\d{2})$")


@dataclass(frozen=True)
class RetentionPolicy:
    match_days: int = 90
    audit_days: int = 365
    partitions_ahead: int = 3

    @classmethod
    def from_settings(cls, settings: Any) -> RetentionPolicy:
        return cls(
            match_days=int(settings.audit_match_retention_days),
            audit_days=int(settings.audit_retention_days),
            partitions_ahead=int(settings.audit_partitions_ahead),
        )


@dataclass
class RetentionResult:
    dropped: list[str] = field(default_factory=list)
    anchors: int = 0
    ensured_until: date | None = None


def _next_month(d: date) -> date:
    return (d.replace(day=28) + timedelta(days=4)).replace(day=1)


def due_partitions(months: list[date], existing: set[str], policy: RetentionPolicy, now: datetime) -> list[str]:
    """Names of the leaf tables past retention (pure, so the policy is testable without a server)."""
    out = []
    for month in sorted(months):
        end = datetime.combine(_next_month(month), datetime.min.time(), UTC)
        base = f"audit_log_{month:%Y_%m}"
        if end <= now - timedelta(days=policy.audit_days):
            out += [n for n in (f"{base}_match", f"{base}_audit") if n in existing]
        elif end <= now - timedelta(days=policy.match_days) and f"{base}_match" in existing:
            out.append(f"{base}_match")
    return out


def sweep(admin_dsn: str, keys: KeyProvider, policy: RetentionPolicy, *, dry_run: bool = False,
          now: datetime | None = None) -> RetentionResult:
    """Ensure future partitions, then drop the leaves past retention with signed anchors; audited."""
    now = now or datetime.now(UTC)
    result = RetentionResult()
    with psycopg.connect(admin_dsn) as conn:
        this_month = now.date().replace(day=1)
        conn.execute("SELECT audit_ensure_partitions(%s, %s)", (this_month, policy.partitions_ahead + 1))
        conn.commit()
        result.ensured_until = this_month
        for _ in range(policy.partitions_ahead):
            result.ensured_until = _next_month(result.ensured_until)
        names = {r[0] for r in conn.execute(
            """SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
               WHERE i.inhparent IN (SELECT inhrelid FROM pg_inherits WHERE inhparent = 'audit_log'::regclass)"""
        ).fetchall()}
        months = [date(int(m[1]), int(m[2]), 1) for m in (_MONTH.match(n.rsplit("_", 1)[0]) for n in names) if m]
        result.dropped = due_partitions(sorted(set(months)), names, policy, now)
        if dry_run or not result.dropped:
            conn.rollback()
            return result
        heads: dict[str, tuple[int, bytes]] = {}
        for leaf in result.dropped:
            for chain, seq, head in conn.execute(
                sql.SQL("SELECT DISTINCT ON (chain) chain, seq, hash FROM {} ORDER BY chain, seq DESC").format(
                    sql.Identifier(leaf))
            ).fetchall():
                if chain not in heads or seq > heads[chain][0]:
                    heads[chain] = (seq, bytes(head))
        conn.commit()
        anchors = [sign_checkpoint(keys, chain, seq, head, "retention") for chain, (seq, head) in sorted(heads.items())]
        with conn.transaction():
            for cp in anchors:
                insert_checkpoint(conn, cp)
            for leaf in result.dropped:
                conn.execute(sql.SQL("DROP TABLE {}").format(sql.Identifier(leaf)))
            for month in sorted({n.rsplit("_", 1)[0] for n in result.dropped}):
                if not conn.execute(
                    "SELECT 1 FROM pg_inherits WHERE inhparent = to_regclass(%s)", (month,)
                ).fetchone():
                    conn.execute(sql.SQL("DROP TABLE {}").format(sql.Identifier(month)))
            record_event(conn, AuditEvent("audit.retention", "system:retention", details={
                "dropped": result.dropped, "anchors": len(anchors),
                "match_days": policy.match_days, "audit_days": policy.audit_days}))
        result.anchors = len(anchors)
    log.info("audit: retention sweep", dropped=result.dropped, anchors=result.anchors)
    return result
