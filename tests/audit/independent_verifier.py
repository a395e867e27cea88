"""An audit-export verifier written from docs/audit.md alone, to prove that page is enough.

It must not import the appliance (or its ``crypto``, ``vector``, ``media`` packages): only the standard
library's hashlib, json, csv, itertools and sys, and ``cryptography`` for Ed25519. Each check names the section
of docs/audit.md it implements.

    python tests/audit/independent_verifier.py EXPORT --public-key PEM [--json]

Exit 0 when every check passes, 1 otherwise.
"""

from __future__ import annotations

import csv
import hashlib
import itertools
import json
import sys

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat, load_pem_public_key

# --- "Canonical JSON", "The record and its hash", "Stubs", "Checkpoints", "The export file" ---------
GENESIS = "0" * 64
BODY_KEYS = ("actor", "details", "object_id", "request_id", "subject_id")
STUB_HEADER_KEYS = ("v", "chain", "seq", "ts", "class", "action", "outcome", "subj", "body", "prev")
CSV_HEADER = "type,chain,seq,ts,action,outcome,subject_id,actor,object_id,request_id,json"
EXPORT_FORMAT = "appliance-audit-export"
CHECKPOINT_TYPE = "appliance-audit-checkpoint"
END_TYPE = "appliance-audit-export-end"


def canonical(obj: object) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def record_header(rec: dict) -> dict:
    subj = None if rec["subject_id"] is None else sha(rec["subject_id"].lower().encode())
    body = {k: rec[k] for k in BODY_KEYS}
    return {"v": 1, "chain": rec["chain"], "seq": rec["seq"], "ts": rec["ts"], "class": rec["class"],
            "action": rec["action"], "outcome": rec["outcome"], "subj": subj, "body": sha(canonical(body)),
            "prev": rec["prev_hash"]}


def checkpoint_message(cp: dict) -> bytes:
    return canonical({"type": CHECKPOINT_TYPE, "v": 1, "chain": cp["chain"], "seq": cp["seq"],
                      "head_hash": cp["head_hash"], "count": cp["count"], "ts": cp["ts"], "kind": cp["kind"]})


def end_message(end: dict) -> bytes:
    return canonical({"type": END_TYPE, "sha256": end["sha256"], "lines": end["lines"]})


# --- "The signing key and its id" ------------------------------------------------------------------------


def key_id(key: Ed25519PublicKey) -> str:
    pem = key.public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo).decode()
    return sha(pem.rstrip("\n").encode())[:16]


def signed(key: Ed25519PublicKey, signature_hex: object, message: bytes) -> bool:
    try:
        key.verify(bytes.fromhex(str(signature_hex)), message)
    except (InvalidSignature, ValueError):
        return False
    return True


# --- reading the file: "JSON Lines" and "CSV" ---------------------------------------------------------


def read_lines(data: bytes, problems: list) -> tuple[list, int | None]:
    """[(line number, object)] and the byte offset where the last line (the end line) starts.

    Every JSONL line and every CSV ``json`` cell must be canonical JSON ("The export file")."""
    out = []
    if data.startswith((CSV_HEADER + "\n").encode()):
        rest = data[len(CSV_HEADER) + 1:].decode("utf-8", errors="replace")
        physical = [line + "\n" for line in rest.split("\n")[:-1]]  # rows end with \n; a cell may hold one
        starts, offset = [], len(CSV_HEADER) + 1
        for line in physical:
            starts.append(offset)
            offset += len(line.encode())
        reader = csv.reader(physical)
        columns = CSV_HEADER.split(",")
        for row in reader:
            number = reader.line_num + 1  # the column-name row is line 1
            try:
                obj = json.loads(row[-1])
                if canonical(obj).decode() != row[-1] or len(row) != len(columns):
                    problems.append((number, "the row is not canonical"))
                for name, cell in zip(columns[:-1], row[:-1], strict=False):  # rule 7
                    value = obj.get(name)
                    if cell != ("" if value is None else str(value)):
                        problems.append((number, f"CSV column {name} differs from the row's json"))
            except (ValueError, AttributeError, IndexError) as exc:
                problems.append((number, f"unreadable row ({exc})"))
                continue
            out.append((number, obj))
        return out, (starts[-1] if starts else None)
    if not data.endswith(b"\n"):
        problems.append((None, "the file does not end with a line feed"))
    offset, end_at = 0, None
    for number, raw in enumerate(data.split(b"\n"), 1):
        if raw:
            end_at = offset
            try:
                obj = json.loads(raw)
                if canonical(obj) != raw:
                    problems.append((number, "the line is not canonical JSON"))
                out.append((number, obj))
            except ValueError as exc:
                problems.append((number, f"not JSON ({exc})"))
        offset += len(raw) + 1
    return out, end_at


