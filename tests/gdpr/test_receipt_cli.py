"""`appliance subject verify-receipt` checks the API's own erasure responses as they are, against a
pinned key, and cannot be fooled by a changed receipt, another key, contradicting unsigned fields or
a missing signature."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from click.testing import Result
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from typer.testing import CliRunner

from appliance.audit.chain import canonical_json

Verify = Callable[[Any], Result]


@pytest.fixture(scope="module")
def pinned_key(gdpr_client, make_key, tmp_path_factory) -> Path:  # type: ignore[no-untyped-def]
    """The public key as an auditor pins it: fetched apart from any receipt."""
    r = gdpr_client.get("/v1/audit/public-key", headers=make_key("audit", name="receipt-auditor"))
    assert r.status_code == 200, r.text
    path = tmp_path_factory.mktemp("receipt-key") / "appliance.pem"
    path.write_text(r.text)
    return path


@pytest.fixture(scope="module")
def erased(gdpr_client, admin_headers, make_key, staff_headers) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    """One erasure's DELETE body and job GET body, exactly as the API returned them."""
    r = gdpr_client.post("/v1/subjects", json={"label": "Receipt subject"}, headers=staff_headers)
    assert r.status_code == 201, r.text
    deleted = gdpr_client.delete(f"/v1/subjects/{r.json()['id']}", headers=admin_headers)
    assert deleted.status_code == 200, deleted.text
    job = gdpr_client.get(f"/v1/erasures/{deleted.json()['id']}", headers=admin_headers)
    assert job.status_code == 200, job.text
    return {"delete": deleted.text, "get": job.text}


@pytest.fixture()
def verify(pinned_key: Path, tmp_path: Path) -> Verify:
    """Run the CLI on a document (str written as is, else dumped as JSON) with the pinned key."""
    from appliance.cli import app

    def run(doc: Any, key: Path = pinned_key) -> Result:
        path = tmp_path / "receipt.json"
        path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
        return CliRunner().invoke(app, ["subject", "verify-receipt", str(path), "--public-key", str(key)])

    return run


def _assert_invalid(result: Result, why: str) -> None:
    assert result.exit_code == 1, result.output
    assert "OK" not in result.output
    assert why in result.output, result.output


def test_the_api_delete_and_job_bodies_verify_as_returned(erased: dict[str, Any], verify: Verify) -> None:
    for body in (erased["delete"], erased["get"]):
        result = verify(body)
        assert result.exit_code == 0, result.output
        receipt = json.loads(body)["receipt"]
        assert result.output.startswith(f"OK: receipt of job {receipt['job_id']} for subject "
                                        f"{receipt['subject_id']}")


def test_the_cli_erase_output_and_a_bare_receipt_file_verify(erased: dict[str, Any], verify: Verify) -> None:
    body = json.loads(erased["delete"])
    bare = {"receipt": body["receipt"], "signature": body["receipt_signature"]}
    assert verify(bare).exit_code == 0
    assert verify({"job_id": body["id"], **bare}).exit_code == 0


def test_a_tampered_receipt_fails(erased: dict[str, Any], verify: Verify) -> None:
    body = json.loads(erased["delete"])
    body["receipt"]["destroyed"]["encodings"] += 1
    _assert_invalid(verify(body), "the signature does not match")


def test_unsigned_fields_that_contradict_the_receipt_fail(erased: dict[str, Any], verify: Verify) -> None:
    body = json.loads(erased["delete"])
    other = "00000000-0000-4000-8000-000000000000"
    _assert_invalid(verify({**body, "subject_id": other}), "unsigned field 'subject_id'")
    _assert_invalid(verify({**body, "id": other}), "unsigned field 'id'")


def test_a_receipt_resigned_with_another_key_fails_against_the_pinned_key(
    erased: dict[str, Any], verify: Verify, tmp_path: Path
) -> None:
    other = Ed25519PrivateKey.generate()
    body = json.loads(erased["delete"])
    forged = {**body["receipt"], "destroyed": {**body["receipt"]["destroyed"], "encodings": 99}}
    forged_body = {**body, "receipt": forged, "receipt_signature": other.sign(canonical_json(forged)).hex()}
    _assert_invalid(verify(forged_body), "the signature does not match")
    # Under the forger's own key the signature holds, but the receipt names the appliance's key id.
    other_pem = tmp_path / "other.pem"
    other_pem.write_bytes(other.public_key().public_bytes(serialization.Encoding.PEM,
                                                          serialization.PublicFormat.SubjectPublicKeyInfo))
    _assert_invalid(verify(forged_body, key=other_pem), "the receipt names signing key")


def test_a_document_without_a_checkable_receipt_is_refused(erased: dict[str, Any], verify: Verify) -> None:
    body = json.loads(erased["delete"])
    cases = {
        "no signature": {**body, "receipt_signature": None},
        "two different signatures": {**body, "signature": "00" * 64},
        "no receipt yet": {**body, "state": "running", "receipt": None, "receipt_signature": None},
    }
    for name, doc in cases.items():
        result = verify(doc)
        assert result.exit_code == 2, (name, result.output)
        assert "OK" not in result.output and "CANNOT CHECK" in result.output, (name, result.output)
