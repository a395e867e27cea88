"""``POST /v1/match`` and ``/v1/match:batch``: the hot path, top to bottom in one place.

API-key check (cached) → parse and validate (JSON strictly by its schema, or raw little-endian
float32 with options in the query, never both; dimension, finite, a norm float32 can normalise) →
protect and search the in-process index → drop tombstoned labels → one candidate per subject
(similarities clamped to [-1, 1]) → threshold → queue one audit event per embedding → reply.
No PostgreSQL, Vault or S3 round trip.

Two doors lead to the same ``answer``: the FastAPI routes (documented in OpenAPI, used when the fast
door is off) and ``FastMatch``, a raw ASGI handler the application calls before its router and
middleware. The framework's routing, dependency and middleware layers cost several times the FAISS
search itself on a 2-core box, so the fast door does their work (request id, body cap, problem
documents, metrics, access log) inline. Tests prove both doors give the same answers.
"""

from __future__ import annotations

import json
import os
import re
import time
import uuid
from typing import Any
from urllib.parse import parse_qsl

import numpy as np
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from appliance.api.middleware import LATENCY, REQUEST_ID_RE, REQUESTS
from appliance.api.openapi import problems, requires
from appliance.api.problems import PROBLEM, map_dependency_error, problem_document, problem_headers
from appliance.api.types import SafeText
from appliance.audit import AuditEvent
from appliance.audit.log import audit_log
from appliance.auth import ApiKey, Scope, require
from appliance.errors import ApplianceError, DependencyUnavailable, Unprocessable, UnsupportedMediaType
from appliance.logs import get_logger
from appliance.matching import IndexService, MatchResult, ServiceConfig
from vector.errors import IndexNotReady, InvalidVector, UnknownModel
from vector.matcher import uuid_text
from vector.templates import as_matrix, from_float32_bytes

log = get_logger("appliance.access")
router = APIRouter(prefix="/v1", tags=["match"])
MAX_K = 100
MAX_BATCH = 256
SLOW_SECONDS = 0.05  # a match slower than this is always logged: the camera pipelines' budget


class MatchOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)  # frozen: validated raw-door options are shared

    model: SafeText = Field(min_length=1, max_length=100)
    k: int = Field(default=5, ge=1, le=MAX_K)
    threshold: float | None = Field(default=None, ge=-1.0, le=1.0, allow_inf_nan=False,
                                    description="Default: the model's threshold.")
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


class MatchResponse(BaseModel):
    decision: str = Field(description='"match" when the best similarity reaches the threshold, else "unknown".')
    subject_id: uuid.UUID | None
    similarity: float | None
    threshold: float
    candidates: list[CandidateOut]
    index_version: str


class MatchBatchResponse(BaseModel):
    results: list[MatchResponse]


class _VectorErrors:
    """The vector package's errors as API problems (422 for the caller's input, 503 while warming).

    A class, not ``@contextmanager``: the generator version costs ~6x more, once per match."""

    __slots__ = ()

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        if isinstance(exc, InvalidVector | UnknownModel):
            raise Unprocessable(str(exc)) from None
        if isinstance(exc, IndexNotReady):
            raise DependencyUnavailable(str(exc)) from None


_VECTOR_ERRORS = _VectorErrors()


def vector_errors() -> _VectorErrors:
    """``with vector_errors():`` maps what the block raises (see ``_VectorErrors``)."""
    return _VECTOR_ERRORS


def _raw_body_doc(model: type[BaseModel]) -> dict[str, Any]:
    """The two bodies a match door reads itself (so FastAPI cannot see them), and the query options that
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


# --- the one implementation both doors call ---------------------------------------------------------


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
    """The raw door's options, validated once per distinct query string: a camera pipeline sends the
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
    return (f'{{"decision":"{r.decision}","subject_id":{subject},"similarity":{similarity},'
            f'"threshold":{float(r.threshold)!r},"candidates":[{items}],"index_version":"{r.index_version}"}}')


def answer(state: Any, key: ApiKey, ctype: str, query: str, body: bytes, batch: bool, request_id: str | None) -> bytes:
    """Match, queue the audit events, and return the JSON reply; raises ``ApplianceError`` for 4xx/503."""
    service: IndexService = state.extras["matcher"]
    with vector_errors():
        opts, vectors = parse(service, ctype, query, body, batch)
        results = service.match(opts.model, vectors, opts.k, opts.threshold)
    submit = audit_log(state).submit
    for r in results:
        best = r.best
        submit(AuditEvent(
            "match", key.actor, outcome=r.decision,
            subject_id=best.subject_id if best is not None and r.decision == "match" else None,
            request_id=request_id,
            details={"model": opts.model, "k": opts.k, "similarity": round(best.similarity, 4) if best else None,
                     "threshold": r.threshold, "camera_id": opts.camera_id, "track_id": opts.track_id,
                     "index_version": r.index_version, "candidates": len(r.candidates)},
        ))
    if batch:
        return ('{"results":[' + ",".join(render(r) for r in results) + "]}").encode()
    return render(results[0]).encode()


def _authorize(request: Request) -> ApiKey:
    key = request.app.state.appliance.api_keys.authenticate(request.headers.get("authorization"))
    require(key, Scope.MATCH)
    request.state.api_key = key
    return key  # type: ignore[no-any-return]


# --- door 1: the routed FastAPI endpoints (the OpenAPI definition) ------------------------------------


async def _routed(request: Request, batch: bool) -> Response:
    key = _authorize(request)  # 401/403 before reading the body
    ctype = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
    body = await request.body()
    out = answer(request.app.state.appliance, key, ctype, request.url.query, body, batch,
                 getattr(request.state, "request_id", None))
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
    _authorize(request)
    return request.app.state.appliance.extras["matcher"].status()  # type: ignore[no-any-return]


