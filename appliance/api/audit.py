"""Audit trail over HTTP: the streamed, verifiable export for auditors (scope ``audit``)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import PlainTextResponse, StreamingResponse

from appliance.api.deps import AuditKey, StateDep
from appliance.api.openapi import problems
from appliance.audit import AuditEvent
from appliance.audit.export import ExportError, ExportFilter, export_lines
from appliance.errors import BadRequest
from appliance.types import IsoDatetime, SafeText

router = APIRouter(prefix="/v1/audit", tags=["audit"])


class PemResponse(PlainTextResponse):
    """Text served as ``application/x-pem-file``; as the response class, it is also what OpenAPI lists."""

    media_type = "application/x-pem-file"


@router.get(
    "/export",
    summary="Export audit records with checkpoints and the public key (JSONL or CSV, streamed)",
    response_class=StreamingResponse,
    responses={200: {"content": {"application/x-ndjson": {"schema": {"type": "string"}},
                                 "text/csv": {"schema": {"type": "string"}}},
                     "headers": {"Content-Disposition": {"required": True, "schema": {"type": "string"}}}},
               **problems(400)},
)
def export(
    request: Request,
    key: AuditKey,
    state: StateDep,
    from_: Annotated[IsoDatetime | None, Query(alias="from", description="Inclusive start (ISO 8601)")] = None,
    to: Annotated[IsoDatetime | None, Query(description="Exclusive end (ISO 8601)")] = None,
    subject_id: SafeText | None = None,
    action: SafeText | None = None,
    format: Annotated[Literal["jsonl", "csv"], Query()] = "jsonl",
) -> StreamingResponse:
    try:
        flt = ExportFilter.build(from_, to, subject_id, action)
    except ExportError as exc:
        raise BadRequest(str(exc)) from None
    audit = state.audit
    with state.pool.connection() as conn:
        audit.record(conn, AuditEvent("audit.export", key.actor, subject_id=flt.subject_id,
                                      request_id=getattr(request.state, "request_id", None),
                                      details={"filters": flt.describe(), "format": format}))
    audit.flush(2.0)  # the export should include what was submitted up to now
    lines = export_lines(state.pool, state.keys, flt, fmt=format)
    media = "text/csv" if format == "csv" else "application/x-ndjson"
    name = f"audit-{datetime.now(UTC):%Y%m%dT%H%M%SZ}.{format}"
    return StreamingResponse(lines, media_type=media, headers={"Content-Disposition": f'attachment; filename="{name}"'})


@router.get("/public-key", summary="The Ed25519 public key (PEM) that signs checkpoints, exports and receipts",
            response_class=PemResponse)
def public_key(_: AuditKey, state: StateDep) -> PemResponse:
    return PemResponse(state.keys.public_key_pem().decode())
