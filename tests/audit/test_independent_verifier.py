"""docs/audit.md is enough to verify an export: a verifier written from it alone, with no code of the
appliance (``independent_verifier.py``), reproduces every record and stub hash, every checkpoint
signature and the end signature of real exports, and points at any line changed by one byte.

Real exports: the committed ones written by the writer before issue 18 (``fixtures/``), and fresh ones
from the running test stack through ``GET /v1/audit/export``: match events from both match bodies and
``match:batch`` (stored in match blocks), records of the transaction chains (subjects, enrolment,
reads, exports), an aggregated ``auth.denied`` record, a signed checkpoint, and windows and filters
that produce every kind of stub.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import random
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest

HERE = Path(__file__).parent
SCRIPT = HERE / "independent_verifier.py"
FIXTURES = HERE / "fixtures"
FIXTURE_PEM = FIXTURES / "export-before-issue-18.pem"
DOC = HERE.parents[1] / "docs" / "audit.md"
MODEL = "dlib-resnet-v1"
ALLOWED_IMPORTS = {"__future__", "csv", "hashlib", "itertools", "json", "sys", "cryptography"}
PROJECT_PACKAGES = ("appliance", "crypto", "vector", "media")
# Runs the script with the project's packages made unimportable, so independence is proven, not assumed.
_ISOLATED = f"""
import importlib.abc, runpy, sys
class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {PROJECT_PACKAGES!r}:
            raise ImportError(name + " is off limits for the independent verifier")
sys.meta_path.insert(0, Refuse())
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def _script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("independent_verifier", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


VERIFIER = _script()


def _run(export: Path, pem: Path) -> dict[str, Any]:
    """The script as an auditor runs it, in a fresh interpreter that cannot import the appliance."""
    done = subprocess.run([sys.executable, "-I", "-c", _ISOLATED, str(SCRIPT), str(export), "--public-key", str(pem),
                           "--json"], capture_output=True, text=True, check=False)
    assert done.stderr == "", done.stderr
    result = json.loads(done.stdout)
    assert done.returncode == (0 if result["ok"] else 1)
    return result  # type: ignore[no-any-return]


def _objects(data: bytes) -> list[dict[str, Any]]:
    """The export's objects, read with this project's knowledge (JSONL lines or CSV ``json`` cells)."""
    if data.startswith(b"type,chain,"):
        import csv
        import io

        return [json.loads(row["json"]) for row in csv.DictReader(io.StringIO(data.decode()))]
    return [json.loads(line) for line in data.splitlines() if line]


def _assert_everything_reproduced(result: dict[str, Any], data: bytes) -> None:
    objs = _objects(data)
    hashed = sum(o["type"] in ("record", "stub") for o in objs)
    checkpoints = sum(o["type"] == "checkpoint" for o in objs)
    assert result["problems"] == [] and result["ok"]
    assert (result["hashes_reproduced"], result["checkpoint_signatures"], result["end_signature"]) == \
        (hashed, checkpoints, 1)


def _flip_one_byte(line: bytes, rng: random.Random) -> bytes:
    """One letter or digit of the line XOR 1: still printable, never a quote or backslash."""
    positions = [i for i, b in enumerate(line) if chr(b).isalnum()]
    i = rng.choice(positions)
    return line[:i] + bytes([line[i] ^ 1]) + line[i + 1:]


def _kind(line: bytes) -> str:
    """The type of one line of an export: a CSV row's first column, or a JSONL object's ``type``."""
    if line.startswith(b"type,"):
        return "columns"
    if line.startswith(b"{"):
        return str(json.loads(line)["type"])
    return line.split(b",", 1)[0].decode()


def _assert_every_changed_line_is_caught(data: bytes, pem: bytes) -> int:
    """Change each line of the file by one byte in turn: the verifier fails, naming that line when it
    is a record, stub or checkpoint (the header and end lines are caught by the end signature)."""
    rng = random.Random(18)
    lines = data.split(b"\n")
    assert lines[-1] == b""
    for i in range(len(lines) - 1):
        changed = b"\n".join([*lines[:i], _flip_one_byte(lines[i], rng), *lines[i + 1:]])
        result = VERIFIER.verify(changed, pem)
        assert not result["ok"], f"line {i + 1} changed and not noticed: {lines[i][:120]!r}"
        if _kind(lines[i]) in ("record", "stub", "checkpoint"):
            assert i + 1 in {p["line"] for p in result["problems"]}, (i + 1, result["problems"][:3])
    return len(lines) - 1


# --- the script is independent, and docs/audit.md states what it relies on ---------------------------


def test_the_verifier_imports_only_the_standard_library_and_cryptography() -> None:
    tree = ast.parse(SCRIPT.read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom) and node.module}
    assert imported <= ALLOWED_IMPORTS, imported - ALLOWED_IMPORTS


