"""One exception hierarchy for ``media``; ``appliance.api.media`` maps each class to problem+json."""

from __future__ import annotations

__all__ = [
    "DecodeBusy",
    "MalformedMedia",
    "MediaConflict",
    "MediaError",
    "MediaGone",
    "MediaNotFound",
    "MediaTooLarge",
    "RangeNotSatisfiable",
    "StoreUnavailable",
    "UnsupportedMedia",
]


class MediaError(Exception):
    """Base class; ``status`` is the HTTP status the API answers with."""

    status = 500


class UnsupportedMedia(MediaError):
    """The content is not one of the accepted formats (judged by its bytes, never by its name)."""

    status = 415


class MalformedMedia(MediaError):
    """The content claims an accepted format but does not decode (truncated, corrupt, wrong kind)."""

    status = 422


class MediaTooLarge(MediaError):
    """Over the per-kind byte cap, or over the pixel cap (decompression-bomb guard)."""

    status = 413


class MediaNotFound(MediaError):
    status = 404


class MediaGone(MediaError):
    """The row exists but its content cannot come back: object deleted or key crypto-shredded."""

    status = 410


class MediaConflict(MediaError):
    """The linked subject is being erased (or was): no new media may reference it."""

    status = 409


class RangeNotSatisfiable(MediaError):
    """The requested byte range lies outside the content."""

    status = 416


class StoreUnavailable(MediaError):
    """The S3 object store is down or too slow; callers retry later."""

    status = 503


class DecodeBusy(MediaError):
    """Other uploads hold the image decode memory budget for too long; callers retry later."""

    status = 503
