"""Offline verification of an audit export: no database, only the file and the public key.

Reports OK, or each problem with its line: a record changed (its content no longer hashes to its
hash, or a signed checkpoint disagrees), inserted (a duplicate ``seq`` outside the chain), removed
(a gap in ``seq``), reordered (``seq`` out of order), a chain cut short (a signed checkpoint covers
records that are missing), a chain start without an anchor, or a file cut short (no signed end line).

Only a pinned public key (obtained apart from the file) can say OK: anyone who edits an export can
re-sign it with their own key and embed that key. Without one, the checks run against the embedded key
and the summary says NOT VERIFIED, never OK. The key ids in the header, checkpoints and end line must
name the key that checks them.
Needs only ``cryptography`` and the standard library, so an auditor can read and run it.
"""

from __future__ import annotations

import csv
import hashlib
import io
import itertools
import json
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat, load_pem_public_key

from appliance.audit.chain import ZERO_HASH, checkpoint_message, header_hash, header_of, subject_digest
from appliance.audit.checkpoints import key_fingerprint
from appliance.audit.export import CSV_COLUMNS, EXPORT_FORMAT, end_message

_STUB_FIELDS = ("v", "chain", "seq", "ts", "class", "action", "outcome", "subj", "body", "prev")


@dataclass
class Problem:
    kind: str  # changed | inserted | removed | reordered | truncated | unanchored | signature | format
    message: str
    line: int | None = None

    def __str__(self) -> str:
        return f"line {self.line}: {self.message}" if self.line else self.message


@dataclass
class Report:
    problems: list[Problem] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    records: int = 0
    stubs: int = 0
    checkpoints: int = 0
    chains: int = 0
    pinned: bool = True  # False: checked against the key embedded in the file, which proves no origin
    key_id: str = ""  # the id of the key the signatures were checked against

    @property
    def ok(self) -> bool:
        """No problem found; says nothing about who signed unless ``pinned`` (see ``verified``)."""
        return not self.problems

    @property
    def verified(self) -> bool:
        return self.ok and self.pinned

    def add(self, kind: str, message: str, line: int | None = None) -> None:
        self.problems.append(Problem(kind, message, line))

    def summary(self) -> str:
        if not self.ok:
            return f"FAILED: {len(self.problems)} problem(s)" + ("" if self.pinned else " (and no pinned key)")
        counts = f"{self.records} records, {self.stubs} stubs in {self.chains} chains"
        if not self.pinned:
            return (f"NOT VERIFIED: {counts} are consistent with the key embedded in the file (key id "
                    f"{self.key_id}), but anyone can re-sign an edited export with their own key; pass the "
                    "appliance's public key with --public-key to verify")
        return f"OK: {counts}; {self.checkpoints} signed checkpoints verified with key {self.key_id}"


@dataclass
class _Entry:
    line: int
    obj: dict[str, Any]
    hash: str  # as claimed in the file
    computed: str
    changed: bool = False

    @property
    def seq(self) -> int:
        return int(self.obj["seq"])

    def links_to(self, other: _Entry) -> bool:
        return self.obj["prev"] in (other.hash, other.computed)


def _load_key(pem: bytes | str) -> Ed25519PublicKey:
    key = load_pem_public_key(pem.encode() if isinstance(pem, str) else pem)
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError("the public key is not an Ed25519 key")
    return key


def _key_id(key: Ed25519PublicKey) -> str:
    """The appliance's key id (``key_fingerprint``) of ``key``, whatever the PEM's line endings."""
    return key_fingerprint(key.public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo))


def _valid(key: Ed25519PublicKey, signature_hex: str, message: bytes) -> bool:
    try:
        key.verify(bytes.fromhex(signature_hex), message)
    except (InvalidSignature, ValueError):
        return False
    return True


