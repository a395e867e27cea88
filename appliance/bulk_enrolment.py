"""``POST /v1/encodings:bulk``: many subjects' encodings from streaming NDJSON, resumable by Idempotency-Key.

The body is cut into chunks of lines; each chunk commits in ONE transaction together with its audit
records and the key's ``lines_done`` counter. After a crash (or a dropped connection) the client
sends the same body with the same key: the first ``lines_done`` lines are skipped and the rest
completes it, so no line is enrolled twice and no encoding ever lacks its audit record.

Line format: ``{"subject_id": uuid | "external_ref": str, "model": str, "vector": [floats]}``;
an ``external_ref`` not seen before creates the subject. Lines are validated strictly (no other keys,
numbers are numbers, no control characters in text) so a bad line is a 422 naming it, never a 500.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from appliance.enrolment import check_subjects, ensure_models, external_ref_aad, publish, write_encodings
from appliance.errors import BadRequest, Conflict, Unprocessable
from appliance.state import AppState
from appliance.types import FORBIDDEN_TEXT, SafeText
from crypto.seal import seal
from vector.errors import InvalidVector
from vector.templates import as_matrix


class _LineIn(BaseModel):
    """One NDJSON line as sent; validated strictly (``"0.1"`` and ``true`` are not numbers)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    subject_id: uuid.UUID | None = None
    external_ref: SafeText | None = Field(default=None, min_length=1, max_length=200)
    model: SafeText = Field(min_length=1, max_length=100)
    vector: list[float]


@dataclass
class _Line:
    subject_id: uuid.UUID | None
    external_ref: str | None
    model: str
    vector: list[float]  # checked numerically per chunk (one NumPy pass), see _vectors
    line_no: int


@dataclass
class BulkEnrolment:
    """One request's progress; ``add_line`` buffers, ``flush`` commits a chunk (call it off the event loop)."""

    state: AppState
    key: str
    actor: str
    request_id: str | None
    chunk_size: int = 1000
    lines_done: int = 0  # committed lines of this key (this and earlier requests)
    skip_until: int = 0  # lines committed before this request began: skipped, not parsed
    skipped: int = 0
    enrolled: int = 0
    done_before: bool = False
    _seen: int = 0
    _pending: list[_Line] = field(default_factory=list)

    def begin(self) -> None:
        if not 1 <= len(self.key) <= 200 or FORBIDDEN_TEXT.search(self.key):
            raise BadRequest("Idempotency-Key must be 1..200 characters, without control characters")
        with self.state.pool.connection() as conn, conn.transaction():
            conn.execute("INSERT INTO bulk_enrolments (idempotency_key, actor) VALUES (%s, %s) ON CONFLICT DO NOTHING",
                         (self.key, self.actor))
            row = conn.execute("SELECT actor, lines_done, state FROM bulk_enrolments WHERE idempotency_key = %s",
                               (self.key,)).fetchone()
        if row[0] != self.actor:
            raise Conflict("this Idempotency-Key belongs to another API key")
        self.lines_done, self.done_before = int(row[1]), row[2] == "done"
        self.skip_until = self.lines_done

    def add_line(self, raw: bytes) -> bool:
        """Buffer one NDJSON line; True when a chunk is ready to flush."""
        if not raw.strip():
            return False
        self._seen += 1
        if self._seen <= self.skip_until:
            self.skipped += 1
            return False
        self._pending.append(self._parse(raw, self._seen))
        return len(self._pending) >= self.chunk_size

    def _parse(self, raw: bytes, line_no: int) -> _Line:
        models = self.state.settings.models
        try:
            obj = _LineIn.model_validate_json(raw, strict=True)  # ~6 µs for 128 floats (from_json alone: ~4)
            if obj.model not in models:
                raise InvalidVector(f"unknown model {obj.model!r}")
            if (obj.subject_id is None) == (obj.external_ref is None):
                raise InvalidVector("give exactly one of subject_id and external_ref")
            if len(obj.vector) != models[obj.model].dim:
                raise InvalidVector(f"expected {models[obj.model].dim} dimensions")
            return _Line(obj.subject_id, obj.external_ref, obj.model, obj.vector, line_no)
        except ValidationError as exc:  # never str(exc): it echoes the input, which may be a vector
            why = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'line'}: {e['msg']}" for e in exc.errors()[:5])
            raise Unprocessable(f"line {line_no}: {why}", line=line_no, lines_committed=self.lines_done) from None
        except InvalidVector as exc:
            raise Unprocessable(f"line {line_no}: {exc}", line=line_no, lines_committed=self.lines_done) from None

    def take(self) -> list[_Line]:
        """Hand the buffered lines to ``flush`` so parsing of the next chunk can overlap the commit."""
        lines, self._pending = self._pending, []
        return lines

    def flush(self, lines: list[_Line] | None = None) -> None:
        """Commit one chunk: subjects, encodings, audit records and progress in one transaction.

        Chunks must be flushed one after another, in order (the caller awaits the previous flush).
        """
        lines = self.take() if lines is None else lines
        if not lines:
            return
        vectors = self._vectors(lines)
        ensure_models(self.state, {ln.model for ln in lines})
        with self.state.pool.connection() as conn, conn.transaction():
            row = conn.execute("SELECT lines_done FROM bulk_enrolments WHERE idempotency_key = %s FOR UPDATE",
                               (self.key,)).fetchone()
            if int(row[0]) != self.lines_done:
                raise Conflict("another request is completing this Idempotency-Key; retry later")
            refs = _resolve_refs(self.state, conn, {ln.external_ref for ln in lines if ln.external_ref is not None})
            sids = [ln.subject_id or refs[ln.external_ref] for ln in lines]  # type: ignore[index]
            check_subjects(conn, set(sids))
            enrolled, messages = write_encodings(self.state, conn, sids, [ln.model for ln in lines],
                                                 vectors, self.actor, self.request_id, check=False)
            conn.execute(
                """UPDATE bulk_enrolments SET lines_done = lines_done + %s, encodings_done = encodings_done + %s,
                   updated_at = now() WHERE idempotency_key = %s""",
                (len(lines), len(enrolled), self.key),
            )
        self.lines_done += len(lines)
        self.enrolled += len(enrolled)
        publish(self.state, messages, wait=0.0)  # followers apply in the background

    def _vectors(self, lines: list[_Line]) -> list[np.ndarray]:
        """Validate a chunk's vectors in one pass per model; on failure, find and name the bad line."""
        out: list[np.ndarray] = [np.empty(0)] * len(lines)
        for model in {ln.model for ln in lines}:
            rows = [i for i, ln in enumerate(lines) if ln.model == model]
            dim = self.state.settings.models[model].dim
            try:
                matrix = as_matrix([lines[i].vector for i in rows], dim)
            except InvalidVector:
                for i in rows:
                    try:
                        as_matrix(lines[i].vector, dim)
                    except InvalidVector as exc:
                        raise Unprocessable(f"line {lines[i].line_no}: {exc}", line=lines[i].line_no,
                                            lines_committed=self.lines_done) from None
                raise
            for j, i in enumerate(rows):
                out[i] = matrix[j]
        return out

    def finish(self) -> dict[str, Any]:
        self.flush()
        with self.state.pool.connection() as conn:
            row = conn.execute(
                """UPDATE bulk_enrolments SET state = 'done', updated_at = now() WHERE idempotency_key = %s
                   RETURNING lines_done, encodings_done""", (self.key,)).fetchone()
        return {"idempotency_key": self.key, "state": "done", "lines_seen": self._seen,
                "lines_skipped": self.skipped, "encodings_enrolled": self.enrolled,
                "lines_done": int(row[0]), "encodings_total": int(row[1])}


