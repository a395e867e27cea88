"""The record format and hash chain, shared by the writer, the exporter and the offline verifier.

A record's hash covers a small *header* that embeds a digest of its *body*:

    body   = {actor, subject_id, object_id, request_id, details}
    header = {v, chain, seq, ts, class, action, outcome, subj = SHA-256(subject_id), body = SHA-256(body), prev}
    hash   = SHA-256(canonical JSON of header)

so a filtered export can replace a record it leaves out by its header alone (a *stub*): the chain
still verifies, the stub proves the omitted record did not match the filter, and it reveals no
actor, object or details of anyone else. Canonical JSON: keys sorted, no spaces, UTF-8.

Invariants (kept by ``appliance.audit.log``): within one chain ``seq`` runs 1, 2, 3, … without gaps,
``prev`` is the previous record's hash (32 zero bytes before seq 1), and ``ts`` never decreases
with ``seq`` — so a time window or a dropped monthly partition cuts each chain into whole segments.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import uuid
import zlib
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime, timedelta
from json.encoder import c_make_encoder, encode_basestring  # type: ignore[attr-defined]
from typing import Any

import zstandard

from appliance.audit import AuditEvent

FORMAT_VERSION = 1
ZERO_HASH = bytes(32)
MATCH_CLASS, AUDIT_CLASS = "match", "audit"
DEFAULT_MATCH_ACTIONS = frozenset({"match", "match.batch"})
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


def canonical_json(obj: Any) -> bytes:
    """The one serialisation every hash and signature in the audit trail is computed over."""
    return _ENCODER.encode(obj).encode()


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def ts_text(ts: datetime) -> str:
    """UTC, microsecond precision: exactly what PostgreSQL timestamptz stores and returns."""
    if ts.tzinfo is UTC:
        return ts.isoformat(timespec="microseconds")
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


def action_class(action: str, match_actions: frozenset[str] = DEFAULT_MATCH_ACTIONS) -> str:
    """Match events live in their own chains and partitions: they are kept for a shorter time."""
    return MATCH_CLASS if action in match_actions else AUDIT_CLASS


# --- details: small, JSON-round-trip safe, never sensitive ---------------------------------------------


def sanitize_details(details: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Return details safe to store and hash, and the keys removed. Values must survive a JSON round trip unchanged."""
    if not details:
        return {}, []
    if _is_plain(details):
        return details, []
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
    """The common case: flat, short, harmless values under harmless keys, which need no copy."""
    return len(details) <= 16 and all(_key_ok(k) for k in details) and _plain_values(details)


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


def record_dict(
    event: AuditEvent, chain: str, seq: int, ts: datetime, cls: str, details: dict[str, Any], prev: bytes
) -> dict[str, Any]:
    """The exported (and hashed) form of a new record; ``hash`` is filled in here."""
    return build_record(event, chain, seq, ts, cls, details, prev)[0]


def build_record(
    event: AuditEvent, chain: str, seq: int, ts: datetime, cls: str, details: dict[str, Any], prev: bytes
) -> tuple[dict[str, Any], str]:
    """A new record and its details' canonical JSON, hashed with one general JSON encode.

    The body and header are formatted by hand in canonical key order; tests prove the bytes equal
    ``canonical_json(header_of(rec))``, which is what the verifier computes.
    """
    f = _fields(event)
    ts_s = ts_text(ts)
    details_json = _ENCODER.encode(details)
    digest = _hash(f, chain, seq, ts_s, cls, details_json, prev.hex())
    rec: dict[str, Any] = {
        "chain": chain, "seq": seq, "ts": ts_s, "class": cls, "actor": f[0], "action": f[1], "subject_id": f[2],
        "object_id": f[3], "outcome": f[4], "request_id": f[5], "details": details, "prev_hash": prev.hex(),
        "hash": digest.hex(),
    }
    return rec, details_json


COPY_COLUMNS = ("ts, chain, seq, class, actor, action, subject_id, object_id, outcome, request_id, details, "
                "prev_hash, hash")
