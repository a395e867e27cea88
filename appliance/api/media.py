"""Media over HTTP (scope ``media``; ``admin`` implies it): upload, streamed decrypting reads with
Range, thumbnails, paged metadata and delete. Every call is audited in the transaction that reads
or changes the rows. The work happens in ``media.service.MediaService`` (``AppState.media``).
"""

from __future__ import annotations

import io
import uuid
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

import anyio
from fastapi import APIRouter, Header, Query, Request, Response, status
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.datastructures import FormData, UploadFile

from appliance import errors
from appliance.api.deps import MediaKey, StateDep
from appliance.api.openapi import problems
from appliance.audit import AuditEvent
from appliance.auth import ApiKey
from appliance.state import AppState
from appliance.types import IsoDatetime, SafeText
from media.records import AuditHook, MediaRow
from media.service import UploadMeta
from media.validate import ClipCheckingReader

router = APIRouter(prefix="/v1/media", tags=["media"])
Kind = Literal["image", "clip", "enrolment"]


class MediaInfo(BaseModel):
    id: uuid.UUID
    kind: str
    content_type: str
    size_bytes: int = Field(description="Size of the stored (metadata-free) plaintext")
    sha256: str = Field(description="Hex SHA-256 of the stored plaintext; also the ETag of GET")
    subject_id: uuid.UUID | None
    camera_id: str | None
    captured_at: datetime | None
    expires_at: datetime | None = Field(description="When retention deletes it; null: kept until erasure")
    width: int | None = None
    height: int | None = None
    thumbnails: list[int] = Field(default_factory=list, description="Available thumbnail sizes (px)")

    @classmethod
    def of(cls, row: MediaRow, thumbnails: list[int]) -> MediaInfo:
        return cls(id=row.id, kind=row.kind, content_type=row.content_type, size_bytes=row.size_bytes,
                   sha256=row.sha256.hex(), subject_id=row.subject_id, camera_id=row.camera_id,
                   captured_at=row.captured_at, expires_at=row.expires_at, width=row.width, height=row.height,
                   thumbnails=sorted(thumbnails))


class MediaPage(BaseModel):
    items: list[MediaInfo]
    next_cursor: str | None = Field(description="Pass as ?cursor= for the next page; null on the last page")


