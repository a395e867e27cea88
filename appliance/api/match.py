"""``POST /v1/match`` and ``/v1/match:batch``: the hot path, top to bottom in one place.

API-key check (cached) → parse and validate (model, dimension, finite, non-zero; JSON or raw
little-endian float32) → protect and search the in-process index → drop tombstoned labels → one
candidate per subject → threshold → queue one audit event per embedding → reply.
No PostgreSQL, Vault or S3 round trip. The handlers are ``async`` and authenticate inline (not
through sync dependencies) to avoid thread-pool hops that would cost more than the search itself.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from appliance.audit import AuditEvent
from appliance.audit.log import audit_log
from appliance.auth import ApiKey, Scope, require
from appliance.errors import DependencyUnavailable, Unprocessable, UnsupportedMediaType
from appliance.matching import IndexService, MatchResult, ServiceConfig
from vector.errors import IndexNotReady, InvalidVector, UnknownModel
from vector.templates import as_matrix, from_float32_bytes

router = APIRouter(prefix="/v1", tags=["match"])
MAX_K = 100
MAX_BATCH = 256


class MatchOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, max_length=100)
    k: int = Field(default=5, ge=1, le=MAX_K)
    threshold: float | None = Field(default=None, ge=-1.0, le=1.0, description="Default: the model's threshold.")
    camera_id: str | None = Field(default=None, max_length=200)
    track_id: str | None = Field(default=None, max_length=200)


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


@contextmanager
def vector_errors() -> Iterator[None]:
    """The vector package's errors as API problems (422 for the caller's input, 503 while warming)."""
    try:
        yield
    except (InvalidVector, UnknownModel) as exc:
        raise Unprocessable(str(exc)) from None
    except IndexNotReady as exc:
        raise DependencyUnavailable(str(exc)) from None


def _raw_body_doc(model: type[BaseModel]) -> dict[str, Any]:
    return {"requestBody": {"content": {
        "application/json": {"schema": model.model_json_schema()},
        "application/octet-stream": {"schema": {"type": "string", "format": "binary",
                                                "description": "n x dim little-endian float32; options in the query"}},
    }, "required": True}}


async def _parse(request: Request, model_cls: type[MatchOptions], batch: bool) -> tuple[MatchOptions, np.ndarray]:
    body = await request.body()
    ctype = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
    service: IndexService = request.app.state.appliance.extras["matcher"]
    try:
        if ctype == "application/octet-stream":
            opts = MatchOptions.model_validate(dict(request.query_params))
            dim = _dim(service, opts.model)
            vectors = from_float32_bytes(body, dim)
            if len(vectors) > (MAX_BATCH if batch else 1):
                raise InvalidVector(f"at most {MAX_BATCH if batch else 1} embeddings per request")
            return opts, vectors
        if ctype != "application/json":
            raise UnsupportedMediaType("send application/json or application/octet-stream (float32 LE)")
        opts = model_cls.model_validate_json(body)
    except ValidationError as exc:
        errors = [{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]} for e in exc.errors()[:20]]
        raise Unprocessable("the request did not validate", errors=errors) from None
    dim = _dim(service, opts.model)
    values = opts.embeddings if isinstance(opts, MatchBatchRequest) else opts.embedding  # type: ignore[attr-defined]
    return opts, as_matrix(values, dim)


def _dim(service: IndexService, model: str) -> int:
    dim = service.dims.get(model)
    if dim is None:
        raise UnknownModel(f"unknown model {model!r}; configured: {', '.join(sorted(service.dims))}")
    return dim


def _result(r: MatchResult) -> dict[str, Any]:
    best = r.best if r.decision == "match" else None
    return {
        "decision": r.decision,
        "subject_id": str(best.subject_id) if best else None,
        "similarity": round(r.candidates[0].similarity, 6) if r.candidates else None,
        "threshold": r.threshold,
        "candidates": [{"subject_id": str(c.subject_id), "encoding_id": str(c.encoding_id),
                        "similarity": round(c.similarity, 6)} for c in r.candidates],
        "index_version": r.index_version,
    }


def _authorize(request: Request) -> ApiKey:
    key = request.app.state.appliance.api_keys.authenticate(request.headers.get("authorization"))
    require(key, Scope.MATCH)
    request.state.api_key = key
    return key  # type: ignore[no-any-return]


def _run(request: Request, key: ApiKey, opts: MatchOptions, vectors: np.ndarray, action: str) -> list[MatchResult]:
    state = request.app.state.appliance
    with vector_errors():
        results = state.extras["matcher"].match(opts.model, vectors, opts.k, opts.threshold)
    audit = audit_log(state)
    rid = getattr(request.state, "request_id", None)
    for r in results:
        best = r.best
        audit.submit(AuditEvent(
            action, key.actor, outcome=r.decision,
            subject_id=best.subject_id if best is not None and r.decision == "match" else None,
            request_id=rid,
            details={"model": opts.model, "k": opts.k, "similarity": round(best.similarity, 4) if best else None,
                     "threshold": r.threshold, "camera_id": opts.camera_id, "track_id": opts.track_id,
                     "index_version": r.index_version, "candidates": len(r.candidates)},
        ))
    return results


async def _authorized_match(request: Request, model_cls: type[MatchOptions], batch: bool) -> list[MatchResult]:
    key = _authorize(request)  # 401/403 before reading the body
    with vector_errors():
        opts, vectors = await _parse(request, model_cls, batch=batch)
    return _run(request, key, opts, vectors, "match")


@router.post("/match", response_model=MatchResponse, summary="Who is this? One embedding against the index",
             openapi_extra=_raw_body_doc(MatchRequest))
async def match(request: Request) -> Response:
    results = await _authorized_match(request, MatchRequest, batch=False)
    return Response(json.dumps(_result(results[0])), media_type="application/json")


@router.post("/match:batch", response_model=MatchBatchResponse, summary=f"Up to {MAX_BATCH} embeddings at once",
             openapi_extra=_raw_body_doc(MatchBatchRequest))
async def match_batch(request: Request) -> Response:
    results = await _authorized_match(request, MatchBatchRequest, batch=True)
    return Response(json.dumps({"results": [_result(r) for r in results]}), media_type="application/json")


@router.get("/index", summary="Hot index status of this worker: readiness, sizes, kinds, feed positions")
def index_status(request: Request) -> dict[str, Any]:
    _authorize(request)
    return request.app.state.appliance.extras["matcher"].status()  # type: ignore[no-any-return]


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