def _parse(data: bytes, report: Report) -> tuple[list[tuple[int, dict[str, Any]]], int | None]:
    """Objects with their line numbers, and the byte offset where the end line starts (if any)."""
    text = data.decode("utf-8", errors="replace")
    out: list[tuple[int, dict[str, Any]]] = []
    if text.startswith(",".join(CSV_COLUMNS)):
        reader = csv.DictReader(io.StringIO(text))
        for row in reader:
            try:
                obj = json.loads(row.get("json") or "")
            except json.JSONDecodeError:
                report.add("changed", "row's json column is not valid JSON", reader.line_num)
                continue
            for col in CSV_COLUMNS[:-1]:
                want = obj.get(col)
                if (row.get(col) or "") != ("" if want is None else str(want)):
                    report.add("changed", f"column {col!r} differs from the row's signed json", reader.line_num)
            out.append((reader.line_num, obj))
        end_at = text.rfind("\nend,")
        return out, (len(text[: end_at + 1].encode()) if end_at >= 0 else None)
    offset, end_offset = 0, None
    for number, raw in enumerate(data.split(b"\n"), 1):
        if raw.strip():
            try:
                obj = json.loads(raw)
                if not isinstance(obj, dict):
                    raise ValueError("not an object")
            except ValueError:
                report.add("changed", "not a valid JSON object (line altered)", number)
            else:
                if obj.get("type") == "end":
                    end_offset = offset
                out.append((number, obj))
        offset += len(raw) + 1
    return out, end_offset


def verify_export(data: bytes, public_key_pem: bytes | str | None) -> Report:
    """Check every record, link, checkpoint and the end signature of an export; see the module doc.

    ``public_key_pem`` is the pinned key; None checks against the embedded key (``report.pinned`` False).
    Raises ValueError if the pinned key is not an Ed25519 public key.
    """
    report = Report(pinned=public_key_pem is not None)
    key = _load_key(public_key_pem) if public_key_pem is not None else None
    objects, end_offset = _parse(data, report)
    if not objects or objects[0][1].get("type") != "header" or objects[0][1].get("format") != EXPORT_FORMAT:
        report.add("format", "no export header on the first line: not an appliance audit export")
        return report
    header = objects[0][1]
    try:
        embedded: Ed25519PublicKey | None = _load_key(header.get("public_key_pem") or "")
    except ValueError:
        embedded = None
    if key is None:
        if embedded is None:
            report.add("format", "the header embeds no Ed25519 public key and none was pinned")
            return report
        key = embedded
    report.key_id = _key_id(key)
    if embedded is None or _key_id(embedded) != report.key_id or header.get("key_id") != report.key_id:
        report.add("signature", f"the header names signing key {header.get('key_id')!r} and embeds "
                                f"{'a different' if embedded is not None else 'no'} public key; the pinned "
                                f"key is {report.key_id!r} (re-signed by another key?)", objects[0][0])
    filters = header.get("filters") or {}
    entries: dict[str, list[_Entry]] = defaultdict(list)
    checkpoints: dict[str, list[tuple[int, dict[str, Any]]]] = defaultdict(list)
    end: tuple[int, dict[str, Any]] | None = None
    for line, obj in objects[1:]:
        kind = obj.get("type")
        try:
            if kind == "checkpoint":
                _check_checkpoint(key, line, obj, checkpoints, report)
            elif kind in ("record", "stub"):
                entries[obj["chain"]].append(_entry(line, obj, filters, header, report))
            elif kind == "end":
                end = (line, obj)
            else:
                report.add("format", f"unknown line type {kind!r}", line)
        except (KeyError, TypeError, ValueError) as exc:
            report.add("changed", f"malformed {kind} line ({exc.__class__.__name__}: {exc})", line)
    report.chains = len(entries)
    for chain, items in entries.items():
        _check_chain(chain, items, checkpoints.get(chain, []), bool(filters.get("from") or filters.get("to")), report)
    _check_end(data, end_offset, end, objects, key, report)
    return report


