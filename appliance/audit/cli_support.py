"""Auditing admin actions run from the command line (no API process, no AuditLog threads)."""

from __future__ import annotations

import getpass
import uuid
from typing import Any

import psycopg

from appliance.audit import AuditEvent
from appliance.audit.transaction import record_event
from appliance.settings import Settings


def cli_actor() -> str:
    return f"cli:{getpass.getuser()}"


def record_cli_event(
    settings: Settings,
    action: str,
    actor: str | None = None,
    *,
    outcome: str = "ok",
    subject_id: uuid.UUID | None = None,
    object_id: str | None = None,
    details: dict[str, Any] | None = None,
) -> None:
    """Append one record on a transaction chain with the service role, committed before returning."""
    event = AuditEvent(action, actor or cli_actor(), outcome=outcome, subject_id=subject_id,
                       object_id=object_id, details=details or {})
    with psycopg.connect(settings.database_url.get_secret_value(),
                         connect_timeout=int(settings.db_connect_timeout) or 1) as conn:
        record_event(conn, event)
        conn.commit()
