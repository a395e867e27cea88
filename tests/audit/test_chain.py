"""The record format: the hand-built hot-path hash equals the verifier's generic one; details are sanitised."""

from __future__ import annotations

import re
import uuid
from datetime import UTC, datetime, timedelta, timezone

import pytest

from appliance.audit import AuditEvent
from appliance.audit.chain import (
    build_record,
    canonical_json,
    copy_line,
    header_hash,
    header_of,
    sanitize_details,
    ts_text,
)


@pytest.mark.parametrize("event", [
    AuditEvent("match", "apikey:x", outcome="match", subject_id=uuid.uuid4(), request_id="r1",
               details={"model": "dlib-resnet-v1", "k": 5, "similarity": 0.9312}),
    AuditEvent('a"ü\n\t\\', "x\\y\u2028", object_id="o\x00bj", details={"é": "\u00e9", "n": [1, 2.5, None, True],
                                                                         "d": {"z": 1, "a": "b"}}),
    AuditEvent("subject.read", "cli:root"),
])
def test_hot_path_hash_equals_the_verifiers_hash(event: AuditEvent) -> None:
    details, _ = sanitize_details(event.details)
    rec, details_json = build_record(event, 'w:h"ost:1:ab:audit', 42, datetime.now(UTC), "audit", details, b"\x07" * 32)
    assert header_hash(header_of(rec)).hex() == rec["hash"]
    assert details_json == canonical_json(details).decode()
    assert "\x00" not in (rec["object_id"] or "")


EVENTS = [
    AuditEvent("match", "apikey:x", outcome="match", subject_id=uuid.uuid4(), request_id="r1",
               details={"model": "dlib-resnet-v1", "k": 5, "similarity": 0.9312}),
    AuditEvent('a"ü\n\t\\', "x\\y\u2028\r", object_id="o\x00b\tj\\N", request_id="\\N",
               details={"é": "\u00e9\n", "n": [1, 2.5, None, True], "d": {"z": 1, "a": "b\\"}}),
    AuditEvent("subject.read", "cli:root"),
]


@pytest.mark.parametrize("event", EVENTS)
def test_copy_line_carries_the_same_record_and_hash(event: AuditEvent) -> None:
    details, _ = sanitize_details(event.details)
    ts = datetime.now(UTC)
    rec, details_json = build_record(event, "w:h\tost:1:ab:audit", 42, ts, "audit", details, b"\x07" * 32)
    digest, line = copy_line(event, "w:h\tost:1:ab:audit", 42, ts, "audit", details, b"\x07" * 32)
    assert digest.hex() == rec["hash"] and line.endswith("\n") and line.count("\n") == 1
    unescape = {"\\N": None}
    fields = [unescape.get(f, f) for f in line[:-1].split("\t")]
    assert len(fields) == 13
    escapes = {"t": "\t", "n": "\n", "r": "\r", "\\": "\\"}
    decoded = [None if f is None else re.sub(r"\\(.)", lambda m: escapes[m.group(1)], f) for f in fields]
    assert decoded[:11] == [rec["ts"], rec["chain"], "42", "audit", rec["actor"], rec["action"], rec["subject_id"],
                            rec["object_id"], rec["outcome"], rec["request_id"], details_json]
    assert fields[11:] == ["\\\\x" + "07" * 32, "\\\\x" + rec["hash"]]


def test_timestamps_are_utc_microseconds_whatever_the_zone() -> None:
    t = datetime(2026, 11, 26, 10, 0, 0, 123, tzinfo=timezone(timedelta(hours=2)))
    assert ts_text(t) == "2026-11-26T08:00:00.000123+00:00"
    assert ts_text(t.replace(tzinfo=None)) == "2026-11-26T10:00:00.000123+00:00"


def test_details_lose_secrets_vectors_and_values_jsonb_would_change() -> None:
    clean, removed = sanitize_details({
        "embedding": [0.1] * 128, "api_key": "x", "password": "p", "key_id": "k-1", "object_keys": ["a/b"],
        "scores": list(range(20)), "nan": float("nan"), "negzero": -0.0, "huge": 1e20, "when": datetime(2026, 1, 1),
        "nested": {"secret": 1, "ok": 2}, "auth": "Bearer abc", "text": "y" * 5000,
    })
    assert clean["key_id"] == "k-1" and clean["object_keys"] == ["a/b"] and clean["nested"] == {"ok": 2}
    assert clean["nan"] is None and clean["negzero"] == 0.0 and clean["huge"] == "1e+20"
    assert clean["when"] == "2026-01-01T00:00:00" and len(clean["text"]) == 1024
    assert {"embedding", "api_key", "password", "scores", "nested.secret", "auth"} <= set(removed)


def test_oversized_details_are_replaced_by_their_size() -> None:
    clean, removed = sanitize_details({f"k{i}": "v" * 500 for i in range(30)})
    assert list(clean) == ["_truncated"] and removed == ["*"]
