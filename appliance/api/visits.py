"""Visits over HTTP: the timeline (paged by time) and counts for a dashboard. Scope ``audit``.

Why ``audit`` and not a scope of its own: a visit says that an enrolled person was at a door at a
time, derived from their face; it is read by the same people who may read the accountability
record of matches (which holds the same facts per frame), and every read is itself audited.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Literal

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, Field

from appliance.api.deps import AuditKey, StateDep
from appliance.audit import AuditEvent
from appliance.errors import Unprocessable
from appliance.types import IsoDatetime, SafeText
from appliance.visits import queries
from appliance.visits.queries import VisitFilter, VisitQueryError

router = APIRouter(prefix="/v1/visits", tags=["audit"])
MAX_LIMIT = 1000

FromQ = Annotated[IsoDatetime | None, Query(alias="from", description="Inclusive start on first_seen (ISO 8601 "
                                                                       "with zone). Default: `to` minus one day.")]
ToQ = Annotated[IsoDatetime | None, Query(description="Exclusive end (ISO 8601 with zone). Default: now.")]


class Visit(BaseModel):
    id: uuid.UUID
    camera_id: str | None
    track_id: str | None
    first_seen: datetime
    last_seen: datetime
    decision: Literal["match", "unknown"]
    subject_id: uuid.UUID | None = Field(description="Null for an unknown visitor (never identified, nothing kept).")
    similarity: float | None = Field(description="Best similarity of any frame to the closest enrolled face.")
    frames: int


class VisitPage(BaseModel):
    items: list[Visit]
    next_cursor: str | None = Field(description="Pass as `cursor` for the next (older) page; null at the end.")


class SummaryBucket(BaseModel):
    start: datetime = Field(description="Start of the hour or UTC day.")
    key: str | None = Field(description="The camera id, decision or subject id; null: no camera / unknown visitor.")
    visits: int


class VisitSummary(BaseModel):
    interval: Literal["hour", "day"]
    group_by: Literal["camera", "decision", "subject"]
    from_: datetime = Field(alias="from")
    to: datetime
    buckets: list[SummaryBucket]


def _filter(start: datetime | None, end: datetime | None, **kw: object) -> VisitFilter:
    try:
        return VisitFilter.build(start, end, **kw)  # type: ignore[arg-type]
    except VisitQueryError as exc:
        raise Unprocessable(str(exc)) from None


@router.get("", response_model=VisitPage, summary="Visits, newest first, paged by time (audited)")
def list_visits(
    request: Request, key: AuditKey, state: StateDep, from_: FromQ = None, to: ToQ = None,
    camera_id: Annotated[SafeText | None, Query(max_length=200)] = None,
    subject_id: uuid.UUID | None = None,
    decision: Literal["match", "unknown"] | None = None,
    cursor: Annotated[SafeText | None, Query(max_length=400, description="`next_cursor` of the previous page.")] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = 100,
) -> VisitPage:
    flt = _filter(from_, to, camera_id=camera_id, subject_id=subject_id, decision=decision)
    with state.pool.connection() as conn, conn.transaction():
        try:
            items, nxt = queries.list_visits(conn, flt, limit, cursor)
        except VisitQueryError as exc:
            raise Unprocessable(str(exc)) from None
        state.audit.record(conn, AuditEvent("visits.list", key.actor, subject_id=subject_id,
                                            request_id=getattr(request.state, "request_id", None),
                                            details={"filters": flt.describe(), "count": len(items)}))
    return VisitPage(items=[Visit(**i) for i in items], next_cursor=nxt)


@router.get("/summary", response_model=VisitSummary, response_model_by_alias=True,
            summary="Visit counts per hour or day, by camera, decision or subject (audited)")
def visit_summary(
    request: Request, key: AuditKey, state: StateDep, from_: FromQ = None, to: ToQ = None,
    interval: Literal["hour", "day"] = "hour",
    group_by: Literal["camera", "decision", "subject"] = "decision",
) -> VisitSummary:
    flt = _filter(from_, to)
    with state.pool.connection() as conn, conn.transaction():
        try:
            buckets = queries.summary(conn, flt.start, flt.end, interval, group_by)
        except VisitQueryError as exc:
            raise Unprocessable(str(exc)) from None
        state.audit.record(conn, AuditEvent("visits.summary", key.actor,
                                            request_id=getattr(request.state, "request_id", None),
                                            details={"from": flt.start.isoformat(), "to": flt.end.isoformat(),
                                                     "interval": interval, "group_by": group_by}))
    return VisitSummary.model_validate({"interval": interval, "group_by": group_by, "from": flt.start,
                                        "to": flt.end, "buckets": buckets})