# --- "Verifying an export" --------------------------------------------------------------------------------


def verify(data: bytes, pinned_pem: bytes) -> dict:
    """Every check of "Verifying an export"; ``ok`` only if none failed. Counts say what was reproduced."""
    problems: list = []
    counts = {"records": 0, "stubs": 0, "hashes_reproduced": 0, "checkpoints": 0, "checkpoint_signatures": 0,
              "end_signature": 0}
    key = load_pem_public_key(pinned_pem)
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError("the pinned key is not an Ed25519 key")
    kid = key_id(key)
    lines, end_at = read_lines(data, problems)
    chains: dict[str, list] = {}
    checkpoints: dict[str, list] = {}
    end = None
    filters: dict = {}
    for index, (number, obj) in enumerate(lines):
        try:
            kind = obj.get("type")
            if index == 0:
                filters = check_header(number, obj, key, kid, problems)
            elif kind in ("record", "stub"):  # rule 2
                if kind == "record":
                    counts["records"] += 1
                    head = record_header(obj)
                    check_record_filters(number, obj, filters, problems)
                else:
                    counts["stubs"] += 1
                    head = {k: obj[k] for k in STUB_HEADER_KEYS}
                    check_stub_reason(number, obj, filters, problems)
                if sha(canonical(head)) == obj["hash"]:
                    counts["hashes_reproduced"] += 1
                else:
                    problems.append((number, f"{kind} {obj['chain']}#{obj['seq']}: hash does not match its content"))
                chains.setdefault(obj["chain"], []).append((number, head, obj["hash"], obj.get("reason")))
            elif kind == "checkpoint":  # rule 4: the signature
                counts["checkpoints"] += 1
                if not signed(key, obj["signature"], checkpoint_message(obj)):
                    problems.append((number, f"checkpoint {obj['chain']}#{obj['seq']}: bad signature"))
                elif obj.get("key_id") != kid:
                    problems.append((number, f"checkpoint {obj['chain']}#{obj['seq']}: names key {obj.get('key_id')}"))
                else:
                    counts["checkpoint_signatures"] += 1
                    checkpoints.setdefault(obj["chain"], []).append((number, obj))
            elif kind == "end":
                end = (number, obj)
            else:
                problems.append((number, f"unknown line type {kind!r}"))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            problems.append((number, f"malformed line ({type(exc).__name__}: {exc})"))
    if lines and lines[0][1].get("chains") != len(chains):
        problems.append((lines[0][0], f"the header counts {lines[0][1].get('chains')} chains, not {len(chains)}"))
    for name, entries in chains.items():
        check_chain(name, entries, checkpoints.get(name, []), problems)
    check_end(data, end_at, end, lines, key, kid, problems, counts)
    return {"ok": not problems, **counts, "problems": [{"line": n, "message": m} for n, m in problems]}


def check_header(number: int, header: dict, key: Ed25519PublicKey, kid: str, problems: list) -> dict:  # rule 1
    if header.get("type") != "header" or header.get("format") != EXPORT_FORMAT or header.get("v") != 1:
        problems.append((number, "the first line is not an export header"))
        return {}
    embedded = load_pem_public_key(header["public_key_pem"].encode())
    raw = (Encoding.Raw, PublicFormat.Raw)
    if not isinstance(embedded, Ed25519PublicKey) or embedded.public_bytes(*raw) != key.public_bytes(*raw):
        problems.append((number, "the header embeds another key than the pinned one"))
    if header.get("key_id") != kid:
        problems.append((number, f"the header names key {header.get('key_id')}, the pinned key is {kid}"))
    return dict(header["filters"])


def check_record_filters(number: int, rec: dict, filters: dict, problems: list) -> None:  # rule 5
    if filters.get("action") and rec["action"] != filters["action"]:
        problems.append((number, "a full record outside the action filter"))
    if filters.get("subject_id") and rec["subject_id"] != filters["subject_id"]:
        problems.append((number, "a full record outside the subject filter"))


