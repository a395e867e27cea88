"""Validated scalar types for the API's text and time inputs, one definition used by every router.

Why they exist: a NUL byte in ``external_ref`` or ``camera_id`` reached PostgreSQL as a DataError (a
500 and a dropped keep-alive connection), and other control characters end up in logs, CSV exports
and audit JSON. Pydantic's lax ``datetime`` reads a bare number as seconds since 1970, so
``to=6.1e-05`` meant a 1970 date. With these types both are a 422 problem before any work is done.
The JSON Schema says so too: text fields carry a ``pattern`` that excludes control characters.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated, Any

from pydantic import AfterValidator, BeforeValidator, Field

__all__ = ["FORBIDDEN_TEXT", "IsoDatetime", "SafeText", "check_text"]

# C0 controls (NUL, tab, newline …), DEL, C1 controls, and lone surrogates (not encodable as UTF-8).
FORBIDDEN_TEXT = re.compile(r"[\x00-\x1f\x7f-\x9f\ud800-\udfff]")
_ISO_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")


def check_text(value: str) -> str:
    """``value`` unchanged, or ValueError if it holds a control character (the message never echoes it)."""
    if FORBIDDEN_TEXT.search(value):
        raise ValueError("must not contain control characters (NUL, tab, newline, …)")
    return value


def _iso_only(value: Any) -> Any:
    """Refuse what is not an ISO 8601 text before pydantic's lax parsing turns numbers into 1970 dates."""
    if isinstance(value, datetime):
        return value
    if not isinstance(value, str) or not _ISO_DATE.match(value):
        raise ValueError("must be an ISO 8601 date-time such as 2026-01-31T08:00:00Z, not a number")
    return value


# The same rule for readers of openapi.json (ECMA-262 regex; surrogates cannot appear in JSON text).
TEXT_PATTERN = "^[^\\u0000-\\u001f\\u007f-\\u009f]*$"
SafeText = Annotated[str, AfterValidator(check_text), Field(json_schema_extra={"pattern": TEXT_PATTERN})]
IsoDatetime = Annotated[datetime, BeforeValidator(_iso_only)]