def _entry(line: int, obj: dict[str, Any], filters: dict[str, Any], header: dict[str, Any], report: Report) -> _Entry:
    if obj["type"] == "record":
        report.records += 1
        rec = {**obj, "prev_hash": obj["prev_hash"]}
        head = header_of(rec)
        _check_filter_match(line, obj, filters, report)
    else:
        report.stubs += 1
        head = {f: obj[f] for f in _STUB_FIELDS}
        _check_stub_reason(line, obj, filters, header, report)
    computed = header_hash(head).hex()
    entry = _Entry(line, {**head, "reason": obj.get("reason")}, obj["hash"], computed)
    if computed != obj["hash"]:
        entry.changed = True
        report.add("changed", f"record chain {obj['chain']} seq {obj['seq']} was changed: its content does not "
                              "match its hash", line)
    return entry


def _check_filter_match(line: int, obj: dict[str, Any], filters: dict[str, Any], report: Report) -> None:
    if filters.get("action") and obj["action"] != filters["action"]:
        report.add("changed", f"record seq {obj['seq']} does not match the export's action filter", line)
    if filters.get("subject_id") and obj["subject_id"] != filters["subject_id"]:
        report.add("changed", f"record seq {obj['seq']} does not match the export's subject filter", line)


def _check_stub_reason(line: int, obj: dict[str, Any], filters: dict[str, Any], header: dict[str, Any],
                       report: Report) -> None:
    reason = obj.get("reason")
    if reason == "before" and filters.get("from") and not obj["ts"] < filters["from"]:
        report.add("changed", f"stub seq {obj['seq']} claims to precede the window but is inside it", line)
    elif reason == "after" and filters.get("to") and not obj["ts"] >= filters["to"]:
        report.add("changed", f"stub seq {obj['seq']} claims to follow the window but is inside it", line)
    elif reason == "filtered":
        action_ok = not filters.get("action") or obj["action"] == filters["action"]
        subject_ok = not filters.get("subject_id") or obj["subj"] == subject_digest(filters["subject_id"])
        if action_ok and subject_ok:
            report.add("changed", f"record seq {obj['seq']} matches the filter but was exported as a stub", line)
    elif reason not in ("before", "after", "filtered"):
        report.add("format", f"stub with unknown reason {reason!r}", line)


def _check_checkpoint(key: Ed25519PublicKey, line: int, cp: dict[str, Any],
                      checkpoints: dict[str, list[tuple[int, dict[str, Any]]]], report: Report) -> None:
    if not _valid(key, cp["signature"], checkpoint_message(cp)):
        report.add("signature", f"checkpoint of chain {cp['chain']} at seq {cp['seq']} has an invalid signature "
                                f"(changed, or signed by another key: it names key {cp.get('key_id')!r})", line)
        return
    if cp.get("key_id") != report.key_id:
        report.add("signature", f"checkpoint of chain {cp['chain']} at seq {cp['seq']} names signing key "
                                f"{cp.get('key_id')!r}, not {report.key_id!r}", line)
        return
    report.checkpoints += 1
    checkpoints[cp["chain"]].append((line, cp))


