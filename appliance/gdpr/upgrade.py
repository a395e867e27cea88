"""Moves data written before migration 0008 to the erasable layout: owner-wrapped DEKs, sealed references.

Runs in the background at API start (and as ``appliance keys upgrade-legacy``); idempotent, resumable,
one committed batch at a time. What it cannot undo: the old KEK-wrapped DEKs and plaintext references
remain in old WAL segments and backups until those age out and the old KEK versions are destroyed,
which docs/security says, and which the receipt of an erasure of such a subject states.
"""

from __future__ import annotations

import threading

from appliance.enrolment import external_ref_aad
from appliance.logs import get_logger
from appliance.state import AppState
from appliance.subject_keys import upgrade_legacy_keys
from crypto.seal import seal

log = get_logger(__name__)


def upgrade_external_refs(state: AppState, batch: int = 500) -> int:
    """Seal each plaintext ``external_ref`` with its subject's DEK and index it by its keyed hash."""
    moved = 0
    with state.pool.connection() as conn:
        while True:
            with conn.transaction():
                rows = conn.execute(
                    """SELECT id, external_ref FROM subjects WHERE external_ref IS NOT NULL AND state = 'active'
                       ORDER BY id LIMIT %s FOR UPDATE SKIP LOCKED""", (batch,)).fetchall()
                if not rows:
                    return moved
                keys = state.subject_keys.get_or_create_many(conn, [r[0] for r in rows])
                hashes = state.blind_index.digests(conn, [r[1] for r in rows])
                conn.cursor().executemany(
                    """UPDATE subjects SET external_ref_hash = %s, external_ref_sealed = %s, external_ref = NULL
                       WHERE id = %s""",
                    [(h, seal(keys[sid].dek, ref.encode(), external_ref_aad(sid)), sid)
                     for (sid, ref), h in zip(rows, hashes, strict=True)])
                moved += len(rows)


def upgrade_legacy(state: AppState) -> dict[str, int]:
    with state.pool.connection() as conn:
        keys = upgrade_legacy_keys(conn, state.keys)
    refs = upgrade_external_refs(state)
    if keys or refs:
        log.info("legacy data moved to owner keys and sealed references", subject_keys=keys, external_refs=refs)
    return {"subject_keys": keys, "external_refs": refs}


def upgrade_in_background(state: AppState) -> threading.Thread:
    def run() -> None:
        try:
            upgrade_legacy(state)
        except Exception as exc:  # Vault or PostgreSQL down: the next start (or the CLI) finishes it
            log.warning("legacy upgrade failed; it resumes at the next start", error=type(exc).__name__)

    thread = threading.Thread(target=run, name="legacy-upgrade", daemon=True)
    thread.start()
    return thread
