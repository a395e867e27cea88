"""The audit trail (DESIGN.md, "Audit"): every access to biometric data, key operation and admin
action becomes an ``AuditEvent``; ``appliance.audit.log`` chains, batches and stores them."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any


@dataclass(slots=True)
class AuditEvent:
    """One auditable fact. ``details`` is small and never carries vectors, keys or tokens.

    Treated as immutable once made, but not ``frozen``: a frozen dataclass's ``__init__`` costs 3x
    more, and one is built per match on the hot path."""

    action: str  # e.g. "match", "enrol", "subject.read", "media.read", "erasure", "key.rotate"
    actor: str  # "apikey:<uuid>" or "cli:<os user>"
    outcome: str = "ok"  # ok | denied | error | match | unknown
    subject_id: uuid.UUID | None = None
    object_id: str | None = None
    request_id: str | None = None
    details: dict[str, Any] = field(default_factory=dict)
    ts: datetime = field(default_factory=lambda: datetime.now(UTC))
