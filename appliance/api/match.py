"""``POST /v1/match`` and ``/v1/match:batch``: the hot path, top to bottom in one place.

API-key check (cached) → parse and validate (JSON strictly by its schema, or raw little-endian
float32 with options in the query, never both; dimension, finite, a norm float32 can normalise) →
protect and search the in-process index → drop tombstoned labels → one candidate per subject
(similarities clamped to [-1, 1]) → threshold → queue one audit event per embedding → fold each result
into its visit (in memory) → reply.
No PostgreSQL, Vault or S3 round trip.

Plain FastAPI routes, inside the same middlewares as every route (request id, body cap, metrics, access
log, denial audit); their errors are mapped by ``api.problems`` like every route's. A second, raw ASGI door
in front of the router was measured in issue 18: once it shared that code it saved 21 % of the server's
CPU per match, short of the 30 % that would pay for two doors, so there is one. The routes read the body
themselves (JSON or raw float32) and format the reply directly.
"""

from __future__ import annotations

import uuid
from typing import Any, Literal
from urllib.parse import parse_qsl

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from appliance.api.deps import app_state
from appliance.api.openapi import problems, requires
from appliance.audit import AuditEvent
from appliance.auth import ApiKey, Scope, require
from appliance.errors import DependencyUnavailable, Unprocessable, UnsupportedMediaType
from appliance.matching import IndexService, MatchResult
from appliance.state import AppState
from appliance.types import SafeText
from vector.errors import InvalidVector, UnknownModel
from vector.fusion import TrackDecision
from vector.matcher import uuid_text
from vector.templates import as_matrix, from_float32_bytes

router = APIRouter(prefix="/v1", tags=["match"])
MAX_K = 100
MAX_BATCH = 256


class MatchOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)  # frozen: validated raw-body options are shared

    model: SafeText = Field(min_length=1, max_length=100)
    k: int = Field(default=5, ge=1, le=MAX_K)
    threshold: float | None = Field(default=None, ge=-1.0, le=1.0, allow_inf_nan=False,
                                    description="Default: the model's threshold (a single frame) and its track "
                                                "threshold (the fused answer). When given, both use it.")
    min_margin: float | None = Field(default=None, ge=0.0, le=2.0, allow_inf_nan=False,
                                     description='A best subject less than this far ahead of the runner-up is '
                                                 '"unknown" (the frame and the track).')
    camera_id: SafeText | None = Field(default=None, max_length=200)
    track_id: SafeText | None = Field(default=None, max_length=200)


class MatchRequest(MatchOptions):
    embedding: list[float] = Field(description="The raw embedding (normalised by the appliance).")


class MatchBatchRequest(MatchOptions):
    embeddings: list[list[float]] = Field(min_length=1, max_length=MAX_BATCH)


class CandidateOut(BaseModel):
    subject_id: uuid.UUID
    encoding_id: uuid.UUID
    similarity: float


class TrackOut(BaseModel):
    decision: str = Field(description='"match" when the track names ``subject_id`` (docs/api.md, "Track fusion").')
    subject_id: uuid.UUID | None
    score: float = Field(description="The best subject's mean similarity over the track's recent frames.")
    frames: int = Field(description="Frames of this track so far, this one included.")
    changed: bool = Field(description="This frame changed the fused decision or its subject (true on the first).")
    threshold: float = Field(description="What the fused decision applied: the request's own `threshold`, else the "
                                         "model's track threshold (GET /v1/models).")


class MatchResponse(BaseModel):
    decision: str = Field(description='"match" when the best similarity reaches the threshold, else "unknown".')
    subject_id: uuid.UUID | None
    similarity: float | None
    margin: float | None = Field(description="Best similarity minus the best other subject's (null: one subject).")
    track: TrackOut | None = Field(description="The track's fused answer; null without a track_id.")
    threshold: float
    candidates: list[CandidateOut]
    index_version: str
    path: Literal["hot", "cold"] = Field(description='"hot": this worker\'s in-memory index; "cold": exact search '
                                         "in PostgreSQL, answered while that index is still warming.")


class MatchBatchResponse(BaseModel):
    results: list[MatchResponse]


