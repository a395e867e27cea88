"""The record format and hash chain, shared by the writers, the exporter and the offline verifier.

A record's hash covers a small *header* that embeds a digest of its *body*:

    body   = {actor, subject_id, object_id, request_id, details}
    header = {v, chain, seq, ts, class, action, outcome, subj = SHA-256(subject_id), body = SHA-256(body), prev}
    hash   = SHA-256(canonical JSON of header)

so a filtered export can replace a record it leaves out by its header alone (a *stub*): the chain
still verifies, the stub proves the omitted record did not match the filter, and it reveals no
actor, object or details of anyone else. Canonical JSON: keys sorted, no spaces, UTF-8.

Invariants (kept by ``append``, the only function that extends a chain): within one chain ``seq``
runs 1, 2, 3, … without gaps, ``prev`` is the previous record's hash (32 zero bytes before seq 1),
and ``ts`` never decreases with ``seq`` — so a time window or a dropped monthly partition cuts each
chain into whole segments.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import uuid
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from json.encoder import c_make_encoder, encode_basestring  # type: ignore[attr-defined]
from typing import Any

import zstandard

from appliance.audit import AuditEvent

FORMAT_VERSION = 1
ZERO_HASH = bytes(32)
MATCH_CLASS, AUDIT_CLASS = "match", "audit"
MATCH_ACTIONS = frozenset({"match", "match.batch"})  # kept under the shorter match retention
MAX_DETAILS_BYTES = 4096
MAX_STRING = 1024
VECTOR_LIKE_LEN = 16  # a list of this many numbers or more is treated as a vector and stripped

# Detail keys that name secrets or biometric vectors; their values never reach the log.
_SENSITIVE_KEY = re.compile(
    r"(^|[_.-])(vectors?|embeddings?|templates?|raw|tokens?|secrets?|passwords?|passwd|deks?|keks?|seeds?|"
    r"wrapped|authorization|bearer|private|apikey|api_key|key|signing_key|credentials?)($|[_.-])",
    re.IGNORECASE,
)
_SAFE_KEYS = frozenset({"key_id", "key_ids", "object_key", "object_keys", "kek_version", "key_version", "api_key_id"})
_TOKEN_VALUE = re.compile(r"(apl_[0-9a-f]{6,}_\S+|hvs\.\S+|s\.[A-Za-z0-9]{20,}|Bearer\s+\S+)")
_ENCODER = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
# The same output for flat, finite details, made once: ``JSONEncoder.encode`` builds a C encoder per call.
_ENCODE_FLAT = c_make_encoder(None, None, encode_basestring, None, ":", ",", True, False, False)


def canonical_json(obj: Any) -> bytes:
    """The one serialisation every hash and signature in the audit trail is computed over."""
    return _ENCODER.encode(obj).encode()


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def ts_text(ts: datetime) -> str:
    """UTC, microsecond precision: exactly what PostgreSQL timestamptz stores and returns."""
    if ts.tzinfo is None:
        ts = ts.replace(tzinfo=UTC)
    return ts.astimezone(UTC).isoformat(timespec="microseconds")


def subject_digest(subject_id: uuid.UUID | str | None) -> str | None:
    if subject_id is None:
        return None
    key = str(subject_id).lower()
    found = _SUBJECT_DIGESTS.get(key)
    if found is None:
        found = sha256_hex(key.encode())
        if len(_SUBJECT_DIGESTS) >= 50_000:  # the same few subjects recur on the match path
            _SUBJECT_DIGESTS.clear()
        _SUBJECT_DIGESTS[key] = found
    return found


_SUBJECT_DIGESTS: dict[str, str] = {}


def action_class(action: str) -> str:
    """Match events live in their own chains and partitions: they are kept for a shorter time."""
    return MATCH_CLASS if action in MATCH_ACTIONS else AUDIT_CLASS


# --- details: small, JSON-round-trip safe, never sensitive ---------------------------------------------


def sanitize_details(details: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Return details safe to store and hash, and the keys removed. Values must survive a JSON round trip unchanged."""
    if not details:
        return {}, []
    if _is_plain(details):
        return details, []  # the common case (a match's flat details): no copy
    removed: list[str] = []
    clean = _clean(details, "", removed, 0)
    if not isinstance(clean, dict):
        clean = {}
    if removed:
        clean["_redacted"] = sorted(set(removed))[:20]
    size = len(canonical_json(clean))
    if size > MAX_DETAILS_BYTES:
        removed.append("*")
        clean = {"_truncated": size}
    return clean, removed


