"""Index operations other features call: erasure hooks (GDPR) and template-key rotation (CLI).

- ``tombstone_subject`` — step "tombstone in index and Redis" of an erasure: once it returns, no worker
  returns the subject's labels (in-process set here, the host's tombstone file for the other local
  workers, Redis set and feed for other hosts and for re-syncs).
- ``purge_labels`` — after the encodings rows are deleted and committed: sequence a delete per model
  so every hot index drops them for good (and compacts in the background).
- ``rotate_template_key`` — re-protect every template of a model from its sealed raw vector under a
  new seed version, in resumable batches; one transaction swaps all rows, then every worker loads the
  new version and swaps its index atomically. Matching keeps working on the old pair meanwhile.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from appliance.audit import AuditEvent
from appliance.enrolment import encoding_aad, ensure_models
from appliance.errors import Conflict
from appliance.logs import get_logger
from appliance.matching import tombstone_file
from appliance.state import AppState
from crypto.seal import open_sealed
from vector import store
from vector.feed import Feed, FeedMessage
from vector.tombstones import LocalTombstones

log = get_logger(__name__)


def tombstone_subject(state: AppState, subject_id: uuid.UUID) -> list[int]:
    """Tombstone every label of the subject in this process AND in Redis before returning; returns the labels.

    Raises redis.ConnectionError/TimeoutError when Redis is down (the erasure job retries the step):
    other workers could otherwise still return the subject. Idempotent.
    """
    with state.pool.connection() as conn:
        rows = conn.execute("SELECT label FROM encodings WHERE subject_id = %s", (subject_id,)).fetchall()
    labels = [int(r[0]) for r in rows]
    if state.matcher is not None:
        state.matcher.publish_tombstones(labels)  # this process, then every worker on the host
    else:  # a CLI erasure: tell the host's workers through the file they poll
        local = LocalTombstones(tombstone_file(state.settings))
        try:
            local.append(labels)
        finally:
            local.close()
    Feed(state.redis).tombstone(labels)  # workers on other hosts, and the source for re-syncs
    return labels


def purge_labels(state: AppState, labels: list[int]) -> None:
    """Call after the rows of ``labels`` are deleted and committed: every worker drops them from its index.

    Tombstones already hide them; this makes the deletion part of each model's feed sequence, so a
    worker warming later never re-adds them. A failed publish is repaired by the followers' re-sync.
    """
    if not labels:
        return
    with state.pool.connection() as conn, conn.transaction():
        models = [r[0] for r in conn.execute("SELECT model FROM index_state ORDER BY model").fetchall()]
        seqs = {m: store.next_feed_seq(conn, m)[0] for m in models}
    feed = Feed(state.redis)
    arr = np.asarray(labels, np.int64)
    for model, seq in seqs.items():
        try:
            feed.publish_delete(model, seq, arr)
        except Exception as exc:
            log.warning("feed_publish_failed", model=model, seq=seq, error=type(exc).__name__)
    if state.matcher is not None:
        for model, seq in seqs.items():
            state.matcher.offer(FeedMessage(b"", "delete", model, seq, 0, arr), wait=0.0)


@dataclass
class RotationResult:
    model: str
    from_version: int
    to_version: int
    reprotected: int
    total: int


def rotate_template_key(
    state: AppState, model: str, batch_size: int = 1000, progress: Callable[[int, int], None] | None = None,
    actor: str = "cli", stop_after_batches: int | None = None,
) -> RotationResult | None:
    """Rotate ``model``'s template key; resumable (run again after a crash). Returns None if stopped early.

    ``progress(done, total)`` is called after each committed batch; ``stop_after_batches`` exists for
    tests of resumption.
    """
    ensure_models(state, {model})
    keys = state.template_keys
    dim = state.settings.models[model].dim
    with state.pool.connection() as conn:
        with conn.transaction():
            old, target = conn.execute(
                "SELECT template_version, rotating_to FROM index_state WHERE model = %s FOR UPDATE", (model,)
            ).fetchone()
            if target is None:
                target = conn.execute("SELECT max(version) + 1 FROM template_keys WHERE model = %s",
                                      (model,)).fetchone()[0]
                keys.create_version(conn, model, dim, target)
                conn.execute("UPDATE index_state SET rotating_to = %s WHERE model = %s", (target, model))
        new_key = keys.get(conn, model, target)
        total = conn.execute("SELECT count(*) FROM encodings WHERE model = %s", (model,)).fetchone()[0]
        done = conn.execute("SELECT count(*) FROM encodings WHERE model = %s AND template_next IS NOT NULL",
                            (model,)).fetchone()[0]
        conn.commit()
        batches = 0
        while True:
            with conn.transaction():
                rows = conn.execute(
                    """SELECT e.id, e.subject_id, e.raw_sealed FROM encodings e JOIN subjects s ON s.id = e.subject_id
                       WHERE e.model = %s AND e.template_next IS NULL AND s.state = 'active'
                       ORDER BY e.label LIMIT %s FOR UPDATE OF e SKIP LOCKED""", (model, batch_size)).fetchall()
                if not rows:
                    break
                deks = {s: k.dek for s, k in state.subject_keys.get_or_create_many(conn, [r[1] for r in rows]).items()}
                raw = np.stack([np.frombuffer(open_sealed(deks[r[1]], bytes(r[2]), encoding_aad(r[1], r[0], model)),
                                              "<f4") for r in rows])
                templates = new_key.protect(raw)
                with conn.cursor() as cur:
                    cur.executemany("UPDATE encodings SET template_next = %s WHERE id = %s",
                                    [(templates[i], rows[i][0]) for i in range(len(rows))])
            done += len(rows)
            batches += 1
            if progress:
                progress(done, total)
            if stop_after_batches is not None and batches >= stop_after_batches:
                return None
        with conn.transaction():
            store.next_feed_seq(conn, model)  # the model's lock: enrolments wait, none can slip in unrotated
            left = conn.execute("SELECT count(*) FROM encodings WHERE model = %s AND template_next IS NULL",
                                (model,)).fetchone()[0]
            if left:
                raise Conflict(f"{left} encodings of {model!r} belong to subjects being erased; retry after erasure")
            conn.execute("""UPDATE encodings SET template = template_next, template_version = %s, template_next = NULL
                            WHERE model = %s""", (target, model))
            conn.execute("UPDATE template_keys SET state = 'retired' WHERE model = %s AND state = 'active'", (model,))
            conn.execute("UPDATE template_keys SET state = 'active' WHERE model = %s AND version = %s", (model, target))
            seq = conn.execute(
                """UPDATE index_state SET template_version = %s, rotating_to = NULL, updated_at = now()
                   WHERE model = %s RETURNING feed_seq""", (target, model)).fetchone()[0]
            state.audit.record(conn, AuditEvent("key.rotate", actor, details={
                "kind": "template", "model": model, "from_version": old, "to_version": target, "count": total}))
    try:
        Feed(state.redis).publish_rekey(model, seq, target)
    except Exception as exc:
        log.warning("feed_publish_failed", model=model, seq=seq, error=type(exc).__name__)
    if state.matcher is not None:
        state.matcher.reload(model)
    destroy_retired_seeds(state, model, actor)
    return RotationResult(model, old, target, done, total)


def destroy_retired_seeds(state: AppState, model: str, actor: str) -> list[int]:
    """Destroy the seeds of retired template versions (no template uses them since the swap), audited.

    From then on every stale copy of a template protected under those versions (dead tuples, WAL,
    backups, old snapshots), erased subjects' included, is a rotation under a key that no longer exists.
    Seeds wrapped by the shared KEK (before migration 0008) cannot be destroyed this way and are left.
    """
    keys = state.template_keys
    destroyed = []
    with state.pool.connection() as conn, conn.transaction():
        versions = [r[0] for r in conn.execute(
            """SELECT version FROM template_keys WHERE model = %s AND state = 'retired' AND scheme = 'owner'
               AND destroyed_at IS NULL ORDER BY version""", (model,)).fetchall()]
        for version in versions:
            done = keys.destroy_version(conn, model, version)
            destroyed.append(version)
            state.audit.record(conn, AuditEvent("key.destroy", actor, details={
                "kind": "template", "model": model, "version": version, "location": done.location,
                "existed": done.existed}))
    return destroyed


def models_to_rekey(state: AppState) -> list[str]:
    """Models whose active template key predates a finished erasure (stale copies of that subject's
    templates exist under it, so a re-key makes them noise), or is still wrapped by the shared KEK."""
    with state.pool.connection() as conn:
        rows = conn.execute(
            """SELECT k.model FROM template_keys k WHERE k.state = 'active' AND (k.scheme = 'kek' OR EXISTS (
                   SELECT 1 FROM erasure_jobs j WHERE j.state = 'done' AND j.finished_at > k.created_at))
               ORDER BY 1""").fetchall()
    return [r[0] for r in rows if r[0] in state.settings.models]
