"""Upload, read, list and delete media: validation, sealing, the object store and rows, in a safe order.

Write order (the invariant "no row ever references a half-written object"): validate → seal →
upload the object → insert all rows and the audit record in one transaction. If the upload fails,
no row is written (503); if the transaction fails, the uploaded versions are deleted again.
Thumbnails are sealed like any object but travel inside their rows (migration 0005), so an image
costs one S3 PUT, not three. Reads decrypt segment by segment, so memory stays flat for any size
and a Range read fetches only the ciphertext segments covering it.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any, BinaryIO, Protocol

import structlog
from psycopg import Connection
from psycopg_pool import ConnectionPool

from crypto.dek_cache import DekCache
from crypto.errors import AuthenticationError
from crypto.providers.base import KeyProvider
from crypto.stream import HEADER_SIZE, open_range, open_stream, parse_header, sealed_size, segment_span
from media import records
from media.crypt import SEGMENT_SIZE, DekReserve, ObjectDek, media_aad, seal_bytes, seal_chunks, wrap_context
from media.decode_budget import DecodeBudget
from media.errors import (
    MalformedMedia,
    MediaConflict,
    MediaError,
    MediaGone,
    MediaNotFound,
    MediaTooLarge,
)
from media.records import AuditHook, MediaRow
from media.retention import Retention, remove_objects
from media.store import MediaStore, object_key, read_sealed
from media.streams import FullReader, parse_range, primed, read_up_to
from media.thumbs import THUMB_SIZES, THUMB_TYPE, make_thumbnails
from media.validate import CLIP_TYPES, SNIFF_BYTES, check_clip_head, sanitize_image, sniff

__all__ = ["Download", "KeySource", "Limits", "MediaService", "UploadMeta"]

log = structlog.get_logger("media")
MiB = 1024 * 1024
CLIP_READ = 256 * 1024


@dataclass(frozen=True)
class Limits:
    """Per-kind caps (settings ``media_max_image_bytes``, ``media_max_clip_bytes``, ``media_max_image_pixels``)
    and the image decode budget shared by concurrent uploads (``media_decode_budget_bytes``, ``media_decode_wait``)."""

    image_bytes: int = 20 * MiB
    clip_bytes: int = 256 * MiB
    image_pixels: int = 50_000_000
    decode_budget: int = 256 * MiB
    decode_wait: float = 30.0

    @property
    def largest(self) -> int:
        return max(self.image_bytes, self.clip_bytes)


class KeySource(Protocol):
    """The narrow view of the appliance's state this package needs (``media`` never imports ``appliance``):
    the KEK provider and per-subject DEKs (``appliance.subject_keys.SubjectKeys``)."""

    @property
    def keys(self) -> KeyProvider: ...

    @property
    def subject_keys(self) -> Any: ...


@dataclass(frozen=True)
class UploadMeta:
    subject_id: uuid.UUID | None = None
    camera_id: str | None = None
    captured_at: datetime | None = None
    kind: str | None = None  # image | clip | enrolment; None: from the content


@dataclass(frozen=True)
class _NewRows:
    """What every row of one upload shares; ``row`` makes one row sealed under ``key``."""

    kind: str
    subject_id: uuid.UUID | None
    camera_id: str | None
    captured_at: datetime
    expires_at: datetime | None
    now: datetime  # the upload time: names the object key's date folder

    def row(self, key: ObjectDek, **fields: Any) -> MediaRow:
        shared = {"id": key.media_id, "subject_id": self.subject_id, "parent_id": None, "camera_id": self.camera_id,
                  "kind": self.kind, "object_key": None, "content_type": "", "size_bytes": 0, "sha256": b"",
                  "wrapped_dek": key.wrapped, "kek_version": key.kek_version, "captured_at": self.captured_at,
                  "expires_at": self.expires_at}
        return MediaRow(**{**shared, **fields})


@dataclass
class Download:
    row: MediaRow
    status: int
    headers: dict[str, str]
    body: Iterator[bytes]


class MediaService:
    """One per process (``AppState.media``); thread-safe, every call opens its own transaction."""

    def __init__(
        self,
        store: MediaStore,
        pool: ConnectionPool,
        source: KeySource,
        limits: Limits | None = None,
        retention: Retention | None = None,
        dek_cache: DekCache | None = None,
    ) -> None:
        self.store = store
        self.pool = pool
        self.source = source
        self.limits = limits or Limits()
        self.retention = retention or Retention()
        self.dek_cache = dek_cache or DekCache(1000, 60.0)  # clip players issue many Range reads
        self.bucket_ready = False
        self.deks = DekReserve(lambda: self.source.keys)
        # One budget for every upload of the process: N concurrent uploads share one decode peak.
        self.decode_budget = DecodeBudget(self.limits.decode_budget, self.limits.decode_wait)

    def close(self) -> None:
        self.deks.clear()

    def ensure_bucket(self) -> None:
        """Create the versioned bucket once per process (at start, or at the first upload if S3 was down)."""
        if not self.bucket_ready:
            self.store.ensure_bucket()
            self.bucket_ready = True

    # --- upload --------------------------------------------------------------------------
    def upload(
        self, reader: BinaryIO, meta: UploadMeta, audit: AuditHook, length: int | None = None
    ) -> list[MediaRow]:
        """Validate, seal and store; returns the new row then its thumbnail rows.

        ``length`` (the declared body size, if known) lets a clip go up with an exact Content-Length.
        """
        self.ensure_bucket()
        head = read_up_to(reader, SNIFF_BYTES)
        fmt = sniff(head)
        kind = _kind_for(fmt, meta)
        now = datetime.now(UTC)
        captured = meta.captured_at or now
        new = _NewRows(kind, meta.subject_id, meta.camera_id, captured, self.retention.expires_at(kind, captured), now)
        subject_dek = self._subject_dek(meta.subject_id) if meta.subject_id else None
        if fmt in CLIP_TYPES:
            check_clip_head(fmt, head)
            rows = [self._store_clip(new, CLIP_TYPES[fmt], head, reader, subject_dek, length)]
        else:
            rows = self._store_image(new, fmt, head, reader, subject_dek)
        try:
            with self.pool.connection() as conn, conn.transaction():
                if meta.subject_id is not None:
                    self._require_active(conn, meta.subject_id, lock=True)
                records.insert(conn, rows)
                details = {"kind": kind, "size": rows[0].size_bytes, "thumbnails": len(rows) - 1}
                audit(conn, "media.create", rows[0].subject_id, str(rows[0].id), details)
        except BaseException:
            self._discard(rows)
            raise
        return rows

    def _store_image(
        self, new: _NewRows, fmt: str, head: bytes, reader: BinaryIO, subject_dek: bytes | None
    ) -> list[MediaRow]:
        """One PUT for the image; its thumbnails are sealed into their rows (a few KB each)."""
        cap = self.limits.image_bytes
        data = head + read_up_to(reader, cap + 1 - len(head))
        if len(data) > cap:
            raise MediaTooLarge(f"images are capped at {cap} bytes")
        clean = sanitize_image(data, fmt, self.limits.image_pixels, budget=self.decode_budget)
        thumbs = make_thumbnails(clean.preview)  # from the small preview: outside the budget
        key, *thumb_keys = self._keys(1 + len(thumbs), subject_dek)  # after validation: bad input is 4xx, not 503
        where = object_key(key.media_id, new.now)
        image = new.row(key, object_key=where, content_type=clean.content_type, size_bytes=len(clean.data),
                        sha256=hashlib.sha256(clean.data).digest(), width=clean.width, height=clean.height)
        rows = [image]
        for tkey, (size, thumb) in zip(thumb_keys, thumbs.items(), strict=True):
            rows.append(new.row(tkey, kind="thumbnail", parent_id=image.id, content_type=THUMB_TYPE,
                                size_bytes=len(thumb), sha256=hashlib.sha256(thumb).digest(), thumb_size=size,
                                sealed=seal_bytes(tkey.dek, thumb, tkey.media_id, "thumbnail")))
        self.store.put_bytes(where, seal_bytes(key.dek, clean.data, image.id, image.kind))
        return rows

    def _store_clip(
        self, new: _NewRows, content_type: str, head: bytes, reader: BinaryIO, subject_dek: bytes | None,
        length: int | None,
    ) -> MediaRow:
        cap = self.limits.clip_bytes
        if length is not None and length > cap:
            raise MediaTooLarge(f"clips are capped at {cap} bytes")
        (key,) = self._keys(1, subject_dek)
        where = object_key(key.media_id, new.now)
        row = new.row(key, object_key=where, content_type=content_type)
        hasher, size = hashlib.sha256(), 0

        def plaintext() -> Iterator[bytes]:
            nonlocal size
            chunk = head
            while chunk:
                size += len(chunk)
                if size > cap:
                    raise MediaTooLarge(f"clips are capped at {cap} bytes")
                hasher.update(chunk)
                yield chunk
                chunk = reader.read(CLIP_READ)

        sealed = FullReader(seal_chunks(key.dek, plaintext(), row.id, row.kind))
        try:
            self.store.put_stream(where, sealed, None if length is None else sealed_size(length, SEGMENT_SIZE))
        except BaseException as exc:
            self._discard([row])  # an aborted multipart leaves nothing, but a failed "complete" might
            if type(exc) is OSError and length is not None and size != length:
                raise MalformedMedia(f"the body ended after {size} of its declared {length} bytes") from None
            raise
        return replace(row, size_bytes=size, sha256=hasher.digest())

    def _keys(self, count: int, subject_dek: bytes | None) -> list[ObjectDek]:
        """Ids and DEKs for ``count`` new rows: the subject's DEK (nothing wrapped) or reserved per-object DEKs."""
        if subject_dek is not None:
            return [ObjectDek(uuid.uuid4(), subject_dek, None, None) for _ in range(count)]
        return self.deks.take(count)

    def _subject_dek(self, subject_id: uuid.UUID) -> bytes:
        with self.pool.connection() as conn, conn.transaction():
            self._require_active(conn, subject_id, lock=False)
            return self.source.subject_keys.get_or_create(conn, subject_id).dek  # type: ignore[no-any-return]

    @staticmethod
    def _require_active(conn: Connection, subject_id: uuid.UUID, lock: bool) -> None:
        """FOR SHARE at insert: an erasure (which first sets 'erasing') waits for us, then sees our rows."""
        state = records.subject_state(conn, subject_id, lock=lock)
        if state is None:
            raise MediaNotFound(f"no subject {subject_id}")
        if state != "active":
            raise MediaConflict(f"subject {subject_id} is {state}; no new media may reference it")

    def _discard(self, rows: list[MediaRow]) -> None:
        for row in rows:
            if row.object_key is None:
                continue  # in the row: the rolled-back insert took it
            try:
                self.store.remove_all_versions(row.object_key)
            except MediaError:
                # Sealed and unreferenced: unreadable without its row; `retention sweep --orphans` removes it.
                log.warning("media_orphan_left", object_key=row.object_key)

    # --- read ----------------------------------------------------------------------------
    def download(self, media_id: uuid.UUID, range_header: str | None, audit: AuditHook) -> Download:
        with self.pool.connection() as conn, conn.transaction():
            row = records.get(conn, media_id)
            if row is None:
                raise MediaNotFound(f"no media {media_id}")
            span = parse_range(range_header, row.size_bytes)
            dek = self._dek(conn, row)
            details: dict[str, Any] = {"kind": row.kind}
            if span is not None:
                details["range"] = f"{span[0]}-{span[1]}"
            audit(conn, "media.read", row.subject_id, str(row.id), details)
        return self._serve(row, dek, span)

    def thumbnail(self, media_id: uuid.UUID, size: int, audit: AuditHook) -> Download:
        if size not in THUMB_SIZES:
            raise MalformedMedia(f"thumbnail size must be one of {sorted(THUMB_SIZES)}")
        with self.pool.connection() as conn, conn.transaction():
            if records.get(conn, media_id) is None:
                raise MediaNotFound(f"no media {media_id}")
            row = records.thumbnail(conn, media_id, size)
            if row is None:
                raise MediaNotFound(f"media {media_id} has no thumbnail (clips have none)")
            dek = self._dek(conn, row)
            audit(conn, "media.read", row.subject_id, str(media_id), {"kind": "thumbnail", "size": size})
        return self._serve(row, dek, None)

    def _dek(self, conn: Connection, row: MediaRow) -> bytes:
        if row.wrapped_dek is None:
            try:
                return self.source.subject_keys.get(conn, row.subject_id).dek  # type: ignore[no-any-return]
            except LookupError:
                raise MediaGone("the subject's key was destroyed (erased); this media is unreadable") from None
        dek = self.dek_cache.get(row.id)
        if dek is None:
            dek = self.source.keys.unwrap(row.wrapped_dek, wrap_context(row.id))
            self.dek_cache.put(row.id, dek)
        return dek

    def _serve(self, row: MediaRow, dek: bytes, span: tuple[int, int] | None) -> Download:
        aad = media_aad(row.id, row.kind)
        headers = {
            "Accept-Ranges": "bytes",
            "ETag": f'"{row.sha256.hex()}"',
            "Cache-Control": "no-store",
            "X-Content-Type-Options": "nosniff",
        }
        if span is None:
            body = open_stream(dek, read_sealed(self.store, row.object_key, row.sealed), aad)
            headers["Content-Length"] = str(row.size_bytes)
            return Download(row, 200, headers, primed(body))
        first, last = span
        header = b"".join(read_sealed(self.store, row.object_key, row.sealed, 0, HEADER_SIZE))
        try:
            seg = segment_span(first, last + 1, parse_header(header).segment_size, row.size_bytes)
        except AuthenticationError as exc:
            raise MediaError(f"stored object failed authentication: {exc}") from None
        length = seg.cipher_end - seg.cipher_start
        cipher = read_sealed(self.store, row.object_key, row.sealed, seg.cipher_start, length)
        body = open_range(dek, header, cipher, first, last + 1, row.size_bytes, aad)
        headers["Content-Range"] = f"bytes {first}-{last}/{row.size_bytes}"
        headers["Content-Length"] = str(last - first + 1)
        return Download(row, 206, headers, primed(body))

    # --- list and delete -----------------------------------------------------------------
    def list(
        self,
        audit: AuditHook,
        *,
        subject_id: uuid.UUID | None = None,
        camera_id: str | None = None,
        start: datetime | None = None,
        end: datetime | None = None,
        cursor: str | None = None,
        limit: int = 100,
    ) -> tuple[list[MediaRow], dict[uuid.UUID, list[int]], str | None]:
        """One page of metadata (no thumbnails as items) and the cursor of the next page, if any."""
        after = records.decode_cursor(cursor) if cursor else None
        with self.pool.connection() as conn, conn.transaction():
            rows = records.page(conn, subject_id=subject_id, camera_id=camera_id, start=start, end=end,
                                after=after, limit=limit + 1)
            more, rows = len(rows) > limit, rows[:limit]
            thumbs = records.thumb_sizes(conn, [r.id for r in rows])
            filters = {k: str(v) for k, v in (("camera_id", camera_id), ("from", start), ("to", end)) if v}
            audit(conn, "media.list", subject_id, None, {**filters, "count": len(rows)})
        next_cursor = records.encode_cursor(rows[-1]) if more and rows else None
        return rows, thumbs, next_cursor

    def delete(self, media_id: uuid.UUID, audit: AuditHook) -> list[str]:
        """Delete every version of the object and its thumbnails, then the rows; re-runnable if it fails midway."""
        with self.pool.connection() as conn, conn.transaction():
            rows = records.with_thumbnails(conn, [media_id], lock=True)
            parent = next((r for r in rows if r.id == media_id), None)
            if parent is None:
                raise MediaNotFound(f"no media {media_id}")
            if parent.parent_id is not None:
                raise MediaConflict("thumbnails are deleted with their parent; delete the parent media")
            keys = remove_objects(self.store, rows)
            records.delete_rows(conn, [media_id])
            audit(conn, "media.delete", parent.subject_id, str(media_id), {"kind": parent.kind, "objects": len(keys)})
        for row in rows:
            self.dek_cache.evict(row.id)
        return keys


def _kind_for(fmt: str, meta: UploadMeta) -> str:
    is_clip = fmt in CLIP_TYPES
    kind = meta.kind or ("clip" if is_clip else "image")
    if kind not in ("image", "clip", "enrolment"):
        raise MalformedMedia(f"kind must be image, clip or enrolment, not {kind!r}")
    if (kind == "clip") != is_clip:
        raise MalformedMedia(f"kind {kind!r} does not match the content ({fmt})")
    if kind == "enrolment" and meta.subject_id is None:
        raise MalformedMedia("an enrolment crop must name its subject_id (it is kept until the subject is erased)")
    return kind
