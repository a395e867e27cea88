"""The record format: the hand-formatted hash equals the verifier's generic one; details are sanitised."""

from __future__ import annotations

import itertools
import uuid
from datetime import UTC, datetime, timedelta, timezone

import pytest

from appliance.audit import AuditEvent
from appliance.audit.chain import (
    BLOCK_COLUMNS,
    BLOCK_MAX,
    COPY_COLUMNS,
    ChainHead,
    append,
    block_rows,
    canonical_json,
    header_hash,
    header_of,
    sanitize_details,
    ts_text,
    unpack_block,
    unpack_bytes,
)

EVENTS = [
    AuditEvent("match", "apikey:x", outcome="match", subject_id=uuid.uuid4(), request_id="r1",
               details={"model": "dlib-resnet-v1", "k": 5, "similarity": 0.9312}),
    AuditEvent('a"ü\n\t\\', "x\\y\u2028\r", object_id="o\x00b\tj\\N", request_id="\\N",
               details={"é": "\u00e9\n", "n": [1, 2.5, None, True], "d": {"z": 1, "a": "b\\"}}),
    AuditEvent("subject.read", "cli:root"),
]


@pytest.mark.parametrize("event", EVENTS)
def test_the_hand_formatted_hash_equals_the_verifiers_hash(event: AuditEvent) -> None:
    head = ChainHead('w:h"ost:1:ab:audit', "audit", 41, b"\x07" * 32)
    rec = append(head, event)
    exported = rec.exported()
    details, _ = sanitize_details(event.details)
    assert header_hash(header_of(exported)).hex() == exported["hash"]
    assert rec.details_json == canonical_json(details).decode()
    assert rec.body_json.encode() == canonical_json({k: exported[k] for k in ("actor", "details", "object_id",
                                                                              "request_id", "subject_id")})
    assert (exported["seq"], exported["prev_hash"]) == (42, "07" * 32)
    assert (head.seq, head.hash) == (42, rec.hash)
    assert "\x00" not in (exported["object_id"] or "")


@pytest.mark.parametrize("event", EVENTS)
def test_a_plain_row_holds_exactly_what_was_hashed(event: AuditEvent) -> None:
    rec = append(ChainHead("w:h\tost:1:ab:audit", "audit"), event)
    row = dict(zip(COPY_COLUMNS.split(", "), rec.row(), strict=True))
    exported = rec.exported()
    assert ts_text(row["ts"]) == exported["ts"] and row["details"] == rec.details_json
    assert (row["prev_hash"].hex(), row["hash"].hex()) == (exported["prev_hash"], exported["hash"])
    for column in ("chain", "seq", "class", "actor", "action", "object_id", "outcome", "request_id"):
        assert row[column] == exported[column]
    assert (None if row["subject_id"] is None else str(row["subject_id"])) == exported["subject_id"]


def test_append_links_records_and_keeps_time_monotonic() -> None:
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
    recs = [append(heads["match" if e.action == "match" else "audit"], e, lambda a, keys: redacted.append(keys))
            for e in events]
    blocks = block_rows([r for r in recs if r.cls == "match"])
    assert redacted == [["token"]] and len(blocks) == 1 and b"apl_0123" not in unpack_bytes(blocks[0][12])
    records = [r.exported() for r in recs if r.cls == "audit"]
    records += unpack_block(dict(zip(BLOCK_COLUMNS.split(", "), blocks[0], strict=True)))
    prev = {"audit": "00" * 32, "match": "00" * 32}
    last_ts = {"audit": "", "match": ""}
    for n, rec in enumerate(records):
        assert rec["prev_hash"] == prev[rec["class"]], n
        assert header_hash(header_of(rec)).hex() == rec["hash"], n
        assert rec["ts"] >= last_ts[rec["class"]] and rec["ts"].endswith("+00:00"), n
        prev[rec["class"]], last_ts[rec["class"]] = rec["hash"], rec["ts"]
    assert sorted((h.cls, h.seq, h.hash.hex()) for h in heads.values()) == [("audit", 1, prev["audit"]),
                                                                            ("match", 3, prev["match"])]
    assert last_ts["match"] == ts_text(events[3].ts.replace(tzinfo=UTC))


def test_match_blocks_split_at_block_size_and_month_ends() -> None:
    """A block row never holds more than BLOCK_MAX records nor two calendar months (retention drops
    months); its columns describe its records (seq and hash of the last, prev of the first)."""
    head = ChainHead("w:h:1:ab:match", "match", 7, b"\x05" * 32)
    month_end = datetime(2026, 12, 1, tzinfo=UTC)
    times = [month_end - timedelta(seconds=5)] * 3 + [month_end + timedelta(microseconds=i) for i in range(2500)]
    recs = [append(head, AuditEvent("match", "apikey:x", outcome="unknown", ts=t, details={"i": i}))
            for i, t in enumerate(times)]
    rows = [dict(zip(BLOCK_COLUMNS.split(", "), b, strict=True)) for b in block_rows(recs)]
    assert [r["events"] for r in rows] == [3, BLOCK_MAX, BLOCK_MAX, 500]
    assert rows[0]["ts"] < month_end <= rows[1]["first_ts"]
    records = [rec for r in rows for rec in unpack_block(r)]
    assert [r["seq"] for r in records] == list(range(8, 8 + 2503))
    assert [r["details"]["i"] for r in records] == list(range(2503))
    assert records[0]["prev_hash"] == "05" * 32
    for prev, rec in itertools.pairwise(records):
        assert rec["prev_hash"] == prev["hash"]
    for r in rows:
        recs_of_row = unpack_block(r)
        assert (r["seq"], r["hash"].hex(), r["prev_hash"].hex()) == (recs_of_row[-1]["seq"], recs_of_row[-1]["hash"],
                                                                      recs_of_row[0]["prev_hash"])
        assert all(header_hash(header_of(rec)).hex() == rec["hash"] for rec in recs_of_row)
    assert (head.seq, head.hash.hex()) == (2510, records[-1]["hash"])


def test_a_damaged_block_is_reported_not_half_read() -> None:
    head = ChainHead("w:h:1:ab:match", "match")
    recs = [append(head, AuditEvent("match", "apikey:x")) for _ in range(3)]
    row = dict(zip(BLOCK_COLUMNS.split(", "), block_rows(recs)[0], strict=True))
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
