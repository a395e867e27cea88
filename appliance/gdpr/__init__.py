"""GDPR duties (DESIGN.md, "GDPR"): provable erasure with signed receipts, and the access export."""

from __future__ import annotations

from appliance.errors import ApplianceError, DependencyUnavailable, NotFound


class GdprError(ApplianceError):
    """Base of this package's errors (mapped to problem+json by the API)."""


class SubjectNotFound(NotFound, GdprError):
    """No subject with this id (never existed)."""


class ErasureNotFound(NotFound, GdprError):
    """No erasure job with this id."""


class ErasureInterrupted(DependencyUnavailable, GdprError):
    """An erasure step failed (a server was down, or a test injected a failure); retrying resumes it."""


# Advisory-lock namespace held (shared) by an access export while it streams, and taken (exclusive)
# by the erasure before it deletes: an erasure never cuts an export in the middle of its zip.
EXPORT_LOCK = 0x45585054  # "EXPT"
