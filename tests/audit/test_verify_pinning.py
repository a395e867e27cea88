"""`appliance audit verify` says OK only against a pinned public key: without one it refuses, with
`--no-signature-check` it says NOT VERIFIED, and an export re-signed with another key fails."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import Result
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from typer.testing import CliRunner

from appliance.audit import AuditEvent
from appliance.audit.chain import canonical_json, checkpoint_message
from appliance.audit.checkpoints import key_fingerprint
from appliance.audit.export import ExportFilter, end_message, export_lines
from appliance.audit.verify import verify_export

Verify = Callable[..., Result]


@pytest.fixture(scope="module")
def exported(service_pool, keys, settings) -> bytes:  # type: ignore[no-untyped-def]
    """A whole-log export with a few records of our own, checkpointed."""
    from appliance.audit.log import AuditLog

    log = AuditLog(service_pool, keys=lambda: keys, flush_interval=0.05, checkpoint_interval=0)
    for i in range(5):
        log.submit(AuditEvent("subject.read", "apikey:pinning", details={"i": i}))
    assert log.flush(10)
    log.stop(checkpoint=False)
    log.checkpoint("manual")
    flt = ExportFilter.build(None, None, None, None)
    return b"".join(export_lines(settings.database_url.get_secret_value(), keys, flt))


@pytest.fixture(scope="module")
def pinned_key(keys, tmp_path_factory) -> Path:  # type: ignore[no-untyped-def]
    path = tmp_path_factory.mktemp("pinning") / "appliance.pem"
    path.write_bytes(keys.public_key_pem())
    return path


def _resigned(data: bytes, other: Ed25519PrivateKey) -> bytes:
    """The export as a forger would leave it: same records, every signature and key id replaced."""
    pem = other.public_key().public_bytes(serialization.Encoding.PEM,
                                          serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    key_id = key_fingerprint(pem.encode())
    out: list[bytes] = []
    for raw in data.rstrip(b"\n").split(b"\n"):
        obj = json.loads(raw)
        if obj["type"] == "header":
            obj.update(public_key_pem=pem, key_id=key_id)
        elif obj["type"] == "checkpoint":
            obj.update(signature=other.sign(checkpoint_message(obj)).hex(), key_id=key_id)
        elif obj["type"] == "end":
            body = b"".join(out)
            sha, lines = hashlib.sha256(body).hexdigest(), len(out)
            obj = {"type": "end", "lines": lines, "sha256": sha, "key_id": key_id,
                   "signature": other.sign(end_message(sha, lines)).hex()}
        out.append(canonical_json(obj) + b"\n")
    return b"".join(out)


@pytest.fixture()
def verify(tmp_path: Path) -> Verify:
    from appliance.cli import app

    def run(data: bytes, *args: str) -> Result:
        path = tmp_path / "audit.jsonl"
        path.write_bytes(data)
        return CliRunner().invoke(app, ["audit", "verify", str(path), *args])

    return run


def _claims_nothing_verified(output: str) -> bool:
    return "OK" not in output and "verified" not in output.lower().replace("not verified", "")


def test_with_the_pinned_key_an_untouched_export_is_ok(exported: bytes, pinned_key: Path, verify: Verify) -> None:
    result = verify(exported, "--public-key", str(pinned_key))
    assert result.exit_code == 0, result.output
    assert result.output.strip().splitlines()[-1].startswith("OK:")


def test_without_a_pinned_key_verify_refuses(exported: bytes, verify: Verify) -> None:
    result = verify(exported)
    assert result.exit_code == 2, result.output
    assert "REFUSED" in result.output and "--public-key" in result.output
    assert _claims_nothing_verified(result.output)


def test_no_signature_check_says_not_verified_even_for_a_resigned_file(exported: bytes, verify: Verify) -> None:
    for data in (exported, _resigned(exported, Ed25519PrivateKey.generate())):
        result = verify(data, "--no-signature-check")
        assert result.exit_code == 3, result.output
        assert result.output.strip().splitlines()[-1].startswith("NOT VERIFIED:")
        assert _claims_nothing_verified(result.output)


def test_an_export_resigned_with_another_key_fails_against_the_pinned_key(
    exported: bytes, pinned_key: Path, verify: Verify
) -> None:
    forged = _resigned(exported, Ed25519PrivateKey.generate())
    assert verify_export(forged, None).ok  # consistent under its own embedded key: what the forger wants
    result = verify(forged, "--public-key", str(pinned_key))
    assert result.exit_code == 1, result.output
    assert "OK" not in result.output
    assert "the header names signing key" in result.output
    assert "the end line's signature is invalid" in result.output


def test_a_checkpoint_naming_another_key_id_fails(exported: bytes, keys) -> None:  # type: ignore[no-untyped-def]
    lines = exported.rstrip(b"\n").split(b"\n")
    i = next(i for i, x in enumerate(lines) if b'"type":"checkpoint"' in x)
    cp = json.loads(lines[i])
    lines[i] = canonical_json({**cp, "key_id": "0" * 16})
    report = verify_export(b"\n".join(lines) + b"\n", keys.public_key_pem())
    assert any(p.kind == "signature" and p.line == i + 1 and "names signing key" in p.message
               for p in report.problems), report.problems


def test_a_report_without_a_pinned_key_is_never_verified(exported: bytes) -> None:
    report = verify_export(exported, None)
    assert report.ok and not report.verified
    assert report.summary().startswith("NOT VERIFIED:")
