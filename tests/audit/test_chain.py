"""The record format: the hand-built hot-path hash equals the verifier's generic one; details are sanitised."""

from __future__ import annotations

import itertools
import json
import re
import uuid
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone

import pytest

from appliance.audit import AuditEvent
from appliance.audit.chain import (
    BLOCK_COLUMNS,
    BLOCK_MAX,
    ChainHead,
    build_record,
    canonical_json,
    event_tuple,
    format_copy_batch,
    header_hash,
    header_of,
    sanitize_details,
    ts_text,
    unpack_block,
    unpack_bytes,
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


def _decode_copy_line(line: str) -> list[str | None]:
    assert line.endswith("\n") and line.count("\n") == 1
    escapes = {"t": "\t", "n": "\n", "r": "\r", "\\": "\\"}
    fields = [None if f == "\\N" else f for f in line[:-1].split("\t")]
    assert len(fields) == 13
    texts = [None if f is None else re.sub(r"\\(.)", lambda m: escapes[m.group(1)], f) for f in fields[:11]]
    return texts + fields[11:]


@pytest.mark.parametrize("event", EVENTS)
def test_copy_batch_line_carries_the_same_record_and_hash(event: AuditEvent) -> None:
    details, _ = sanitize_details(event.details)
    ts = datetime.now(UTC)
    head = ChainHead("w:h\tost:1:ab:audit", "audit")
    head.seq, head.hash = 41, b"\x07" * 32
    rec, details_json = build_record(event, head.name, 42, ts, "audit", details, b"\x07" * 32)
    out = format_copy_batch([event_tuple(replace(event, ts=ts))], {"audit": head}, frozenset())
    heads = list(out.heads.values())
    assert heads == [(head, 42, bytes.fromhex(rec["hash"]), ts)] and (head.seq, head.hash.hex()) == (42, rec["hash"])
    decoded = _decode_copy_line(out.lines[0])
    assert decoded[:11] == [rec["ts"], rec["chain"], "42", "audit", rec["actor"], rec["action"], rec["subject_id"],
                            rec["object_id"], rec["outcome"], rec["request_id"], details_json]
    assert decoded[11:] == ["\\\\x" + "07" * 32, "\\\\x" + rec["hash"]]


def test_copy_batch_chains_each_class_and_keeps_time_monotonic() -> None:
    """Consecutive records link by ``prev``; a late or non-UTC timestamp never moves a chain back in time;
    details in any key order, unsorted or with secrets, hash as the verifier expects."""
    heads = {c: ChainHead(f"w:h:1:ab:{c}", c) for c in ("audit", "match")}
    now = datetime.now(UTC)
    events = [
        AuditEvent("match", "apikey:x", outcome="unknown", ts=now,
                   details={"similarity": 0.5, "k": 5, "camera_id": "door", "track_id": None}),
        AuditEvent("subject.read", "cli:root", subject_id=uuid.uuid4(),
                   ts=now.astimezone(timezone(timedelta(hours=5)))),
        AuditEvent("match", "apikey:x", outcome="match", subject_id=uuid.uuid4(), ts=now - timedelta(seconds=3),
                   details={"a": 1, "z": 0.0, "token": "apl_0123456789_secret"}),
        AuditEvent("match", "apikey:x", ts=(now + timedelta(seconds=1)).replace(tzinfo=None), details={"b": True}),
    ]
    redacted: list[list[str]] = []
    out = format_copy_batch(map(event_tuple, events), heads, frozenset({"match"}),
                            lambda action, keys: redacted.append(keys))
    blocks = out.blocks()
    assert redacted == [["token"]] and "apl_0123" not in "".join(out.lines)
    assert len(out.lines) == 1 and len(blocks) == 1 and b"apl_0123" not in unpack_bytes(blocks[0][12])
    records = []
    for line in out.lines:
        f = _decode_copy_line(line)
        records.append({"ts": f[0], "chain": f[1], "seq": int(f[2]), "class": f[3], "actor": f[4], "action": f[5],
                        "subject_id": f[6], "object_id": f[7], "outcome": f[8], "request_id": f[9],
                        "details": json.loads(f[10]), "prev_hash": f[11][3:], "hash": f[12][3:]})
    records += unpack_block(dict(zip(BLOCK_COLUMNS.split(", "), blocks[0], strict=True)))
    prev = {"audit": "00" * 32, "match": "00" * 32}
    last_ts = {"audit": "", "match": ""}
    for n, rec in enumerate(records):
        assert rec["prev_hash"] == prev[rec["class"]], n
        assert header_hash(header_of(rec)).hex() == rec["hash"], n
        assert rec["ts"] >= last_ts[rec["class"]] and rec["ts"].endswith("+00:00"), n
        prev[rec["class"]], last_ts[rec["class"]] = rec["hash"], rec["ts"]
    moved = list(out.heads.values())
    assert sorted((h[0].cls, h[1], h[2].hex()) for h in moved) == [("audit", 1, prev["audit"]),
                                                                    ("match", 3, prev["match"])]
    assert last_ts["match"] == ts_text(events[3].ts.replace(tzinfo=UTC))


def test_match_blocks_split_at_block_size_and_month_ends() -> None:
    """A block row never holds more than BLOCK_MAX records nor two calendar months (retention drops
    months); its columns describe its records (seq and hash of the last, prev of the first)."""
    head = ChainHead("w:h:1:ab:match", "match")
    head.seq, head.hash = 7, b"\x05" * 32
    month_end = datetime(2026, 12, 1, tzinfo=UTC)
    times = [month_end - timedelta(seconds=5)] * 3 + [month_end + timedelta(microseconds=i) for i in range(2500)]
    events = [AuditEvent("match", "apikey:x", outcome="unknown", ts=t, details={"i": i}) for i, t in enumerate(times)]
    out = format_copy_batch(map(event_tuple, events), {"match": head, "audit": ChainHead("a", "audit")},
                            frozenset({"match"}))
    rows = [dict(zip(BLOCK_COLUMNS.split(", "), b, strict=True)) for b in out.blocks()]
    assert [r["events"] for r in rows] == [3, BLOCK_MAX, BLOCK_MAX, 500]
    assert rows[0]["ts"] < month_end <= rows[1]["first_ts"]
    records = [rec for r in rows for rec in unpack_block(r)]
    assert [r["seq"] for r in records] == list(range(8, 8 + 2503))
    assert [r["details"]["i"] for r in records] == list(range(2503))
    assert records[0]["prev_hash"] == "05" * 32
    for prev, rec in itertools.pairwise(records):
        assert rec["prev_hash"] == prev["hash"]
    for r in rows:
        recs = unpack_block(r)
        assert (r["seq"], r["hash"].hex(), r["prev_hash"].hex()) == (recs[-1]["seq"], recs[-1]["hash"],
                                                                      recs[0]["prev_hash"])
        assert all(header_hash(header_of(rec)).hex() == rec["hash"] for rec in recs)
    assert (head.seq, head.hash.hex()) == (2510, records[-1]["hash"])


def test_a_damaged_block_is_reported_not_half_read() -> None:
    head = ChainHead("w:h:1:ab:match", "match")
    out = format_copy_batch([event_tuple(AuditEvent("match", "apikey:x"))] * 3, {"match": head}, frozenset({"match"}))
    row = dict(zip(BLOCK_COLUMNS.split(", "), out.blocks()[0], strict=True))
    with pytest.raises(ValueError, match="damaged"):
        unpack_block({**row, "hashes": row["hashes"][:-32]})


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