def _resolve_refs(state: AppState, conn: Any, refs: set[str]) -> dict[str, uuid.UUID]:
    """Subjects by external_ref (through the blind index), creating the missing ones in the chunk's transaction.

    A new subject's reference is stored sealed with its own DEK, made here (one owner key each).
    """
    if not refs:
        return {}
    # Rows from before migration 0008 that the upgrade has not reached yet keep a plaintext column.
    found: dict[str, uuid.UUID] = {r[0]: r[1] for r in conn.execute(
        "SELECT external_ref, id FROM subjects WHERE external_ref = ANY(%s)", (sorted(refs),)).fetchall()}
    ordered = sorted(refs - found.keys())
    if not ordered:
        return found
    hashes = state.blind_index.digests(conn, ordered)
    created = conn.execute(
        """INSERT INTO subjects (id, external_ref_hash) SELECT * FROM unnest(%s::uuid[], %s::bytea[])
           ON CONFLICT (external_ref_hash) DO NOTHING RETURNING id, external_ref_hash""",
        ([uuid.uuid4() for _ in ordered], hashes),
    ).fetchall()
    by_hash = dict(zip(hashes, ordered, strict=True))
    if created:
        keys = state.subject_keys.get_or_create_many(conn, [r[0] for r in created])
        conn.cursor().executemany(
            "UPDATE subjects SET external_ref_sealed = %s WHERE id = %s",
            [(seal(keys[sid].dek, by_hash[bytes(h)].encode(), external_ref_aad(sid)), sid) for sid, h in created])
    rows = conn.execute("SELECT external_ref_hash, id FROM subjects WHERE external_ref_hash = ANY(%s)",
                        (hashes,)).fetchall()
    return found | {by_hash[bytes(r[0])]: r[1] for r in rows}
