"""The versioned S3 bucket, through the ``minio`` SDK only (MinIO in production, SeaweedFS locally).

Only sealed bytes pass through here. Timeouts and retries come from the client's urllib3 pool
(``appliance.clients.s3_client``); any transport failure becomes ``StoreUnavailable`` (503), a
missing object ``MediaGone`` (410). Deleting means deleting *every version*, delete markers
included: in a versioned bucket a plain DELETE only hides the data.
"""

from __future__ import annotations

import contextlib
import io
import uuid
from collections.abc import Iterator
from datetime import datetime
from typing import BinaryIO

import urllib3
from minio import Minio
from minio.error import MinioException, S3Error
from minio.versioningconfig import ENABLED, VersioningConfig

from media.errors import MediaGone, StoreUnavailable

__all__ = ["MIN_PART_SIZE", "MediaStore", "object_key", "read_sealed"]

MIN_PART_SIZE = 5 * 1024 * 1024  # S3's floor for every multipart part but the last
READ_CHUNK = 256 * 1024
_MISSING = ("NoSuchKey", "NoSuchVersion", "NoSuchObject")


def object_key(media_id: uuid.UUID, when: datetime) -> str:
    """``captures/YYYY/MM/DD/<media uuid>``: the date of upload and a random id, nothing about the subject."""
    return f"captures/{when:%Y/%m/%d}/{media_id}"


@contextlib.contextmanager
def _store_errors(what: str) -> Iterator[None]:
    try:
        yield
    except S3Error as exc:
        if exc.code in _MISSING:
            raise MediaGone(f"the object for this media is gone ({exc.code})") from None
        raise StoreUnavailable(f"object store refused to {what}: {exc.code}") from exc
    except (urllib3.exceptions.HTTPError, MinioException, ConnectionError, TimeoutError) as exc:
        raise StoreUnavailable(f"object store unavailable while trying to {what}: {type(exc).__name__}") from exc


class MediaStore:
    """One bucket; callers pass object keys from ``object_key`` and sealed bytes or readers."""

    def __init__(self, client: Minio, bucket: str, part_size: int = MIN_PART_SIZE) -> None:
        if part_size < MIN_PART_SIZE:
            raise ValueError(f"part_size must be at least {MIN_PART_SIZE} bytes (S3 multipart floor)")
        self.client = client
        self.bucket = bucket
        self.part_size = part_size

    def ensure_bucket(self) -> None:
        """Create the bucket if needed and turn versioning on (idempotent; run at API start)."""
        with _store_errors("create the media bucket"):
            if not self.client.bucket_exists(self.bucket):
                with contextlib.suppress(S3Error):  # another worker created it first
                    self.client.make_bucket(self.bucket)
            if self.client.get_bucket_versioning(self.bucket).status != ENABLED:
                self.client.set_bucket_versioning(self.bucket, VersioningConfig(ENABLED))

    def put_bytes(self, key: str, sealed: bytes) -> str | None:
        """Upload a small sealed object in one PUT; returns the version id."""
        with _store_errors("store an object"):
            result = self.client.put_object(self.bucket, key, io.BytesIO(sealed), len(sealed))
        return result.version_id

    def put_stream(self, key: str, reader: BinaryIO, length: int | None = None) -> str | None:
        """Upload a sealed stream (exact ``length`` if known) as multipart parts of ``part_size``, one at a time.

        One part in flight keeps memory at about one part (the SDK's parallel mode queues parts without
        bound); a failure aborts the multipart upload, so no partial object becomes visible. Errors
        raised by ``reader`` (size cap, client gone) pass through unchanged.
        """
        with _store_errors("store a multipart object"):
            result = self.client.put_object(
                self.bucket, key, reader, -1 if length is None else length, part_size=self.part_size,
                num_parallel_uploads=1,
            )
        return result.version_id

    def get(self, key: str, offset: int = 0, length: int = 0) -> Iterator[bytes]:
        """Yield the object's bytes (or ``length`` bytes from ``offset``) in bounded chunks."""
        with _store_errors("read an object"):
            response = self.client.get_object(self.bucket, key, offset=offset, length=length)
            try:
                yield from response.stream(READ_CHUNK)
            finally:
                response.close()
                response.release_conn()

    def read(self, key: str, offset: int = 0, length: int = 0) -> bytes:
        return b"".join(self.get(key, offset, length))

    def list_keys(self, prefix: str) -> Iterator[tuple[str, datetime | None]]:
        """(key, last modified) of the current objects under ``prefix``, listed lazily page by page."""
        with _store_errors("list objects"):
            for o in self.client.list_objects(self.bucket, prefix=prefix, recursive=True):
                yield o.object_name, o.last_modified

    def versions(self, key: str) -> list[str | None]:
        """Version ids (delete markers included) stored under exactly ``key``."""
        with _store_errors("list object versions"):
            return [
                o.version_id
                for o in self.client.list_objects(self.bucket, prefix=key, include_version=True)
                if o.object_name == key
            ]

    def remove_all_versions(self, key: str) -> int:
        """Permanently delete every version of ``key``; returns how many went. Idempotent."""
        removed = 0
        for version_id in self.versions(key):
            with _store_errors("delete an object version"):
                self.client.remove_object(self.bucket, key, version_id=version_id)
            removed += 1
        return removed


def read_sealed(
    store: MediaStore, key: str | None, inline: bytes | None, offset: int = 0, length: int = 0
) -> Iterator[bytes]:
    """A media row's sealed bytes (``length`` of them from ``offset``; 0: to the end), wherever they live.

    Thumbnails carry theirs in the row (``inline``, migration 0005); everything else, and thumbnails
    written before that, is an object in the bucket under ``key``.
    """
    if inline is not None:
        return iter((inline[offset : offset + length] if length else inline[offset:],))
    if key is None:
        raise MediaGone("this media row has neither an object nor inline content")
    return store.get(key, offset, length)