_KEY_OK: dict[str, bool] = {}


def _key_ok(key: Any) -> bool:
    """Cached: is this a str key that is not sensitive? (detail keys repeat, so this stays small)."""
    ok = _KEY_OK.get(key) if type(key) is str else False
    if ok is None:
        ok = "\x00" not in key and len(key) <= 100 and (key.lower() in _SAFE_KEYS or not _SENSITIVE_KEY.search(key))
        if len(_KEY_OK) < 10_000:
            _KEY_OK[key] = ok
    return bool(ok)


def _is_plain(details: dict[str, Any]) -> bool:
    """Flat, short, harmless values under harmless keys: what ``_clean`` would keep as it is. The match
    path's key sets and short texts (models, cameras) recur, so both are remembered (bounded)."""
    keys = tuple(details)
    plain = _PLAIN_KEYS.get(keys)
    if plain is None:
        plain = len(keys) <= 16 and all(_key_ok(k) for k in keys)
        if len(_PLAIN_KEYS) < 1_000:
            _PLAIN_KEYS[keys] = plain
    if not plain:
        return False
    for v in details.values():
        t = type(v)
        if t is str:
            ok = _SAFE_TEXT.get(v)
            if ok is None:
                ok = len(v) <= 200 and "\x00" not in v and not _TOKEN_VALUE.search(v)
                if len(v) <= 64:
                    if len(_SAFE_TEXT) >= 50_000:
                        _SAFE_TEXT.clear()
                    _SAFE_TEXT[v] = ok
            if not ok:
                return False
        elif t is float:
            if not (-1e15 < v < 1e15) or v == 0:  # also true for NaN
                return False
        elif t is not int and t is not bool and v is not None:
            return False
    return True


_PLAIN_KEYS: dict[tuple[str, ...], bool] = {}
_SAFE_TEXT: dict[str, bool] = {}


def _clean(value: Any, path: str, removed: list[str], depth: int) -> Any:
    if depth > 4:
        removed.append(path or "*")
        return None
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            key = str(k).replace("\x00", "")[:100]
            sub = f"{path}.{key}" if path else key
            if key.lower() not in _SAFE_KEYS and _SENSITIVE_KEY.search(key):
                removed.append(sub)
                continue
            cleaned = _clean(v, sub, removed, depth + 1)
            if cleaned is not _DROP:
                out[key] = cleaned
        return out
    if isinstance(value, list | tuple | set | frozenset):
        items = sorted(value, key=str) if isinstance(value, set | frozenset) else list(value)
        if len(items) >= VECTOR_LIKE_LEN and all(isinstance(i, int | float) for i in items):
            removed.append(path or "*")
            return _DROP
        return [c for c in (_clean(i, path, removed, depth + 1) for i in items[:100]) if c is not _DROP]
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            return None
        if value == 0:
            return 0.0  # "-0.0" would not survive every JSON reader
        return value if abs(value) < 1e15 else repr(value)  # readers differ on huge floats; a string is exact
    if isinstance(value, bytes | bytearray | memoryview):
        removed.append(path or "*")  # raw bytes are keys, blobs or vectors: never logged
        return _DROP
    text = value.isoformat() if isinstance(value, datetime) else str(value)
    text = text.replace("\x00", "")
    if _TOKEN_VALUE.search(text):
        removed.append(path or "*")
        return _DROP
    return text[:MAX_STRING]


_DROP = object()


# --- records --------------------------------------------------------------------------------------------


def body_of(rec: dict[str, Any]) -> dict[str, Any]:
    return {
        "actor": rec["actor"],
        "subject_id": rec["subject_id"],
        "object_id": rec["object_id"],
        "request_id": rec["request_id"],
        "details": rec["details"],
    }


