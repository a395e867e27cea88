"""Appending a record inside the caller's transaction, on one of the shared *transaction chains*.

Transaction chains ``tx:<class>:<n>`` (n < ``TX_CHAINS``, created by migration 0004) are shared by
every process. ``record_event`` locks one head row ``FOR UPDATE`` (``SKIP LOCKED`` picks a free chain,
so up to ``TX_CHAINS`` transactions append concurrently), inserts the record and moves the head inside
the caller's transaction. Invariant: a record with ``seq = k`` is inserted only by the transaction
holding the head row at ``seq = k - 1``; a rollback releases the lock and undoes both, so chains never
fork or gap (under REPEATABLE READ a concurrent head move is a serialization failure, not a fork).
"""

from __future__ import annotations

import random
from typing import Any

from prometheus_client import Counter
from psycopg import Connection, pq

from appliance.audit import AuditEvent
from appliance.audit.chain import COPY_COLUMNS, ChainHead, action_class, append
from appliance.audit.queue import redacted

TX_CHAINS = 8
EVENTS = Counter("appliance_audit_events_total", "Audit records written", ["path"])


def record_event(conn: Connection[Any], event: AuditEvent) -> dict[str, Any]:
    """Append ``event`` to a transaction chain inside ``conn``'s current transaction; returns the record."""
    if conn.autocommit and conn.info.transaction_status == pq.TransactionStatus.IDLE:
        with conn.transaction():
            return record_event(conn, event)
    cls = action_class(event.action)
    names = [f"tx:{cls}:{i}" for i in range(TX_CHAINS)]
    random.shuffle(names)
    row = conn.execute(
        "SELECT chain, seq, hash, ts FROM audit_heads WHERE chain = ANY(%s) LIMIT 1 FOR UPDATE SKIP LOCKED",
        (names,),
    ).fetchone()
    if row is None:  # every chain is held by another transaction: wait for one
        row = conn.execute(
            "SELECT chain, seq, hash, ts FROM audit_heads WHERE chain = %s FOR UPDATE", (names[0],)
        ).fetchone()
        if row is None:
            raise RuntimeError(f"audit chain {names[0]} has no head row; is migration 0004 applied?")
    chain, seq, head, head_ts = row
    rec = append(ChainHead(chain, cls, seq, bytes(head), head_ts), event, redacted)
    conn.execute(
        f"""WITH moved AS (UPDATE audit_heads SET seq = %s, hash = %s, ts = %s, updated_at = now() WHERE chain = %s)
            INSERT INTO audit_log ({COPY_COLUMNS}) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)""",  # noqa: S608
        (rec.seq, rec.hash, rec.ts, chain, *rec.row()),
    )
    EVENTS.labels("tx").inc()
    return rec.exported()