# --- door 2: the raw ASGI handler in front of the router ---------------------------------------------

_JSON_HEADERS = [(b"content-type", b"application/json")]
_CTYPE_RE = re.compile(r"^\s*([^;\s]+)")


class FastMatch:
    """``POST /v1/match[:batch]`` without the framework: same ``answer``, errors, metrics and audit."""

    def __init__(self, app: FastAPI, path: str, batch: bool, max_body: int, log_success: bool) -> None:
        self.app, self.path, self.batch = app, path, batch
        self.max_body = max_body
        self.log_success = log_success
        self._count: dict[int, Any] = {}
        self._latency = LATENCY.labels("POST", path)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        start = time.perf_counter()
        auth = ctype = length = rid = None
        for name, value in scope["headers"]:
            if name == b"authorization":
                auth = value
            elif name == b"content-type":
                ctype = value
            elif name == b"content-length":
                length = value
            elif name == b"x-request-id":
                rid = value
        rid_text = rid.decode("latin-1") if rid is not None else ""
        if not REQUEST_ID_RE.match(rid_text):
            rid_text = os.urandom(16).hex()  # same shape as uuid4().hex, a third of the cost
        try:
            state = getattr(self.app.state, "appliance", None)
            if state is None:
                raise DependencyUnavailable("the service is starting")
            key = state.api_keys.authenticate(None if auth is None else auth.decode("latin-1"))
            require(key, Scope.MATCH)
            if length is not None and (not length.isdigit() or int(length) > self.max_body):
                raise _TooLarge(f"request body exceeds {self.max_body} bytes")
            body = await self._body(receive)
            found = _CTYPE_RE.match(ctype.decode("latin-1")) if ctype is not None else None
            media = found.group(1).lower() if found else "application/json"
            query = scope.get("query_string", b"").decode("latin-1")
            status, out, headers = 200, answer(state, key, media, query, body, self.batch, rid_text), _JSON_HEADERS
        except Exception as exc:  # every failure leaves as a problem document, as through the router
            status, out, headers = self._problem(exc, rid_text)
            if status in (401, 403):  # audited like the routes' (appliance.api.app), aggregated
                audit_log(state).deny("POST", self.path, status, None if auth is None else auth.decode("latin-1"),
                                      state.api_keys)
        await send({"type": "http.response.start", "status": status,
                    "headers": [*headers, (b"content-length", str(len(out)).encode()),
                                (b"x-request-id", rid_text.encode())]})
        await send({"type": "http.response.body", "body": out})
        self._record(status, start, rid_text)

    async def _body(self, receive: Any) -> bytes:
        body, more = b"", True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_body:
                raise _TooLarge(f"request body exceeds {self.max_body} bytes")
        return body

    def _problem(self, exc: Exception, rid: str) -> tuple[int, bytes, list[tuple[bytes, bytes]]]:
        if isinstance(exc, _TooLarge):
            status, title, slug, detail, extra = 413, "Payload too large", "payload-too-large", str(exc), {}
        elif isinstance(exc, ApplianceError):
            status, title, slug, detail, extra = exc.status, exc.title, exc.type_slug, exc.detail, exc.extra
        elif (mapped := map_dependency_error(exc)) is not None:
            log.warning("dependency_unavailable", error=type(exc).__name__, path=self.path)
            status, title, slug, detail, extra = 503, mapped.title, mapped.type_slug, mapped.detail, {}
        else:
            log.error("unhandled_error", error=type(exc).__name__, path=self.path, request_id=rid)
            status, title, slug, detail, extra = (500, "Internal error", "internal",
                                                  "an unexpected error occurred; see the request id in logs", {})
        body = json.dumps(problem_document(status, title, detail, slug, self.path, rid, **extra)).encode()
        headers = [(b"content-type", PROBLEM.encode())]
        headers += [(k.lower().encode(), v.encode()) for k, v in (problem_headers(status) or {}).items()]
        if status == 413:
            headers.append((b"connection", b"close"))  # the rest of the body is not read
        return status, body, headers

    def _record(self, status: int, start: float, rid: str) -> None:
        elapsed = time.perf_counter() - start
        counter = self._count.get(status)
        if counter is None:
            counter = self._count[status] = REQUESTS.labels("POST", self.path, str(status))
        counter.inc()
        self._latency.observe(elapsed)
        if self.log_success or status != 200 or elapsed > SLOW_SECONDS:
            log.info("request", method="POST", route=self.path, status=status, ms=round(elapsed * 1000, 3),
                     request_id=rid)


class _TooLarge(Exception):
    """The body passed ``max_body_bytes`` (413)."""


def _start(state: Any) -> None:
    audit_log(state)  # created now, not on the first match
    service = IndexService(state.settings, state.pool, state.redis, lambda: state.keys,
                           ServiceConfig.from_settings(state.settings))
    state.extras["matcher"] = service
    service.start()


def _stop(state: Any) -> None:
    service = state.extras.get("matcher")
    if service is not None:
        service.stop()


def register(app: FastAPI) -> None:
    app.include_router(router)
    app.state.startup_hooks.append(_start)
    app.state.shutdown_hooks.append(_stop)
    settings = app.state.settings
    if settings.api_fast_match:
        for path, batch in (("/v1/match", False), ("/v1/match:batch", True)):
            app.state.fast_routes[("POST", path)] = FastMatch(app, path, batch, settings.max_body_bytes,
                                                              settings.access_log_matches)