_COPY_SPECIAL = re.compile(r"[\\\t\n\r]")
_COPY_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})


class ChainHead:
    """The in-memory head of one writer chain; advanced only by ``format_copy_batch`` on one thread."""

    def __init__(self, name: str, cls: str) -> None:
        self.name, self.cls = name, cls
        self.seq, self.hash, self.ts = 0, ZERO_HASH, datetime.min.replace(tzinfo=UTC)
        self.announced = False
        # as the record header and a COPY line need them, formatted once
        self.name_json, self.cls_json = encode_basestring(name), encode_basestring(cls)
        self.name_needs_escape = bool(_COPY_SPECIAL.search(name))


Head = tuple[ChainHead, int, bytes, datetime]  # a chain's head after a batch: (chain, seq, hash, ts)

# --- match blocks: many match records in one row ------------------------------------------------------
#
# Why: a camera appliance writes tens of thousands of match events per second; one PostgreSQL row per
# event (heap tuple, primary-key and subject-index entries, per-row COPY parsing) cost ~20 us of CPU
# each, more than the match that caused it. The records and their hashes are exactly those of single
# rows; only storage differs: a *block* row holds up to BLOCK_MAX consecutive records of one match chain
# as a zstd-compressed JSON array of ``[ts, action, outcome, body]`` (``body`` the record's canonical
# body text, see the module docstring), their 32-byte hashes concatenated, and the distinct subject ids
# (GIN-indexed for access requests). The row's ``seq``/``ts``/``hash`` are its last record's,
# ``prev_hash`` its first record's ``prev``, ``first_ts`` its first record's time. A block never spans
# two calendar months, so dropping a monthly partition still cuts each chain between records.

BLOCK_MAX = 1000
BLOCK_COLUMNS = "ts, first_ts, chain, seq, events, class, actor, action, outcome, details, prev_hash, hash, packed, " \
                "hashes, subjects"
BLOCK_TYPES = ["timestamptz", "timestamptz", "text", "int8", "int4", "text", "text", "text", "text", "json",
               "bytea", "bytea", "bytea", "bytea", "uuid[]"]
BLOCK_ACTOR, BLOCK_ACTION, BLOCK_OUTCOME = "system:audit", "audit.block", "ok"
# zstd level 1: ~14x smaller on match events for ~0.7 us each (zlib level 1: 9x for ~2.1 us; lz4: 6x, 0.35 us)
_ZSTD_LEVEL = 1
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


class Formatted:
    """One batch as the copier writes it: per-record COPY lines (non-match classes), the match chain's
    new records as block material, and every touched chain's new head."""

    __slots__ = ("digests", "elements", "first_prev", "heads", "lines", "match_chain", "match_seq", "subjects", "times")

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.elements: list[bytes] = []  # one ``[ts, action, outcome, body]`` JSON array per match record
        self.digests = bytearray()  # their hashes, 32 bytes each, in seq order
        self.times: list[int] = []  # their times, us since the epoch
        self.subjects: list[str | None] = []
        self.match_chain: ChainHead | None = None
        self.match_seq = 0  # seq of the first match record here
        self.first_prev = ZERO_HASH  # and its prev
        self.heads: dict[str, Head] = {}

    def __len__(self) -> int:
        return len(self.lines) + len(self.elements)

    def blocks(self) -> list[tuple[Any, ...]]:
        """The match records as block rows (BLOCK_COLUMNS order), split at BLOCK_MAX and at month ends."""
        out: list[tuple[Any, ...]] = []
        chain, times, n = self.match_chain, self.times, len(self.elements)
        if chain is None or not n:
            return out
        compressor = zstandard.ZstdCompressor(level=_ZSTD_LEVEL)  # one per call: copier threads run in parallel
        start = 0
        while start < n:
            stop = min(n, start + BLOCK_MAX)
            month_end = _month_end_micros(times[start])
            if times[stop - 1] >= month_end:  # rare: the block would cross a month; cut it there
                stop = next(i for i in range(start, stop) if times[i] >= month_end)
            first_seq = self.match_seq + start
            prev = self.first_prev if start == 0 else bytes(self.digests[32 * (start - 1):32 * start])
            subjects = _uuids({s for s in self.subjects[start:stop] if s is not None})
            packed = compressor.compress(b"[" + b",".join(self.elements[start:stop]) + b"]")
            out.append((
                _EPOCH + timedelta(microseconds=times[stop - 1]), _EPOCH + timedelta(microseconds=times[start]),
                chain.name, first_seq + (stop - start) - 1, stop - start, chain.cls, BLOCK_ACTOR, BLOCK_ACTION,
                BLOCK_OUTCOME, "{}", prev, bytes(self.digests[32 * (stop - 1):32 * stop]), packed,
                bytes(self.digests[32 * start:32 * stop]), subjects or None,
            ))
            start = stop
        return out


