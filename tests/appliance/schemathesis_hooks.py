"""schemathesis hooks for the contract run (``schemathesis.toml``): how to put NDJSON on the wire."""

from __future__ import annotations

import json
from typing import Any

import schemathesis


@schemathesis.serializer("application/x-ndjson", "application/jsonl")
def ndjson(ctx: Any, value: Any) -> bytes:
    """The bulk body is documented as an array of lines; on the wire it is one JSON document a line."""
    items = value if isinstance(value, list) else [value]
    return b"".join(json.dumps(item).encode() + b"\n" for item in items)
