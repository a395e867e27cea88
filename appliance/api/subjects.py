"""Subjects: create, read, list, relabel. The display label is PII, sealed with the subject's DEK.

Responses never carry vectors; every read or write of a subject is audited in its transaction.
Erasure (``DELETE``) and export live with the GDPR feature.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any

import psycopg
from fastapi import APIRouter, Query, Request, status
from pydantic import BaseModel, ConfigDict, Field

from appliance.api.deps import EnrollKey, StateDep
from appliance.api.openapi import problems
from appliance.audit import AuditEvent
from appliance.enrolment import external_ref_aad, label_aad
from appliance.errors import Conflict, Gone, NotFound, Unprocessable
from appliance.state import AppState
from appliance.types import IsoDatetime, SafeText
from crypto.seal import open_sealed, seal

router = APIRouter(prefix="/v1", tags=["subjects"])


class SubjectCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    external_ref: SafeText | None = Field(default=None, min_length=1, max_length=200,
                                     description="Your own id for this person (unique).")
    label: SafeText | None = Field(default=None, max_length=200, description="Display name; stored sealed.")


class SubjectPatch(BaseModel):
    """Only the fields sent change; at least one is needed."""

    model_config = ConfigDict(extra="forbid")

    label: SafeText | None = Field(default=None, max_length=200, description="New display label; null clears it.")
    retain_until: IsoDatetime | None = Field(
        default=None, description="Erase this subject's faces after this time (e.g. when consent ends), instead "
        "of subject_retention_days after its last enrolment or recognition; null restores that rule.")


class Subject(BaseModel):
    id: uuid.UUID
    external_ref: str | None
    label: str | None = Field(description="Null when unset, or when the subject is erased.")
    state: str
    encoding_count: int
    created_at: datetime
    updated_at: datetime
    retain_until: datetime | None = Field(default=None, description="Per-subject retention override, if set.")
    last_seen_at: datetime | None = Field(default=None, description="Last accepted match (updated in batches).")


class SubjectPage(BaseModel):
    items: list[Subject]
    next_after: uuid.UUID | None = Field(description="Pass as `after` for the next page; null at the end.")


def _audit(state: AppState, conn: psycopg.Connection, action: str, request: Request, subject_id: uuid.UUID | None,
           **details: Any) -> None:
    state.audit.record(conn, AuditEvent(
        action, request.state.api_key.actor, subject_id=subject_id,
        request_id=getattr(request.state, "request_id", None), details=details,
    ))


_SELECT = """SELECT s.id, s.external_ref, s.label_sealed, s.state, s.created_at, s.updated_at,
                    (SELECT count(*) FROM encodings e WHERE e.subject_id = s.id), s.external_ref_sealed,
                    s.retain_until, s.last_seen_at
             FROM subjects s"""


def _subject(state: AppState, conn: psycopg.Connection, row: tuple[Any, ...], with_label: bool) -> Subject:
    """Open the sealed label (when asked) and external reference; an erased subject has neither."""
    label = None
    ref = row[1]  # plaintext only on rows the 0008 upgrade has not reached yet
    if row[3] != "erased" and (row[7] is not None or (with_label and row[2] is not None)):
        key = state.subject_keys.get(conn, row[0])
        if with_label and row[2] is not None:
            label = open_sealed(key.dek, bytes(row[2]), label_aad(row[0])).decode()
        if row[7] is not None:
            ref = open_sealed(key.dek, bytes(row[7]), external_ref_aad(row[0])).decode()
    return Subject(id=row[0], external_ref=ref, label=label, state=row[3], encoding_count=row[6],
                   created_at=row[4], updated_at=row[5], retain_until=row[8], last_seen_at=row[9])


@router.post("/subjects", response_model=Subject, status_code=status.HTTP_201_CREATED, summary="Create a subject",
             responses=problems(409))
def create_subject(body: SubjectCreate, request: Request, _: EnrollKey, state: StateDep) -> Subject:
    sid = uuid.uuid4()
    with state.pool.connection() as conn, conn.transaction():
        ref_hash = None if body.external_ref is None else state.blind_index.digest(conn, body.external_ref)
        if ref_hash is not None and conn.execute(
                "SELECT 1 FROM subjects WHERE external_ref = %s", (body.external_ref,)).fetchone() is not None:
            raise Conflict("a subject with this external_ref already exists")  # a row not upgraded yet
        row = conn.execute(
            "INSERT INTO subjects (id, external_ref_hash) VALUES (%s, %s) ON CONFLICT DO NOTHING RETURNING id",
            (sid, ref_hash),
        ).fetchone()
        if row is None:
            raise Conflict("a subject with this external_ref already exists")
        if body.label is not None or body.external_ref is not None:
            key = state.subject_keys.get_or_create(conn, sid)
            conn.execute(
                "UPDATE subjects SET label_sealed = %s, external_ref_sealed = %s WHERE id = %s",
                (None if body.label is None else seal(key.dek, body.label.encode(), label_aad(sid)),
                 None if body.external_ref is None else seal(key.dek, body.external_ref.encode(),
                                                             external_ref_aad(sid)), sid))
        _audit(state, conn, "subject.create", request, sid, external_ref=body.external_ref is not None)
        found = conn.execute(_SELECT + " WHERE s.id = %s", (sid,)).fetchone()
        return _subject(state, conn, found, with_label=True)


@router.get("/subjects/{subject_id}", response_model=Subject, summary="A subject's metadata (never vectors)")
def get_subject(subject_id: uuid.UUID, request: Request, _: EnrollKey, state: StateDep) -> Subject:
    with state.pool.connection() as conn, conn.transaction():
        row = conn.execute(_SELECT + " WHERE s.id = %s", (subject_id,)).fetchone()
        if row is None:
            raise NotFound(f"no subject {subject_id}")
        _audit(state, conn, "subject.read", request, subject_id)
        return _subject(state, conn, row, with_label=True)


@router.get("/subjects", response_model=SubjectPage, summary="List subjects (paged by id; labels omitted)")
def list_subjects(
    request: Request, _: EnrollKey, state: StateDep,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
    after: Annotated[uuid.UUID | None, Query(description="Last id of the previous page.")] = None,
    external_ref: Annotated[SafeText | None, Query(max_length=200)] = None,
) -> SubjectPage:
    clauses, params = [], []
    if after is not None:
        clauses.append("s.id > %s")
        params.append(after)
    where_ref = external_ref is not None
    with state.pool.connection() as conn, conn.transaction():
        if where_ref:
            clauses.append("(s.external_ref_hash = %s OR s.external_ref = %s)")
            params += [state.blind_index.digest(conn, external_ref), external_ref]
        where = (" WHERE " + " AND ".join(clauses)) if clauses else ""
        rows = conn.execute(_SELECT + where + " ORDER BY s.id LIMIT %s", (*params, limit + 1)).fetchall()
        _audit(state, conn, "subject.list", request, None, count=min(len(rows), limit))
        items = [_subject(state, conn, r, with_label=False) for r in rows[:limit]]
    return SubjectPage(items=items, next_after=items[-1].id if len(rows) > limit else None)


@router.patch("/subjects/{subject_id}", response_model=Subject,
              summary="Change the display label and/or the retention override (retain_until)",
              responses=problems(409, 410))
def patch_subject(subject_id: uuid.UUID, body: SubjectPatch, request: Request, _: EnrollKey,
                  state: StateDep) -> Subject:
    with state.pool.connection() as conn, conn.transaction():
        row = conn.execute("SELECT state FROM subjects WHERE id = %s FOR UPDATE", (subject_id,)).fetchone()
        if row is None:
            raise NotFound(f"no subject {subject_id}")
        if row[0] == "erased":
            raise Gone(f"subject {subject_id} has been erased")
        if row[0] != "active":
            raise Conflict(f"subject {subject_id} is being erased")
        sent = body.model_fields_set
        if not sent:
            raise Unprocessable("send at least one of label, retain_until")
        if "retain_until" in sent and body.retain_until is not None and body.retain_until.tzinfo is None:
            raise Unprocessable("retain_until needs a time zone (e.g. 2028-01-31T00:00:00Z)")
        if "label" in sent:
            sealed = None
            if body.label is not None:
                key = state.subject_keys.get_or_create(conn, subject_id)
                sealed = seal(key.dek, body.label.encode(), label_aad(subject_id))
            conn.execute("UPDATE subjects SET label_sealed = %s, updated_at = now() WHERE id = %s",
                         (sealed, subject_id))
        if "retain_until" in sent:
            conn.execute("UPDATE subjects SET retain_until = %s, updated_at = now() WHERE id = %s",
                         (body.retain_until, subject_id))
        details: dict[str, Any] = {"label_set": body.label is not None} if "label" in sent else {}
        if "retain_until" in sent:
            details["retain_until"] = body.retain_until.isoformat() if body.retain_until else None
        _audit(state, conn, "subject.update", request, subject_id, **details)
        found = conn.execute(_SELECT + " WHERE s.id = %s", (subject_id,)).fetchone()
        return _subject(state, conn, found, with_label=True)