try:  # the compiled match loop (setup.py builds it when a C compiler and OpenSSL's headers are there)
    from appliance.audit import _fastchain as _FAST_MODULE
except ImportError:  # pragma: no cover - depends on the build
    _FAST_MODULE = None
_FAST: Any = _FAST_MODULE


def _uuids(texts: set[str]) -> list[uuid.UUID]:
    """The block's subject index: UUIDs only (a text subject id stays in its record, not in the index)."""
    out = []
    for text in sorted(texts):
        found = _UUID_OF.get(text)
        if found is None:
            try:
                found = uuid.UUID(text)
            except ValueError:
                continue
            if len(_UUID_OF) >= 50_000:  # the enrolled people a camera sees recur; bounded all the same
                _UUID_OF.clear()
            _UUID_OF[text] = found
        out.append(found)
    return out


_UUID_OF: dict[str, uuid.UUID] = {}  # parsing costs ~1 us, and a block names hundreds of subjects


def _month_end_micros(ts: int) -> int:
    t = _EPOCH + timedelta(microseconds=ts)
    nxt = datetime(t.year + (t.month == 12), t.month % 12 + 1, 1, tzinfo=UTC)
    return (nxt - _EPOCH) // _MICROSECOND


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


def format_copy_batch(
    events: Iterable[EventTuple], chains: Mapping[str, ChainHead], match_actions: frozenset[str],
    on_redacted: Callable[[str, list[str]], None] | None = None, into: Formatted | None = None,
) -> Formatted:
    """Hash ``events`` (``event_tuple``s) onto their class's chain, advancing the heads: a COPY text
    line per non-match record, block material per match record (see ``Formatted``), into ``into``.

    The batch writer's hot loop. Match records go through the compiled ``_fastchain`` when it is
    built (the same bytes: tests compare both), else through ``_format_one``; repeated strings
    (actor, action, outcome, chain), detail key sets and timestamps' whole seconds are checked or
    formatted once and cached. Tests prove the hashes equal ``header_hash(header_of(rec))`` of
    ``build_record`` (what the verifier computes).
    """
    out = Formatted() if into is None else into
    events = events if isinstance(events, list) else list(events)
    state: dict[str, list[Any]] = {}
    fast = _FAST if MATCH_CLASS in chains else None
    i, n = 0, len(events)
    while i < n:
        if fast is not None:
            st = state.get(MATCH_CLASS)
            if st is None:
                st = _state(state, chains, MATCH_CLASS, out)
            i = fast.match_run(events, i, match_actions, st, out.elements, out.digests, out.times, out.subjects)
            if i >= n:
                break
        _format_one(events[i], state, chains, match_actions, on_redacted, out)
        i += 1
    for chain, seq, _hex, ts, digest in state.values():
        if seq == chain.seq:
            continue  # set up for the compiled loop, never used
        chain.seq, chain.hash, chain.ts = seq, digest, _EPOCH + timedelta(microseconds=ts)
        out.heads[chain.name] = (chain, seq, digest, chain.ts)
    return out