def header_of(rec: dict[str, Any]) -> dict[str, Any]:
    """The hashed header of a full record (``rec`` as exported: strings and hex)."""
    return {
        "v": FORMAT_VERSION,
        "chain": rec["chain"],
        "seq": rec["seq"],
        "ts": rec["ts"],
        "class": rec["class"],
        "action": rec["action"],
        "outcome": rec["outcome"],
        "subj": subject_digest(rec["subject_id"]),
        "body": sha256_hex(canonical_json(body_of(rec))),
        "prev": rec["prev_hash"],
    }


def header_hash(header: dict[str, Any]) -> bytes:
    return hashlib.sha256(canonical_json(header)).digest()


class ChainHead:
    """The head of one chain as its single appender sees it; ``append`` moves it."""

    __slots__ = ("cls", "hash", "name", "seq", "ts")

    def __init__(self, name: str, cls: str, seq: int = 0, digest: bytes = ZERO_HASH,
                 ts: datetime = datetime.min.replace(tzinfo=UTC)) -> None:
        self.name, self.cls, self.seq, self.hash, self.ts = name, cls, seq, digest, ts


@dataclass(slots=True)
class Record:
    """One new record: its fields, and the exact canonical texts its hash was computed over."""

    chain: str
    seq: int
    ts: datetime
    ts_s: str
    cls: str
    actor: str
    action: str
    subject_id: str | None
    object_id: str | None
    outcome: str
    request_id: str | None
    details_json: str
    body_json: str
    prev: bytes
    hash: bytes
    subject: uuid.UUID | None = None  # the subject id as a UUID, for a row and a block's subject index
    element: str = ""  # a match record's entry in its block, made here so the writer only joins

    def exported(self) -> dict[str, Any]:
        """The form an export carries (and the verifier recomputes ``hash`` from)."""
        return {"chain": self.chain, "seq": self.seq, "ts": self.ts_s, "class": self.cls, "actor": self.actor,
                "action": self.action, "subject_id": self.subject_id, "object_id": self.object_id,
                "outcome": self.outcome, "request_id": self.request_id, "details": json.loads(self.details_json),
                "prev_hash": self.prev.hex(), "hash": self.hash.hex()}

    def row(self) -> tuple[Any, ...]:
        """The values of a plain ``audit_log`` row, in ``COPY_COLUMNS`` order."""
        subject = self.subject if self.subject is not None or self.subject_id is None else uuid.UUID(self.subject_id)
        return (self.ts, self.chain, self.seq, self.cls, self.actor, self.action, subject, self.object_id,
                self.outcome, self.request_id, self.details_json, self.prev, self.hash)


COPY_COLUMNS = ("ts, chain, seq, class, actor, action, subject_id, object_id, outcome, request_id, details, "
                "prev_hash, hash")
# ``details`` goes as "text": a json value's binary form is its text, so the column keeps the exact bytes
# that were hashed (psycopg's json dumper would encode the str again, as a JSON string).
COPY_TYPES = ["timestamptz", "text", "int8", "text", "text", "text", "uuid", "text", "text", "text", "text",
              "bytea", "bytea"]


def append(head: ChainHead, event: AuditEvent, on_redacted: Callable[[str, list[str]], None] | None = None) -> Record:
    """Hash ``event`` onto ``head``'s chain as its next record and move the head.

    The body and header are formatted by hand in canonical key order (one JSON encode, of the
    details); tests prove the hash equals ``header_hash(header_of(record))``, what the verifier computes.
    """
    details, removed = sanitize_details(event.details or {})
    if removed and on_redacted is not None:
        on_redacted(event.action, removed)
    ts = event.ts if event.ts.tzinfo is not None else event.ts.replace(tzinfo=UTC)
    ts = max(ts, head.ts)  # ts never decreases along a chain
    ts_s = ts.isoformat(timespec="microseconds") if ts.tzinfo is UTC else ts_text(ts)
    actor, actor_js = _word(event.actor, 200)
    action, action_js = _word(event.action, 100)
    outcome, outcome_js = _word(event.outcome, 40)
    subject, subject_js, subj_js = _subject(event.subject_id)
    object_id = None if event.object_id is None else _bounded(event.object_id, MAX_STRING)
    request_id = None if event.request_id is None else _bounded(event.request_id, 100)
    details_json = "".join(_ENCODE_FLAT(details, 0)) if details is event.details else _ENCODER.encode(details)
    body = (f'{{"actor":{actor_js},"details":{details_json},"object_id":{_js(object_id)},'
            f'"request_id":{_js(request_id)},"subject_id":{subject_js}}}')
    seq, prev = head.seq + 1, head.hash
    header = (f'{{"action":{action_js},"body":"{sha256_hex(body.encode())}","chain":{_word(head.name, 200)[1]},'
              f'"class":{_word(head.cls, 40)[1]},"outcome":{outcome_js},"prev":"{prev.hex()}","seq":{seq},'
              f'"subj":{subj_js},"ts":"{ts_s}","v":{FORMAT_VERSION}}}')
    digest = hashlib.sha256(header.encode()).digest()
    head.seq, head.hash, head.ts = seq, digest, ts
    element = f'["{ts_s}",{action_js},{outcome_js},{body}]' if head.cls == MATCH_CLASS else ""
    return Record(head.name, seq, ts, ts_s, head.cls, actor, action, subject, object_id, outcome, request_id,
                  details_json, body, prev, digest, event.subject_id if type(event.subject_id) is uuid.UUID else None,
                  element)