def _raw_body_doc(model: type[BaseModel]) -> dict[str, Any]:
    """The two bodies a match route reads itself (so FastAPI cannot see them), and the query options that
    go with a raw float32 body."""
    options = MatchOptions.model_json_schema()
    query = [{"name": name, "in": "query", "required": False, "schema": field,
              "description": "With a raw float32 body only (a JSON body carries its options)."
              + (" Required there." if name in options.get("required", ()) else "")}
             for name, field in options["properties"].items()]
    return {**requires(Scope.MATCH), "parameters": query, "requestBody": {"content": {
        "application/json": {"schema": model.model_json_schema()},
        "application/octet-stream": {"schema": {"type": "string", "format": "binary",
                                                "description": "n x dim little-endian float32; options in the query"}},
    }, "required": True}}


# --- parse, match, audit, reply ---------------------------------------------------------------------


def parse(service: IndexService, ctype: str, query: str, body: bytes, batch: bool) -> tuple[MatchOptions, np.ndarray]:
    """Options and a validated (n, dim) float32 matrix from a JSON body or a raw float32 body + query.

    JSON is validated strictly, exactly as the schema documents it: ``"0.1"`` and ``true`` are not
    numbers and ``k`` is an integer, not a boolean. One source per option: the query string belongs
    to raw bodies, so a JSON request with one is refused rather than half-ignored."""
    try:
        if ctype == "application/octet-stream":
            opts = _query_options(query)
            vectors = from_float32_bytes(body, _dim(service, opts.model))
            if len(vectors) > (MAX_BATCH if batch else 1):
                raise InvalidVector(f"at most {MAX_BATCH if batch else 1} embeddings per request")
            return opts, vectors
        if ctype != "application/json":
            raise UnsupportedMediaType("send application/json or application/octet-stream (float32 LE)")
        if query:
            raise Unprocessable("a JSON request carries its options in the body; query parameters are for "
                                "raw float32 bodies only")
        opts = (MatchBatchRequest if batch else MatchRequest).model_validate_json(body, strict=True)
    except ValidationError as exc:
        # Never echo the input back: it may be a biometric vector.
        errors = [{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]} for e in exc.errors()[:20]]
        raise Unprocessable("the request did not validate", errors=errors) from None
    values = opts.embeddings if isinstance(opts, MatchBatchRequest) else opts.embedding  # type: ignore[attr-defined]
    return opts, as_matrix(values, _dim(service, opts.model))


_QUERY_OPTIONS: dict[str, MatchOptions] = {}
_QUERY_OPTIONS_MAX = 256


def _query_options(query: str) -> MatchOptions:
    """A raw body's options, validated once per distinct query string: a camera pipeline sends the
    same few (``model=…&k=…``) on every match. Only valid ones are kept (frozen, so safe to share)."""
    opts = _QUERY_OPTIONS.get(query)
    if opts is None:
        pairs = parse_qsl(query, keep_blank_values=True)
        fields = dict(pairs)
        if len(fields) != len(pairs):
            raise Unprocessable("a query parameter is given more than once")
        opts = MatchOptions.model_validate(fields)
        if len(_QUERY_OPTIONS) >= _QUERY_OPTIONS_MAX:  # e.g. a track id per request: keep it bounded
            _QUERY_OPTIONS.clear()
        _QUERY_OPTIONS[query] = opts
    return opts


def _dim(service: IndexService, model: str) -> int:
    dim = service.dims.get(model)
    if dim is None:
        raise UnknownModel(f"unknown model {model!r}; configured: {', '.join(sorted(service.dims))}")
    return dim