def _state(state: dict[str, list[Any]], chains: Mapping[str, ChainHead], cls: str, out: Formatted) -> list[Any]:
    """A chain's running head for one batch: [chain, seq, prev hash hex, last time (us), prev hash]."""
    chain = chains[cls]
    st = state[cls] = [chain, chain.seq, chain.hash.hex(), micros(chain.ts), chain.hash]
    if cls == MATCH_CLASS and out.match_chain is None:
        out.match_chain, out.match_seq, out.first_prev = chain, chain.seq + 1, chain.hash
    elif cls == MATCH_CLASS and out.match_chain is not chain:
        raise ValueError("one Formatted holds the match records of one chain")
    return st


def _format_one(event: EventTuple, state: dict[str, list[Any]], chains: Mapping[str, ChainHead],
                match_actions: frozenset[str], on_redacted: Callable[[str, list[str]], None] | None,
                out: Formatted) -> None:
    """One record, in full generality: the reference the compiled loop is tested against."""
    ts, action, actor_value, outcome_value, subject, object_id, request_id, details = event
    cls = MATCH_CLASS if action in match_actions else AUDIT_CLASS
    st = state.get(cls)
    if st is None:
        st = _state(state, chains, cls, out)
    # fields: (bounded text, its JSON, needs COPY escaping) for the repeating ones
    act = _ACTIONS.get(action) or _text(action, 100, _ACTIONS)
    actor = _ACTORS.get(actor_value) or _text(actor_value, 200, _ACTORS)
    outcome = _OUTCOMES.get(outcome_value) or _text(outcome_value, 40, _OUTCOMES)
    if subject is None:
        subj_copy, subj_json, subj_digest = _NULL, "null", "null"
    else:
        subj_copy, subj_json, subj_digest = _SUBJECTS.get(subject) or _subject(subject)
    if request_id is not None and (type(request_id) is not str or len(request_id) > 100 or "\x00" in request_id):
        request_id = _bounded(request_id, 100)
    if object_id is not None and (type(object_id) is not str or len(object_id) > MAX_STRING or "\x00" in object_id):
        object_id = _bounded(object_id, MAX_STRING)
    details_json = _details_json(details, action, on_redacted)
    # ts in us since the epoch, never before the chain's last; "YYYY-MM-DDTHH:MM:SS" cached per second
    if type(ts) is not int:
        ts = micros(ts)
    if ts < st[3]:
        ts = st[3]
    second, micro = divmod(ts, 1_000_000)
    prefix = _SECONDS.get(second)
    if prefix is None:
        prefix = _second_prefix(second)
    ts_s = f"{prefix}.{micro:06d}+00:00"
    seq = st[1] + 1
    prev_hex = st[2]
    request_json = "null" if request_id is None else encode_basestring(request_id)
    object_json = "null" if object_id is None else encode_basestring(object_id)
    body = (f'{{"actor":{actor[1]},"details":{details_json},"object_id":{object_json},'
            f'"request_id":{request_json},"subject_id":{subj_json}}}').encode()
    header = (f'{{"action":{act[1]},"body":"{hashlib.sha256(body).hexdigest()}","chain":{st[0].name_json},'
              f'"class":{st[0].cls_json},"outcome":{outcome[1]},"prev":"{prev_hex}","seq":{seq},"subj":{subj_digest},'
              f'"ts":"{ts_s}","v":{FORMAT_VERSION}}}')
    digest = hashlib.sha256(header.encode()).digest()
    digest_hex = digest.hex()
    if cls == MATCH_CLASS:
        out.elements.append(f'["{ts_s}",{act[1]},{outcome[1]},'.encode() + body + b"]")
        out.digests += digest
        out.times.append(ts)
        out.subjects.append(None if subject is None else subj_copy)
    elif (st[0].name_needs_escape or act[2] or actor[2] or outcome[2] or "\\" in details_json  # JSON escapes the rest
            or (request_id is not None and _COPY_SPECIAL.search(request_id))
            or (object_id is not None and _COPY_SPECIAL.search(object_id))):
        out.lines.append("\t".join((ts_s, _copy_text(st[0].name), str(seq), cls, _copy_text(actor[0]),
                                    _copy_text(act[0]), subj_copy, _copy_text(object_id), _copy_text(outcome[0]),
                                    _copy_text(request_id), _copy_text(details_json), "\\\\x" + prev_hex,
                                    "\\\\x" + digest_hex)) + "\n")
    else:
        out.lines.append(f"{ts_s}\t{st[0].name}\t{seq}\t{cls}\t{actor[0]}\t{act[0]}\t{subj_copy}\t"
                         f"{_NULL if object_id is None else object_id}\t{outcome[0]}\t"
                         f"{_NULL if request_id is None else request_id}\t{details_json}\t"
                         f"\\\\x{prev_hex}\t\\\\x{digest_hex}\n")
    st[1], st[2], st[3], st[4] = seq, digest_hex, ts, digest