def test_every_format_constant_of_the_verifier_is_in_the_doc() -> None:
    doc = DOC.read_text()
    constants = [VERIFIER.GENESIS, VERIFIER.CSV_HEADER, VERIFIER.EXPORT_FORMAT, VERIFIER.CHECKPOINT_TYPE,
                 VERIFIER.END_TYPE, *VERIFIER.BODY_KEYS, *VERIFIER.STUB_HEADER_KEYS]
    assert [c for c in constants if c not in doc] == []


# --- the exports committed before issue 18 -------------------------------------------------------------


@pytest.mark.parametrize(("name", "hashes", "checkpoints"), [("export-before-issue-18.jsonl", 265, 10),
                                                             ("export-before-issue-18-window.csv", 263, 8)])
def test_a_committed_export_is_reproduced_hash_for_hash(name: str, hashes: int, checkpoints: int) -> None:
    result = _run(FIXTURES / name, FIXTURE_PEM)
    _assert_everything_reproduced(result, (FIXTURES / name).read_bytes())
    assert (result["hashes_reproduced"], result["checkpoint_signatures"]) == (hashes, checkpoints)


@pytest.mark.parametrize("name", ["export-before-issue-18.jsonl", "export-before-issue-18-window.csv"])
def test_one_changed_byte_in_any_line_of_a_committed_export_fails(name: str) -> None:
    data = (FIXTURES / name).read_bytes()
    assert _assert_every_changed_line_is_caught(data, FIXTURE_PEM.read_bytes()) > 250


def test_another_key_is_refused() -> None:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    other = Ed25519PrivateKey.generate().public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    result = VERIFIER.verify((FIXTURES / "export-before-issue-18.jsonl").read_bytes(), other)
    assert not result["ok"] and result["checkpoint_signatures"] == 0 and result["end_signature"] == 0


# --- fresh exports from the running stack, through the API ----------------------------------------------


def _now() -> str:
    return datetime.now(UTC).isoformat()