def check_stub_reason(number: int, stub: dict, filters: dict, problems: list) -> None:  # "Stubs", rule 5
    reason = stub.get("reason")
    if reason == "filtered":
        action_differs = bool(filters.get("action")) and stub["action"] != filters["action"]
        wanted = filters.get("subject_id")
        subject_differs = bool(wanted) and stub["subj"] != sha(wanted.lower().encode())
        if not (action_differs or subject_differs):
            problems.append((number, "a stub that matches the filter (a record was hidden)"))
    elif reason == "before":
        if not (filters.get("from") and stub["ts"] < filters["from"]):
            problems.append((number, "a 'before' stub inside the window"))
    elif reason == "after":
        if not (filters.get("to") and stub["ts"] >= filters["to"]):
            problems.append((number, "an 'after' stub inside the window"))
    else:
        problems.append((number, f"a stub with unknown reason {reason!r}"))


def check_chain(name: str, entries: list, cps: list, problems: list) -> None:  # rules 3 and 4
    for (_, a, a_hash, _), (number, b, _, _) in itertools.pairwise(entries):
        if b["seq"] != a["seq"] + 1:
            problems.append((number, f"chain {name}: seq {b['seq']} follows seq {a['seq']}"))
        elif b["prev"] != a_hash:
            problems.append((number, f"chain {name}: seq {b['seq']} does not link to seq {a['seq']}"))
    number, first, _, reason = entries[0]
    anchored = (first["seq"] == 1 and first["prev"] == GENESIS) or reason == "before" or any(
        cp["seq"] == first["seq"] - 1 and cp["head_hash"] == first["prev"] for _, cp in cps)
    if not anchored:
        problems.append((number, f"chain {name}: its first line (seq {first['seq']}) is not anchored"))
    by_seq = {head["seq"]: h for _, head, h, _ in entries}
    last_number, last, _, last_reason = entries[-1]
    for cp_number, cp in cps:
        if cp["seq"] in by_seq and cp["head_hash"] != by_seq[cp["seq"]]:
            problems.append((cp_number, f"chain {name}: seq {cp['seq']} differs from its signed checkpoint"))
        elif cp["seq"] > last["seq"] and last_reason != "after":
            problems.append((last_number, f"chain {name}: cut after seq {last['seq']}; checkpoint {cp['seq']} exists"))


def check_end(data: bytes, end_at: int | None, end: tuple | None, lines: list, key: Ed25519PublicKey, kid: str,
              problems: list, counts: dict) -> None:  # rule 6
    if end is None or end_at is None or lines[-1][1] is not end[1]:
        problems.append((lines[-1][0] if lines else None, "no signed end line last: the file was cut or extended"))
        return
    number, obj = end
    try:
        valid = signed(key, obj.get("signature"), end_message(obj))
    except KeyError as exc:
        valid = False
        problems.append((number, f"the end line lacks {exc}"))
    if not valid:
        problems.append((number, "the end line's signature is invalid"))
        return
    counts["end_signature"] = 1
    if obj.get("key_id") != kid:
        problems.append((number, f"the end line names key {obj.get('key_id')}, the pinned key is {kid}"))
    if sha(data[:end_at]) != obj["sha256"]:
        problems.append((number, "the bytes before the end line differ from what was signed"))
    if obj["lines"] != len(lines) - 1:
        problems.append((number, f"the end line counts {obj['lines']} lines, the file has {len(lines) - 1}"))


def main(argv: list[str]) -> int:
    if len(argv) < 3 or "--public-key" not in argv:
        print(__doc__.strip().splitlines()[-3], file=sys.stderr)
        return 2
    pem_path = argv[argv.index("--public-key") + 1]
    export_path = next(a for a in argv[1:] if a not in ("--public-key", pem_path, "--json"))
    with open(export_path, "rb") as f, open(pem_path, "rb") as k:
        result = verify(f.read(), k.read())
    if "--json" in argv:
        print(json.dumps(result))
    else:
        for p in result["problems"]:
            print(f"line {p['line']}: {p['message']}")
        print(("OK" if result["ok"] else "FAILED") + f": {result['hashes_reproduced']} hashes reproduced, "
              f"{result['checkpoint_signatures']} checkpoint and {result['end_signature']} end signatures valid")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