def render(r: MatchResult) -> str:
    """One result as JSON text, formatted directly: json.dumps of the equivalent dicts costs ~3x more on
    the match path. Safe because every value is a UUID, a finite float, or one of our own tokens."""
    cands = r.candidates
    best = cands[0] if cands and r.decision == "match" else None
    items = ",".join(f'{{"subject_id":"{uuid_text(c.subject)}","encoding_id":"{uuid_text(c.encoding)}",'
                     f'"similarity":{round(c.similarity, 6)!r}}}' for c in cands)
    subject = f'"{uuid_text(best.subject)}"' if best else "null"
    similarity = repr(round(cands[0].similarity, 6)) if cands else "null"
    margin = "null" if r.margin is None else repr(round(r.margin, 6))
    return (f'{{"decision":"{r.decision}","subject_id":{subject},"similarity":{similarity},"margin":{margin},'
            f'"track":{render_track(r.track)},'
            f'"threshold":{float(r.threshold)!r},"candidates":[{items}],"index_version":"{r.index_version}",'
            f'"path":"{r.path}"}}')


def render_track(t: TrackDecision | None) -> str:
    if t is None:
        return "null"
    subject = f'"{uuid_text(t.subject)}"' if t.subject is not None else "null"
    return (f'{{"decision":"{t.decision}","subject_id":{subject},"score":{round(t.score, 6)!r},'
            f'"frames":{t.frames},"changed":{"true" if t.changed else "false"},"threshold":{float(t.threshold)!r}}}')


def answer(state: AppState, key: ApiKey, ctype: str, query: str, body: bytes, batch: bool,
           request_id: str | None) -> bytes:
    """Match, queue the audit events, and return the JSON reply; raises for 4xx/503 (``api.problems`` maps it)."""
    service = state.matcher
    if service is None:  # only before the lifespan has started it
        raise DependencyUnavailable("the hot index is not started")
    opts, vectors = parse(service, ctype, query, body, batch)
    results = service.identify(opts.model, vectors, opts.k, opts.threshold, opts.min_margin, opts.camera_id,
                               opts.track_id)
    submit = state.audit.submit
    visit = state.visits.record_match  # folds into an in-memory buffer; a writer thread COPYs it (appliance.visits)
    for r in results:
        best = r.best
        track = r.track
        visit(r, opts.camera_id, opts.track_id)
        submit(AuditEvent(
            "match", key.actor, outcome=r.decision,
            subject_id=best.subject_id if best is not None and r.decision == "match" else None,
            request_id=request_id,
            details={"model": opts.model, "k": opts.k, "similarity": round(best.similarity, 4) if best else None,
                     "threshold": r.threshold, "camera_id": opts.camera_id, "track_id": opts.track_id,
                     **({} if track is None else {"track": track.decision, "track_frames": track.frames}),
                     "index_version": r.index_version, "candidates": len(r.candidates), "path": r.path},
        ))
    if batch:
        return ('{"results":[' + ",".join(render(r) for r in results) + "]}").encode()
    return render(results[0]).encode()


def authorize(state: AppState, authorization: str | None) -> ApiKey:
    """The bearer key, which must hold the ``match`` scope (401/403 before the body is read)."""
    key = state.api_keys.authenticate(authorization)
    require(key, Scope.MATCH)
    return key


async def _routed(request: Request, batch: bool) -> Response:
    state = app_state(request)
    key = request.state.api_key = authorize(state, request.headers.get("authorization"))
    ctype = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
    query = request.scope["query_string"].decode("latin-1")  # not request.url: building it costs more than the parse
    out = answer(state, key, ctype, query, await request.body(), batch, request.state.request_id)
    return Response(out, media_type="application/json")


@router.post("/match", response_model=MatchResponse, summary="Who is this? One embedding against the index",
             openapi_extra=_raw_body_doc(MatchRequest), responses=problems(415))
async def match(request: Request) -> Response:
    return await _routed(request, batch=False)


@router.post("/match:batch", response_model=MatchBatchResponse, summary=f"Up to {MAX_BATCH} embeddings at once",
             openapi_extra=_raw_body_doc(MatchBatchRequest), responses=problems(415))
async def match_batch(request: Request) -> Response:
    return await _routed(request, batch=True)


@router.get("/index", summary="Hot index status of this worker: readiness, sizes, kinds, feed positions",
            openapi_extra=requires(Scope.MATCH))
def index_status(request: Request) -> dict[str, Any]:
    state = app_state(request)
    request.state.api_key = authorize(state, request.headers.get("authorization"))
    if state.matcher is None:
        raise DependencyUnavailable("the hot index is not started")
    return state.matcher.status()