# value -> (bounded text, its JSON string, needs COPY escaping), per field (each has its own bound)
_ACTIONS: dict[str, tuple[str, str, bool]] = {}
_ACTORS: dict[str, tuple[str, str, bool]] = {}
_OUTCOMES: dict[str, tuple[str, str, bool]] = {}
_SECONDS: dict[int, str] = {}  # POSIX second -> "YYYY-MM-DDTHH:MM:SS" (UTC)
_SAFE_TEXT: dict[str, bool] = {}  # short detail string -> may be stored as it is
_PLAIN_KEYS: dict[tuple[str, ...], bool] = {}  # detail key tuple -> every key plain and harmless
# canonical_json's encoder, made once: JSONEncoder.encode builds a new C encoder on every call
_ENCODE_FLAT = c_make_encoder(None, None, encode_basestring, None, ":", ",", True, False, False)


def _text(value: object, limit: int, cache: dict[str, tuple[str, str, bool]]) -> tuple[str, str, bool]:
    bounded = _bounded(value, limit)
    found = (bounded, encode_basestring(bounded), bool(_COPY_SPECIAL.search(bounded)))
    if type(value) is str and len(cache) < 10_000:
        cache[value] = found
    return found


# (time as µs since the epoch, action, actor, outcome, subject id (UUID, its int, or text), object id,
# request id, details): plain values, so the API process pickles them to the writer process 2-3x faster
# than datetimes and UUIDs, under its GIL
EventTuple = tuple[int, str, str, str, "uuid.UUID | int | str | None", str | None, str | None, dict[str, Any]]


def event_tuple(e: AuditEvent) -> EventTuple:
    subject = e.subject_id
    return (micros(e.ts), e.action, e.actor, e.outcome, subject.int if type(subject) is uuid.UUID else subject,
            e.object_id, e.request_id, e.details)


def micros(ts: datetime) -> int:
    """Microseconds since the epoch, exactly (a naive time is taken as UTC): how events cross to the writer."""
    return ((ts if ts.tzinfo is not None else ts.replace(tzinfo=UTC)) - _EPOCH) // _MICROSECOND


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)
_SUBJECTS: dict[Any, tuple[str, str, str]] = {}  # subject id (UUID, its int or text) -> text, JSON, digest JSON


def _subject(subject: object) -> tuple[str, str, str]:
    text = str(uuid.UUID(int=subject)) if type(subject) is int else str(subject)
    found = (text, encode_basestring(text), encode_basestring(subject_digest(text) or ""))
    if len(_SUBJECTS) >= 50_000:  # the enrolled people a camera sees recur; bounded all the same
        _SUBJECTS.clear()
    _SUBJECTS[subject] = found
    return found


def _second_prefix(second: int) -> str:
    prefix = (_EPOCH + timedelta(seconds=second)).isoformat()[:19]
    if len(_SECONDS) >= 100_000:
        _SECONDS.clear()
    _SECONDS[second] = prefix
    return prefix