class _UploadFields(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt form field is an error, not silently dropped

    subject_id: uuid.UUID | None = None
    camera_id: SafeText | None = Field(default=None, max_length=200)
    captured_at: IsoDatetime | None = None
    kind: Kind | None = None


_UPLOAD_BODY = {
    "requestBody": {
        "description": "The image or clip as the raw body (streamed; preferred for clips), or a multipart form "
        "with one file part and optional fields subject_id, camera_id, captured_at, kind.",
        "content": {
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
            "multipart/form-data": {"schema": {"type": "object", "required": ["file"], "properties": {
                "file": {"type": "string", "format": "binary"}, "subject_id": {"type": "string"},
                "camera_id": {"type": "string"}, "captured_at": {"type": "string"}, "kind": {"type": "string"}}}},
        },
    }
}


@router.post("", response_model=MediaInfo, status_code=status.HTTP_201_CREATED, openapi_extra=_UPLOAD_BODY,
             responses=problems(400, 404, 409, 415),
             summary="Upload an image or clip (validated, metadata stripped, sealed, thumbnailed)")
async def upload_media(
    request: Request,
    key: MediaKey,
    state: StateDep,
    subject_id: uuid.UUID | None = None,
    camera_id: Annotated[SafeText | None, Query(max_length=200)] = None,
    captured_at: IsoDatetime | None = None,
    kind: Kind | None = None,
) -> MediaInfo:
    """Each parameter has one source: the query, or a field of a multipart form, never both (422)."""
    service = state.media
    audit = _auditor(state, key, request)
    query = {k: v for k, v in (("subject_id", subject_id), ("camera_id", camera_id), ("captured_at", captured_at),
                               ("kind", kind)) if v is not None}
    _once(request.query_params.multi_items(), "query parameter")
    if request.headers.get("content-type", "").startswith("multipart/form-data"):
        form = await request.form(max_files=1, max_fields=8)
        try:
            fields = _form_fields(form, query)
            upload = next((v for v in form.values() if isinstance(v, UploadFile)), None)
            if upload is None:
                raise errors.BadRequest("the multipart form has no file part")
            meta = _meta({**query, **fields})
            rows = await anyio.to_thread.run_sync(service.upload, ClipCheckingReader(upload.file), meta, audit,
                                                  upload.size)
        finally:
            await form.close()
    else:
        meta = _meta(query)
        declared = request.headers.get("content-length")
        length = int(declared) if declared and declared.isdigit() else None
        # A body no larger than an image may be is read here at once (fewer thread hops); larger ones stream.
        body: Any = io.BytesIO(await request.body()) if length is not None and length <= service.limits.image_bytes \
            else _BodyReader(request)
        rows = await anyio.to_thread.run_sync(service.upload, ClipCheckingReader(body), meta, audit, length)
    return MediaInfo.of(rows[0], [r.thumb_size for r in rows[1:] if r.thumb_size])


@router.get("", response_model=MediaPage, summary="List media metadata, paged by capture time")
def list_media(
    request: Request,
    key: MediaKey,
    state: StateDep,
    subject_id: uuid.UUID | None = None,
    camera_id: Annotated[SafeText | None, Query(max_length=200)] = None,
    from_: Annotated[IsoDatetime | None, Query(alias="from", description="Captured at or after (ISO 8601)")] = None,
    to: Annotated[IsoDatetime | None, Query(description="Captured before (ISO 8601)")] = None,
    cursor: Annotated[SafeText | None, Query(max_length=200)] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
) -> MediaPage:
    rows, thumbs, next_cursor = state.media.list(
        _auditor(state, key, request), subject_id=subject_id, camera_id=camera_id,
        start=from_, end=to, cursor=cursor, limit=limit,
    )
    return MediaPage(items=[MediaInfo.of(r, thumbs.get(r.id, [])) for r in rows], next_cursor=next_cursor)


_BINARY = {"schema": {"type": "string", "format": "binary"}}
_CONTENT_HEADERS = {
    "ETag": {"required": True, "schema": {"type": "string"}, "description": "The quoted hex SHA-256 of the content"},
    "Accept-Ranges": {"required": True, "schema": {"type": "string", "enum": ["bytes"]}},
    "Content-Length": {"required": True, "schema": {"type": "integer", "minimum": 0}},
}
_STREAM = {
    200: {"content": {"image/*": _BINARY, "video/*": _BINARY}, "headers": _CONTENT_HEADERS},
    206: {"description": "Partial content (Range)", "content": {"image/*": _BINARY, "video/*": _BINARY},
          "headers": {**_CONTENT_HEADERS, "Content-Range": {"required": True, "schema": {"type": "string"}}}},
    **problems(410, 416),
}


@router.get("/{media_id}", response_class=StreamingResponse, responses=_STREAM,  # type: ignore[dict-item]
            summary="Download decrypted content (supports a single HTTP Range)")
def download_media(
    media_id: uuid.UUID,
    request: Request,
    key: MediaKey,
    state: StateDep,
    range_: Annotated[str | None, Header(alias="range")] = None,
) -> StreamingResponse:
    dl = state.media.download(media_id, range_, _auditor(state, key, request))
    return StreamingResponse(dl.body, status_code=dl.status, media_type=dl.row.content_type, headers=dl.headers)


@router.get("/{media_id}/thumbnail", response_class=StreamingResponse,
            responses={200: {"content": {"image/webp": _BINARY}, "headers": _CONTENT_HEADERS}, **problems(410)},
            summary="Download a WebP thumbnail")
def download_thumbnail(
    media_id: uuid.UUID,
    request: Request,
    key: MediaKey,
    state: StateDep,
    size: Annotated[int, Query(description="Longest side in pixels: 128 or 256",
                               json_schema_extra={"enum": [128, 256]})] = 256,
) -> StreamingResponse:
    dl = state.media.thumbnail(media_id, size, _auditor(state, key, request))
    return StreamingResponse(dl.body, status_code=dl.status, media_type=dl.row.content_type, headers=dl.headers)


@router.delete("/{media_id}", status_code=status.HTTP_204_NO_CONTENT, responses=problems(409),
               summary="Delete media, its thumbnails and every stored object version")
def delete_media(media_id: uuid.UUID, request: Request, key: MediaKey, state: StateDep) -> Response:
    state.media.delete(media_id, _auditor(state, key, request))
    return Response(status_code=status.HTTP_204_NO_CONTENT)


def _auditor(state: AppState, key: ApiKey, request: Request) -> AuditHook:
    trail = state.audit
    request_id = getattr(request.state, "request_id", None)

    def record(conn: Any, action: str, subject_id: uuid.UUID | None, object_id: str | None,
               details: dict[str, Any]) -> None:
        trail.record(conn, AuditEvent(action=action, actor=key.actor, subject_id=subject_id, object_id=object_id,
                                      request_id=request_id, details=details))

    return record


def _once(pairs: list[tuple[str, Any]], what: str) -> None:
    """A parameter repeated in one source is ambiguous (which one wins?): 422 instead of the last silently."""
    names = [k for k, _ in pairs]
    repeated = sorted({k for k in names if names.count(k) > 1 and k in _UploadFields.model_fields})
    if repeated:
        raise errors.Unprocessable(f"{what} given more than once: {', '.join(repeated)}")


def _form_fields(form: FormData, query: dict[str, Any]) -> dict[str, str]:
    """The form's text fields; one given in the query too is 422 (it used to override the query silently)."""
    pairs = [(k, v) for k, v in form.multi_items() if isinstance(v, str)]
    _once(pairs, "form field")
    both = sorted(k for k, _ in pairs if k in query)
    if both:
        raise errors.Unprocessable(f"{', '.join(both)} given both in the query and in the form; send each once",
                                   conflicting=both)
    return dict(pairs)


def _meta(values: dict[str, Any]) -> UploadMeta:

    try:
        parsed = _UploadFields.model_validate(values)
    except ValidationError as exc:
        raise errors.Unprocessable(
            "upload fields did not validate",
            errors=[{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]} for e in exc.errors()[:10]],
        ) from None
    captured = parsed.captured_at
    if captured is not None and captured.tzinfo is None:
        captured = captured.replace(tzinfo=UTC)  # naive timestamps from cameras are taken as UTC
    return UploadMeta(parsed.subject_id, parsed.camera_id, captured, parsed.kind)


class _BodyReader:
    """Blocking ``read(n)`` over the ASGI body for the worker thread that seals and uploads as bytes arrive."""

    def __init__(self, request: Request) -> None:
        self._chunks = request.stream().__aiter__()
        self._buf = b""
        self._eof = False

    async def _next(self) -> bytes | None:
        try:
            return await self._chunks.__anext__()
        except StopAsyncIteration:
            return None

    def read(self, n: int = -1) -> bytes:
        while not self._buf and not self._eof:
            chunk = anyio.from_thread.run(self._next)
            if chunk is None:
                self._eof = True
            else:
                self._buf = chunk
        if n < 0 or n >= len(self._buf):
            out, self._buf = self._buf, b""
        else:
            out, self._buf = self._buf[:n], self._buf[n:]
        return out