# Actors, actions, outcomes, chain names and subjects recur: their bounded text and JSON are made once.
_WORDS: dict[tuple[str, int], tuple[str, str]] = {}
_SUBJECTS: dict[object, tuple[str | None, str, str]] = {None: (None, "null", "null")}


def _word(value: str, limit: int) -> tuple[str, str]:
    found = _WORDS.get((value, limit))
    if found is None:
        text = _bounded(value, limit)
        found = (text, encode_basestring(text))
        if len(_WORDS) < 10_000:
            _WORDS[(value, limit)] = found
    return found


def _subject(subject: object) -> tuple[str | None, str, str]:
    """A subject id's text, its JSON, and its digest's JSON (the header's ``subj``)."""
    found = _SUBJECTS.get(subject)
    if found is None:
        text = str(subject)
        found = (text, encode_basestring(text), _js(subject_digest(text)))
        if len(_SUBJECTS) >= 50_000:  # the enrolled people a camera sees recur; bounded all the same
            _SUBJECTS.clear()
            _SUBJECTS[None] = (None, "null", "null")
        _SUBJECTS[subject] = found
    return found


def _bounded(value: object, limit: int) -> str:
    text = value if type(value) is str else str(value)
    if len(text) > limit:
        text = text[:limit]
    return text.replace("\x00", "") if "\x00" in text else text


def _js(value: str | None) -> str:
    return "null" if value is None else encode_basestring(value)


# --- match blocks: many match records in one row ------------------------------------------------------
#
# Why: one PostgreSQL row per match event (heap tuple, primary-key and subject-index entries, per-row
# COPY parsing) cost ~20 us of CPU each, more than the match that caused it. The records and their
# hashes are exactly those of single rows; only storage differs: a *block* row holds up to BLOCK_MAX
# consecutive records of one match chain as a zstd-compressed JSON array of ``[ts, action, outcome,
# body]`` (``body`` the record's canonical body text), their 32-byte hashes concatenated, and the
# distinct subject ids (GIN-indexed for access requests). The row's ``seq``/``ts``/``hash`` are its last
# record's, ``prev_hash`` its first record's ``prev``, ``first_ts`` its first record's time. A block
# never spans two calendar months, so dropping a monthly partition still cuts each chain between records.

BLOCK_MAX = 1000
BLOCK_COLUMNS = "ts, first_ts, chain, seq, events, class, actor, action, outcome, details, prev_hash, hash, packed, " \
                "hashes, subjects"
BLOCK_TYPES = ["timestamptz", "timestamptz", "text", "int8", "int4", "text", "text", "text", "text", "text",
               "bytea", "bytea", "bytea", "bytea", "uuid[]"]
BLOCK_ACTOR, BLOCK_ACTION, BLOCK_OUTCOME = "system:audit", "audit.block", "ok"
_ZSTD_LEVEL = 1  # ~14x smaller on match events for ~0.7 us each
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


