"""Enrolment: validated embeddings become sealed raw vectors plus protected templates, audited, then fed.

One transaction per call holds the encodings (binary COPY), their audit records and the feed sequence
bump, so a crash leaves either all of them or none. Publishing to the Redis feed happens after
commit; a lost publish is repaired by the followers' gap detection and periodic check.

Sealing contract (the export reads it back): the raw vector is the caller's float32 vector as
little-endian bytes, sealed with the subject DEK under
``aad("encoding", str(subject_id), str(encoding_id), model)``.
"""

from __future__ import annotations

import uuid
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import psycopg

from appliance.audit import AuditEvent
from appliance.errors import Conflict, Gone, NotFound
from appliance.logs import get_logger
from appliance.state import AppState
from crypto.seal import aad, seal
from vector import store
from vector.feed import Feed, FeedMessage
from vector.store import TemplateBatch, uuids_to_bytes

log = get_logger(__name__)
AUDIT_IDS_PER_RECORD = 50  # audit details stay under the 4 KiB cap


def encoding_aad(subject_id: uuid.UUID, encoding_id: uuid.UUID, model: str) -> bytes:
    return aad("encoding", str(subject_id), str(encoding_id), model)


def label_aad(subject_id: uuid.UUID) -> bytes:
    return aad("subject-label", str(subject_id))


def external_ref_aad(subject_id: uuid.UUID) -> bytes:
    return aad("subject-external-ref", str(subject_id))


@dataclass(frozen=True)
class Enrolled:
    encoding_id: uuid.UUID
    subject_id: uuid.UUID
    label: int
    model: str
    template_version: int


def ensure_models(state: AppState, models: set[str]) -> None:
    """Create each model's template key and feed row on first use (outside the write transaction)."""
    known = state.known_models
    todo = models - known
    if not todo:
        return
    keys = state.template_keys
    with state.pool.connection() as conn:
        for model in sorted(todo):
            keys.ensure_model(conn, model, state.settings.models[model].dim)
    known |= todo


def check_subjects(conn: psycopg.Connection, subject_ids: set[uuid.UUID]) -> None:
    """Lock the subjects FOR SHARE (erasure's state change waits for us) and require them active."""
    rows = conn.execute("SELECT id, state FROM subjects WHERE id = ANY(%s) FOR SHARE", (list(subject_ids),)).fetchall()
    states = {r[0]: r[1] for r in rows}
    for sid in subject_ids:
        if sid not in states:
            raise NotFound(f"no subject {sid}")
        if states[sid] == "erased":
            raise Gone(f"subject {sid} has been erased")
        if states[sid] != "active":
            raise Conflict(f"subject {sid} is being erased")


def write_encodings(
    state: AppState, conn: psycopg.Connection, subject_ids: list[uuid.UUID], models: list[str], raw: list[np.ndarray],
    actor: str, request_id: str | None, check: bool = True,
) -> tuple[list[Enrolled], list[FeedMessage]]:
    """Inside the caller's transaction: seal, protect, COPY, audit, bump the feed; publish after commit."""
    if check:
        check_subjects(conn, set(subject_ids))
    deks = {sid: k.dek for sid, k in state.subject_keys.get_or_create_many(conn, subject_ids).items()}
    n = len(subject_ids)
    ids = [uuid.uuid4() for _ in range(n)]
    sealed = [seal(deks[subject_ids[i]], np.asarray(raw[i], "<f4").tobytes(), encoding_aad(subject_ids[i], ids[i],
                                                                                             models[i]))
              for i in range(n)]
    labels = store.allocate_labels(conn, n)
    by_model: dict[str, list[int]] = defaultdict(list)
    for i, m in enumerate(models):
        by_model[m].append(i)
    keys = state.template_keys
    enrolled: list[Enrolled] = []
    messages: list[FeedMessage] = []
    for model in sorted(by_model):  # one lock order for every writer: no deadlocks across models
        rows = by_model[model]
        seq, version, rotating = store.next_feed_seq(conn, model)
        vectors = np.stack([raw[i] for i in rows]).astype(np.float32)
        templates = keys.get(conn, model, version).protect(vectors)
        nxt = keys.get(conn, model, rotating).protect(vectors) if rotating else None
        m_ids = [ids[i] for i in rows]
        m_subjects = [subject_ids[i] for i in rows]
        store.copy_encodings(conn, m_ids, labels[rows], m_subjects, model, version, [sealed[i] for i in rows],
                             templates, nxt)
        batch = TemplateBatch(labels[rows], uuids_to_bytes(m_subjects), uuids_to_bytes(m_ids), templates)
        messages.append(FeedMessage(b"", "add", model, seq, version, batch.labels, batch))
        enrolled += [Enrolled(m_ids[j], m_subjects[j], int(labels[rows][j]), model, version) for j in range(len(rows))]
    audit = state.audit
    per_subject: dict[tuple[uuid.UUID, str], list[str]] = defaultdict(list)
    for e in enrolled:
        per_subject[(e.subject_id, e.model)].append(str(e.encoding_id))
    for (sid, model), enc_ids in per_subject.items():
        for start in range(0, len(enc_ids), AUDIT_IDS_PER_RECORD):
            part = enc_ids[start : start + AUDIT_IDS_PER_RECORD]
            audit.record(conn, AuditEvent(
                "enrol", actor, subject_id=sid, object_id=part[0] if len(part) == 1 else None, request_id=request_id,
                details={"model": model, "count": len(part), "encodings": part},
            ))
    return enrolled, messages


def publish(state: AppState, messages: list[FeedMessage], wait: float = 1.0) -> None:
    """After commit: tell every worker. A failure is logged, never raised: PostgreSQL already has the rows.

    ``wait`` > 0: apply to this worker's index before returning (read-your-writes for single enrolment).
    """
    feed = Feed(state.redis)
    for msg in messages:
        assert msg.batch is not None
        try:
            feed.publish_add(msg.model, msg.seq, msg.version, msg.batch)
        except Exception as exc:
            log.warning("feed_publish_failed", model=msg.model, seq=msg.seq, error=type(exc).__name__)
    if state.matcher is not None:
        for msg in messages:
            state.matcher.offer(msg, wait)


def enrol(state: AppState, subject_id: uuid.UUID, model: str, vectors: np.ndarray, actor: str,
          request_id: str | None) -> list[Enrolled]:
    """Enrol one subject's vectors (validated (n, dim) float32) in one transaction."""
    ensure_models(state, {model})
    with state.pool.connection() as conn, conn.transaction():
        enrolled, messages = write_encodings(state, conn, [subject_id] * len(vectors), [model] * len(vectors),
                                             list(vectors), actor, request_id)
    publish(state, messages)
    return enrolled