def _unit(rng: np.random.Generator, dim: int) -> np.ndarray:
    v = rng.standard_normal(dim).astype(np.float32)
    return v / np.linalg.norm(v)  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def fresh(client, make_key, settings, service_pool, keys, tmp_path_factory):  # type: ignore[no-untyped-def]
    """Exports (name → path) of a window holding match events, transaction-chain records, a refusal and a
    signed checkpoint; plus the public key fetched apart from them, as an auditor pins it."""
    from appliance.audit.checkpoints import write_checkpoints

    staff, auditor = make_key("enroll", "match", name="verifier-staff"), make_key("audit", name="verifier-auditor")
    rng = np.random.default_rng(18)
    dim = settings.models[MODEL].dim
    start = _now()
    people = []
    for n in range(2):
        r = client.post("/v1/subjects", json={"label": f"Auditee {n}", "external_ref": uuid.uuid4().hex}, headers=staff)
        assert r.status_code == 201, r.text
        vectors = np.stack([_unit(rng, dim) for _ in range(3)])
        r2 = client.post(f"/v1/subjects/{r.json()['id']}/encodings", json={"model": MODEL, "vectors": vectors.tolist()},
                         headers=staff)
        assert r2.status_code == 201, r2.text
        people.append((r.json()["id"], vectors))
    for _ in range(400):  # the hot index follows the change feed: wait until it names the first subject
        r = client.post("/v1/match", json={"model": MODEL, "embedding": people[0][1][0].tolist()}, headers=staff)
        if r.status_code == 200 and r.json()["subject_id"] == people[0][0]:
            break
        time.sleep(0.05)
    else:
        pytest.fail(f"the index never matched the enrolled subject: {r.status_code} {r.text[:300]}")

    def matches(rounds: int) -> None:
        for i in range(rounds):
            sid, vectors = people[i % 2]
            r = client.post("/v1/match", json={"model": MODEL, "embedding": vectors[i % 3].tolist(), "k": 3,
                                               "camera_id": "door-1", "track_id": f"t{i}"}, headers=staff)
            assert r.status_code == 200 and r.json()["subject_id"] == sid, r.text
            r = client.post(f"/v1/match?model={MODEL}", content=_unit(rng, dim).astype("<f4").tobytes(),
                            headers={**staff, "Content-Type": "application/octet-stream"})
            assert r.status_code == 200 and r.json()["decision"] == "unknown", r.text
        batch = [people[0][1][0].tolist(), *(_unit(rng, dim).tolist() for _ in range(15))]
        r = client.post("/v1/match:batch", json={"model": MODEL, "embeddings": batch}, headers=staff)
        assert r.status_code == 200 and len(r.json()["results"]) == 16, r.text
        assert client.get(f"/v1/subjects/{people[0][0]}", headers=staff).status_code == 200

    def flush() -> None:  # the export endpoint commits what was queued before it answers
        assert client.get("/v1/audit/export", params={"action": "none"}, headers=auditor).status_code == 200

    matches(25)
    assert client.get("/v1/audit/export", headers=staff).status_code == 403  # becomes an auth.denied record
    flush()
    with service_pool.connection() as conn:
        assert write_checkpoints(conn, keys, "manual") >= 2
    middle = _now()
    matches(10)
    flush()
    end = _now()
    folder = tmp_path_factory.mktemp("exports")
    windows = {"window.jsonl": {"from": start, "to": end},
               "window.csv": {"from": start, "to": end, "format": "csv"},
               "subject.jsonl": {"from": start, "to": end, "subject_id": people[0][0]},
               "first-half-matches.csv": {"from": start, "to": middle, "action": "match", "format": "csv"},
               "second-half.jsonl": {"from": middle, "to": end}}
    exports = {}
    for name, params in windows.items():
        r = client.get("/v1/audit/export", params=params, headers=auditor)
        assert r.status_code == 200, r.text
        exports[name] = folder / name
        exports[name].write_bytes(r.content)
    pem = folder / "appliance.pem"
    pem.write_bytes(client.get("/v1/audit/public-key", headers=auditor).content)
    yield exports, pem
    admin = make_key("admin", name="verifier-admin")
    for sid, _ in people:
        client.delete(f"/v1/subjects/{sid}", headers=admin)


def test_fresh_exports_hold_every_kind_of_line(fresh) -> None:  # type: ignore[no-untyped-def]
    exports, _ = fresh
    window = _objects(exports["window.jsonl"].read_bytes())
    records = [o for o in window if o["type"] == "record"]
    assert sum(o["action"] == "match" and o["chain"].startswith("w:") for o in records) >= 2 * 35 + 2 * 16
    assert {"subject.create", "enrol", "subject.read", "audit.export", "auth.denied"} <= {o["action"] for o in records}
    assert any(o["chain"].startswith("tx:") for o in records)
    assert any(o["type"] == "checkpoint" and o["kind"] == "manual" for o in window)
    reasons = {o["reason"] for name in exports for o in _objects(exports[name].read_bytes()) if o["type"] == "stub"}
    assert reasons == {"filtered", "before", "after"}


@pytest.mark.parametrize("name", ["window.jsonl", "window.csv", "subject.jsonl", "first-half-matches.csv",
                                  "second-half.jsonl"])
def test_a_fresh_export_is_reproduced_hash_for_hash(fresh, name) -> None:  # type: ignore[no-untyped-def]
    from appliance.audit.verify import verify_export

    exports, pem = fresh
    data = exports[name].read_bytes()
    assert verify_export(data, pem.read_bytes()).verified  # the appliance's own verifier agrees
    result = _run(exports[name], pem)
    _assert_everything_reproduced(result, data)
    print(f"{name}: {result['records']} records, {result['stubs']} stubs, {result['hashes_reproduced']} hashes, "
          f"{result['checkpoint_signatures']} checkpoint signatures, {result['end_signature']} end signature")
    assert result["hashes_reproduced"] > 0 and result["checkpoint_signatures"] > 0


@pytest.mark.parametrize("name", ["window.jsonl", "window.csv", "subject.jsonl"])
def test_one_changed_byte_in_any_line_of_a_fresh_export_fails(fresh, name) -> None:  # type: ignore[no-untyped-def]
    exports, pem = fresh
    assert _assert_every_changed_line_is_caught(exports[name].read_bytes(), pem.read_bytes()) > 100
