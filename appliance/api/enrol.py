"""Enrolment endpoints: one subject's encodings (JSON or raw float32), and the resumable NDJSON bulk load."""

from __future__ import annotations

import asyncio
import uuid
from typing import Annotated

from fastapi import APIRouter, Header, Query, Request, status
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from appliance.api.deps import EnrollKey, StateDep
from appliance.api.openapi import problems, requires
from appliance.auth import Scope, require
from appliance.bulk_enrolment import BulkEnrolment
from appliance.enrolment import enrol
from appliance.errors import BadRequest, Unprocessable, UnsupportedMediaType
from appliance.state import AppState
from appliance.types import SafeText
from vector.errors import UnknownModel
from vector.templates import as_matrix, from_float32_bytes

router = APIRouter(prefix="/v1", tags=["enrolment"])
MAX_PER_REQUEST = 1000


class EncodingsCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: SafeText = Field(min_length=1, max_length=100)
    vectors: list[list[float]] = Field(min_length=1, max_length=MAX_PER_REQUEST,
                                       description="Raw embeddings; normalised and sealed by the appliance.")


class EncodingOut(BaseModel):
    encoding_id: uuid.UUID
    subject_id: uuid.UUID
    model: str
    template_version: int


class EncodingsCreated(BaseModel):
    encodings: list[EncodingOut]


class BulkResult(BaseModel):
    idempotency_key: str
    state: str
    lines_seen: int
    lines_skipped: int = Field(description="Lines committed by an earlier attempt with this key.")
    encodings_enrolled: int = Field(description="Encodings enrolled by this request.")
    lines_done: int
    encodings_total: int


def _model_dim(state: AppState, model: str) -> int:
    spec = state.settings.models.get(model)
    if spec is None:
        raise UnknownModel(f"unknown model {model!r}; configured: {', '.join(sorted(state.settings.models))}")
    return int(spec.dim)


@router.post(
    "/subjects/{subject_id}/encodings", response_model=EncodingsCreated, status_code=status.HTTP_201_CREATED,
    summary="Enrol one or more embeddings of a subject", responses=problems(409, 410, 415),
    openapi_extra={"requestBody": {"required": True, "content": {
        "application/json": {"schema": EncodingsCreate.model_json_schema()},
        "application/octet-stream": {"schema": {"type": "string", "format": "binary",
                                                "description": "n x dim float32 little-endian; ?model= required"}},
    }}},
)
async def create_encodings(
    subject_id: uuid.UUID, request: Request, key: EnrollKey, state: StateDep,
    model: Annotated[SafeText | None, Query(max_length=100, description="With a raw float32 body.")] = None,
) -> EncodingsCreated:
    """JSON is validated strictly by its schema (strings and booleans are not numbers); ``?model=`` goes
    only with a raw body, so a model named twice is refused rather than one silently winning."""
    body = await request.body()
    ctype = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
    if ctype == "application/octet-stream":
        if not model:
            raise Unprocessable("a raw float32 body needs ?model=")
        vectors = from_float32_bytes(body, _model_dim(state, model))
        if len(vectors) > MAX_PER_REQUEST:
            raise Unprocessable(f"at most {MAX_PER_REQUEST} vectors per request")
    elif ctype == "application/json":
        if model is not None:
            raise Unprocessable("model is given both in the query and in the JSON body; "
                                "?model= is for raw float32 bodies only")
        try:
            req = EncodingsCreate.model_validate_json(body, strict=True)
        except ValidationError as exc:
            errors = [{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]} for e in exc.errors()[:20]]
            raise Unprocessable("the request did not validate", errors=errors) from None
        model = req.model
        vectors = as_matrix(req.vectors, _model_dim(state, model))
    else:
        raise UnsupportedMediaType("send application/json or application/octet-stream (float32 LE)")
    rid = getattr(request.state, "request_id", None)
    enrolled = await run_in_threadpool(enrol, state, subject_id, model, vectors, key.actor, rid)
    return EncodingsCreated(encodings=[EncodingOut(encoding_id=e.encoding_id, subject_id=e.subject_id, model=e.model,
                                                   template_version=e.template_version) for e in enrolled])


_BULK_FIELDS = {
    "subject_id": {"type": "string", "format": "uuid", "description": "An existing subject."},
    "external_ref": {"type": "string", "minLength": 1, "maxLength": 200,
                     "description": "Your id for the person; the subject is created on first use."},
    "model": {"type": "string", "description": "A configured model."},
    "vector": {"type": "array", "items": {"type": "number"}, "description": "The model's dimension."},
}
_BULK_LINE = {"oneOf": [  # exactly one of subject_id and external_ref
    {"type": "object", "required": [who, "model", "vector"], "properties": _BULK_FIELDS}
    for who in ("subject_id", "external_ref")]}
_BULK_DOC = {
    **requires(Scope.ENROLL),
    "parameters": [{"name": "Idempotency-Key", "in": "header", "required": True,
                    "schema": {"type": "string", "minLength": 1, "maxLength": 200},
                    "description": "Names this load: send the same body with the same key to resume it."}],
    "requestBody": {"required": True, "content": {media: {"schema": {
        "type": "array", "items": _BULK_LINE,
        "description": "NDJSON: each item is one line, a JSON object; blank lines are skipped."}}
        for media in ("application/x-ndjson", "application/jsonl")}},
}


@router.post(
    "/encodings:bulk", response_model=BulkResult, summary="Bulk enrolment from NDJSON, resumable by Idempotency-Key",
    openapi_extra=_BULK_DOC, responses=problems(400, 409, 415),
)
async def bulk_encodings(
    request: Request, state: StateDep,
    # Declared required in _BULK_DOC; read as optional so that its absence is a 400 that says what to send.
    idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key", include_in_schema=False)] = None,
) -> BulkResult:
    key = state.api_keys.authenticate(request.headers.get("authorization"))
    require(key, Scope.ENROLL)
    request.state.api_key = key
    if not idempotency_key:
        raise BadRequest("POST /v1/encodings:bulk needs an Idempotency-Key header (reuse it to resume)")
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype not in ("application/x-ndjson", "application/jsonl", "application/json-seq", "text/plain"):
        raise UnsupportedMediaType("send application/x-ndjson")
    job = BulkEnrolment(state, idempotency_key, key.actor, getattr(request.state, "request_id", None),
                        chunk_size=state.settings.bulk_chunk_size)
    await run_in_threadpool(job.begin)
    committing: asyncio.Future[None] | None = None  # the previous chunk's commit, overlapping our parsing
    rest = b""
    try:
        async for piece in request.stream():
            rest += piece
            *lines, rest = rest.split(b"\n")
            for line in lines:
                if job.add_line(line):
                    if committing is not None:
                        await committing
                    committing = asyncio.ensure_future(run_in_threadpool(job.flush, job.take()))
        job.add_line(rest)
    finally:
        if committing is not None:
            await committing
    return BulkResult(**await run_in_threadpool(job.finish))
