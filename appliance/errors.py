"""The appliance's exception hierarchy; the API maps each to ``application/problem+json`` in one place."""

from __future__ import annotations

from typing import Any


class ApplianceError(Exception):
    """Base of every error the API turns into a problem document."""

    status: int = 500
    title: str = "Internal error"
    type_slug: str = "internal"

    def __init__(self, detail: str = "", **extra: Any) -> None:
        super().__init__(detail or self.title)
        self.detail = detail or self.title
        self.extra = extra


class BadRequest(ApplianceError):
    status, title, type_slug = 400, "Bad request", "bad-request"


class Unauthorized(ApplianceError):
    status, title, type_slug = 401, "Unauthorized", "unauthorized"


class Forbidden(ApplianceError):
    status, title, type_slug = 403, "Forbidden", "forbidden"


class NotFound(ApplianceError):
    status, title, type_slug = 404, "Not found", "not-found"


class Conflict(ApplianceError):
    status, title, type_slug = 409, "Conflict", "conflict"


class Gone(ApplianceError):
    status, title, type_slug = 410, "Gone", "gone"


class PayloadTooLarge(ApplianceError):
    status, title, type_slug = 413, "Payload too large", "payload-too-large"


class UnsupportedMediaType(ApplianceError):
    status, title, type_slug = 415, "Unsupported media type", "unsupported-media-type"


class Unprocessable(ApplianceError):
    status, title, type_slug = 422, "Unprocessable content", "validation"


class DependencyUnavailable(ApplianceError):
    """A backing server (PostgreSQL, Redis, S3, Vault) is down or too slow; retry later."""

    status, title, type_slug = 503, "Service unavailable", "dependency-unavailable"