def block_rows(records: list[Record]) -> list[tuple[Any, ...]]:
    """Consecutive records of one match chain as block rows (BLOCK_COLUMNS order), split at BLOCK_MAX
    and at month ends."""
    out: list[tuple[Any, ...]] = []
    compressor = zstandard.ZstdCompressor(level=_ZSTD_LEVEL)
    start, n = 0, len(records)
    while start < n:
        stop = min(n, start + BLOCK_MAX)
        month_end = _month_end(records[start].ts)
        if records[stop - 1].ts >= month_end:  # rare: the block would cross a month; cut it there
            stop = next(i for i in range(start, stop) if records[i].ts >= month_end)
        group = records[start:stop]
        first, last = group[0], group[-1]
        packed = compressor.compress(("[" + ",".join([r.element for r in group]) + "]").encode())
        subjects = sorted({r.subject for r in group if r.subject is not None})  # UUID order is text order
        out.append((last.ts, first.ts, last.chain, last.seq, len(group), last.cls, BLOCK_ACTOR, BLOCK_ACTION,
                    BLOCK_OUTCOME, "{}", first.prev, last.hash, packed, b"".join([r.hash for r in group]),
                    subjects or None))
        start = stop
    return out


def _month_end(ts: datetime) -> datetime:
    t = ts.astimezone(UTC)
    return datetime(t.year + (t.month == 12), t.month % 12 + 1, 1, tzinfo=UTC)


def unpack_bytes(packed: bytes) -> bytes:
    """A block's JSON text: zstd, or zlib as the first builds of migration 0007 wrote."""
    if packed[:4] == _ZSTD_MAGIC:
        return zstandard.ZstdDecompressor().decompress(packed, max_output_size=64 << 20)
    return zlib.decompress(packed)


def unpack_block(row: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The records of a block row, in the exported form (the verifier recomputes each ``hash``)."""
    elements = json.loads(unpack_bytes(bytes(row["packed"])))
    hashes = bytes(row["hashes"])
    n = int(row["events"])
    if len(elements) != n or len(hashes) != 32 * n:
        raise ValueError(f"audit block {row['chain']}:{row['seq']} is damaged: {n} records announced, "
                         f"{len(elements)} stored with {len(hashes) // 32} hashes")
    first = int(row["seq"]) - n + 1
    prev = bytes(row["prev_hash"]).hex()
    out = []
    for i, (ts, action, outcome, body) in enumerate(elements):
        digest = hashes[32 * i:32 * i + 32].hex()
        out.append({
            "chain": row["chain"], "seq": first + i, "ts": ts, "class": row["class"], "actor": body["actor"],
            "action": action, "subject_id": body["subject_id"], "object_id": body["object_id"], "outcome": outcome,
            "request_id": body["request_id"], "details": body["details"], "prev_hash": prev, "hash": digest,
        })
        prev = digest
    return out


def record_from_row(row: dict[str, Any]) -> dict[str, Any]:
    """A plain database row of audit_log in the exported form (the verifier recomputes ``hash`` from it)."""
    return {
        "chain": row["chain"],
        "seq": int(row["seq"]),
        "ts": ts_text(row["ts"]),
        "class": row["class"],
        "actor": row["actor"],
        "action": row["action"],
        "subject_id": None if row["subject_id"] is None else str(row["subject_id"]),
        "object_id": row["object_id"],
        "outcome": row["outcome"],
        "request_id": row["request_id"],
        "details": row["details"],
        "prev_hash": bytes(row["prev_hash"]).hex(),
        "hash": bytes(row["hash"]).hex(),
    }


def stub_of(rec: dict[str, Any]) -> dict[str, Any]:
    """A record replaced by its header: enough to keep the chain checkable, nothing about its body."""
    return {**header_of(rec), "hash": rec["hash"]}


# --- checkpoints ----------------------------------------------------------------------------------------


def checkpoint_message(cp: dict[str, Any]) -> bytes:
    """What a checkpoint signature covers (``cp`` as exported: hex hash, ISO time)."""
    return canonical_json(
        {
            "type": "appliance-audit-checkpoint",
            "v": FORMAT_VERSION,
            "chain": cp["chain"],
            "seq": cp["seq"],
            "head_hash": cp["head_hash"],
            "count": cp["count"],
            "ts": cp["ts"],
            "kind": cp["kind"],
        }
    )