def _check_chain(chain: str, items: list[_Entry], cps: list[tuple[int, dict[str, Any]]], windowed: bool,
                 report: Report) -> None:
    for a, b in itertools.pairwise(items):
        if b.seq < a.seq:
            report.add("reordered", f"chain {chain}: record seq {b.seq} (line {b.line}) comes after seq {a.seq} "
                                    f"(line {a.line}): records were reordered", b.line)
    ordered = sorted(items, key=lambda e: e.seq)
    chain_entries: list[_Entry] = []
    i = 0
    while i < len(ordered):
        e = ordered[i]
        same = [x for x in ordered[i:] if x.seq == e.seq]
        if len(same) > 1:  # duplicates: keep the one that fits between its neighbours
            nxt = next((x for x in ordered[i + len(same):] if x.seq == e.seq + 1), None)
            prev = chain_entries[-1] if chain_entries else None
            genuine = next((x for x in same if (nxt is None or nxt.links_to(x)) and (prev is None or x.links_to(prev))
                            and not x.changed), same[0])
            for x in same:
                if x is not genuine:
                    report.add("inserted", f"chain {chain}: record seq {x.seq} at line {x.line} was inserted "
                                           "(a second record with this seq that is not part of the chain)", x.line)
            e = genuine
        i += len(same)
        if chain_entries:
            prev = chain_entries[-1]
            if e.seq > prev.seq + 1:
                missing = f"seq {prev.seq + 1}" + (f"..{e.seq - 1}" if e.seq - 1 > prev.seq + 1 else "")
                report.add("removed", f"chain {chain}: record {missing} removed (between line {prev.line} and "
                                      f"line {e.line})", e.line)
            elif not e.links_to(prev) and not e.changed and not prev.changed:
                report.add("changed", f"chain {chain}: record seq {e.seq} does not link to seq {prev.seq} (line "
                                      f"{prev.line}): one of them was altered or replaced", e.line)
        chain_entries.append(e)
    if not chain_entries:
        return
    first, last = chain_entries[0], chain_entries[-1]
    by_seq = {e.seq: e for e in chain_entries}
    anchored = (first.seq == 1 and first.obj["prev"] == ZERO_HASH.hex()) or (windowed and _is_before_stub(first))
    covered_to = 0
    for line, cp in cps:
        seq = int(cp["seq"])
        if seq == first.seq - 1 and cp["head_hash"] == first.obj["prev"]:
            anchored = True
        elif seq in by_seq and cp["head_hash"] not in (by_seq[seq].hash,) and not by_seq[seq].changed:
            report.add("changed", f"chain {chain}: record seq {seq} (line {by_seq[seq].line}) differs from the "
                                  f"signed checkpoint at line {line}", by_seq[seq].line)
        elif seq > last.seq and not _is_after_stub(last):
            report.add("truncated", f"chain {chain} was cut after seq {last.seq} (line {last.line}): the signed "
                                    f"checkpoint at line {line} covers seq {seq}, {seq - last.seq} record(s) missing",
                       last.line)
        covered_to = max(covered_to, seq)
    if not anchored:
        report.add("unanchored", f"chain {chain}: records before seq {first.seq} (line {first.line}) are missing: "
                                 "no seq 1, no preceding stub and no checkpoint anchors the start", first.line)
    if covered_to < last.seq and not _is_after_stub(last):
        report.warnings.append(f"chain {chain}: {last.seq - covered_to} newest record(s) are not yet covered by a "
                               "signed checkpoint")


def _is_before_stub(e: _Entry) -> bool:
    return e.obj.get("reason") == "before"


def _is_after_stub(e: _Entry) -> bool:
    return e.obj.get("reason") == "after"


def _check_end(data: bytes, end_offset: int | None, end: tuple[int, dict[str, Any]] | None,
               objects: list[tuple[int, dict[str, Any]]], key: Ed25519PublicKey, report: Report) -> None:
    if end is None or end_offset is None:
        last_line = objects[-1][0] if objects else 0
        report.add("truncated", f"the export was cut after line {last_line}: its signed end line is missing")
        return
    line, obj = end
    if objects[-1][1] is not obj:
        report.add("format", "lines follow the end line", line)
    sha = hashlib.sha256(data[:end_offset]).hexdigest()
    if not _valid(key, obj.get("signature", ""), end_message(obj.get("sha256", ""), int(obj.get("lines", -1)))):
        report.add("signature", "the end line's signature is invalid (changed, or signed by another key: it "
                                f"names key {obj.get('key_id')!r})", line)
    elif obj.get("key_id") != report.key_id:
        report.add("signature", f"the end line names signing key {obj.get('key_id')!r}, not {report.key_id!r}", line)
    elif sha != obj.get("sha256"):
        if not report.problems:
            report.add("changed", "the file's bytes differ from what was signed (a line was altered)", line)
    elif int(obj["lines"]) != len(objects) - 1 and not report.problems:
        report.add("format", f"the end line counts {obj['lines']} lines, the file has {len(objects) - 1}", line)