def _details_json(details: dict[str, Any], action: str, on_redacted: Callable[[str, list[str]], None] | None) -> str:
    """Canonical JSON of the event's sanitised details; plain flat details skip the sanitiser's copy."""
    if not details:
        return "{}"
    keys = tuple(details)
    plain = _PLAIN_KEYS.get(keys)
    if plain is None:
        plain = len(keys) <= 16 and all(_key_ok(k) for k in keys)
        if len(_PLAIN_KEYS) < 1_000:
            _PLAIN_KEYS[keys] = plain
    if plain and _plain_values(details):
        return "".join(_ENCODE_FLAT(details, 0))  # flat, finite: no cycle check or NaN handling needed
    clean, removed = sanitize_details(details)
    if removed and on_redacted is not None:
        on_redacted(action, removed)
    return _ENCODER.encode(clean)


def _plain_values(details: dict[str, Any]) -> bool:
    for v in details.values():
        t = type(v)
        if t is str:
            ok = _SAFE_TEXT.get(v)
            if ok is None:
                ok = len(v) <= 200 and "\x00" not in v and not _TOKEN_VALUE.search(v)
                if len(v) <= 64:  # model names and camera ids recur; track ids come and go
                    if len(_SAFE_TEXT) >= 50_000:
                        _SAFE_TEXT.clear()
                    _SAFE_TEXT[v] = ok
            if not ok:
                return False
        elif t is float:
            if not (-1e15 < v < 1e15) or v == 0:  # also false for NaN
                return False
        elif t is not int and t is not bool and v is not None:
            return False
    return True


_NULL = "\\N"


def _copy_text(value: str | None) -> str:
    """A field in COPY text format: NULL as \\N; backslash, tab, newline and CR escaped."""
    if value is None:
        return "\\N"
    return value.translate(_COPY_ESCAPES) if _COPY_SPECIAL.search(value) else value


def _fields(event: AuditEvent) -> tuple[str, str, str | None, str | None, str, str | None]:
    """actor, action, subject_id, object_id, outcome, request_id: bounded, NUL-free text."""
    return (
        _bounded(event.actor, 200),
        _bounded(event.action, 100),
        None if event.subject_id is None else str(event.subject_id),
        None if event.object_id is None else _bounded(event.object_id, MAX_STRING),
        _bounded(event.outcome, 40),
        None if event.request_id is None else _bounded(event.request_id, 100),
    )


def _bounded(value: object, limit: int) -> str:
    text = value if type(value) is str else str(value)
    if len(text) > limit:
        text = text[:limit]
    return text.replace("\x00", "") if "\x00" in text else text


def _hash(f: tuple[str, str, str | None, str | None, str, str | None], chain: str, seq: int, ts_s: str, cls: str,
          details_json: str, prev_hex: str) -> bytes:
    actor, action, subject, object_id, outcome, request_id = f
    body = (f'{{"actor":{_js(actor)},"details":{details_json},"object_id":{_js(object_id)},'
            f'"request_id":{_js(request_id)},"subject_id":{_js(subject)}}}')
    subj = subject_digest(subject)
    header = (f'{{"action":{_js(action)},"body":"{sha256_hex(body.encode())}","chain":{_js(chain)},'
              f'"class":{_js(cls)},"outcome":{_js(outcome)},"prev":"{prev_hex}","seq":{int(seq)},'
              f'"subj":{"null" if subj is None else _js(subj)},"ts":"{ts_s}","v":{FORMAT_VERSION}}}')
    return hashlib.sha256(header.encode()).digest()


def _js(value: str | None) -> str:
    return "null" if value is None else encode_basestring(value)


def record_from_row(row: dict[str, Any]) -> dict[str, Any]:
    """A database row of audit_log in the exported form (the verifier recomputes ``hash`` from it)."""
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


if _FAST is not None:  # the compiled loop reads (never writes) the same caches the Python path fills
    _FAST.setup(_ACTIONS, _ACTORS, _OUTCOMES, _SUBJECTS, _SECONDS, _KEY_OK, _SAFE_TEXT, _ENCODE_FLAT, encode_basestring)
