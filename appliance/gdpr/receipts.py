"""Signed erasure receipts: what was destroyed, signed so anyone with the public key can check it.

The signature is Ed25519 over the canonical JSON of the receipt (appliance.audit.chain.canonical_json),
made by the same key that signs audit checkpoints (``appliance audit export`` ships its public key).

Offline checking (``appliance subject verify-receipt``) takes a receipt in any form the appliance hands
out and trusts nothing outside the signed receipt: unsigned fields around it that name another job or
subject, a second signature that disagrees, or a signing key id other than the pinned key's all fail.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat, load_pem_public_key

from appliance.audit.chain import canonical_json
from appliance.audit.checkpoints import key_fingerprint, provider_key_id
from crypto.providers.base import KeyProvider

RECEIPT_TYPE = "appliance-erasure-receipt"


def receipt_message(receipt: dict[str, Any]) -> bytes:
    return canonical_json(receipt)


def sign_receipt(keys: KeyProvider, receipt: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """The receipt with its signing key id filled in, and the hex signature over it."""
    receipt = {**receipt, "signing_key_id": provider_key_id(keys)}
    return receipt, keys.sign(receipt_message(receipt)).hex()


def verify_receipt(receipt: dict[str, Any], signature_hex: str, public_key_pem: bytes | str) -> bool:
    """True iff ``signature_hex`` is the appliance's signature over exactly this receipt."""
    pem = public_key_pem.encode() if isinstance(public_key_pem, str) else public_key_pem
    key = load_pem_public_key(pem)
    if not isinstance(key, Ed25519PublicKey) or receipt.get("type") != RECEIPT_TYPE:
        return False
    try:
        key.verify(bytes.fromhex(signature_hex), receipt_message(receipt))
    except (InvalidSignature, ValueError):
        return False
    return True


class ReceiptDocumentError(ValueError):
    """The input holds no receipt this verifier can check (unreadable, unfinished, ambiguous, bad key)."""


@dataclass
class ReceiptCheck:
    """The outcome of checking one receipt document: ``ok`` only with no problem at all."""

    receipt: dict[str, Any]
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


# Unsigned fields of the documents the appliance hands out, and the signed receipt field each must equal.
_ECHOED_FIELDS = {"id": "job_id", "job_id": "job_id", "subject_id": "subject_id"}


def receipt_from_document(doc: Any) -> tuple[dict[str, Any], str]:
    """The receipt and its hex signature from the body of ``DELETE /v1/subjects/{id}`` or
    ``GET /v1/erasures/{id}`` (``receipt_signature``), from ``subject erase`` (``signature``), or
    from a bare ``{receipt, signature}`` file. Two signatures that differ are refused, not chosen."""
    if not isinstance(doc, dict) or "receipt" not in doc:
        raise ReceiptDocumentError("no 'receipt' field: expected the JSON body of DELETE /v1/subjects/{id} or "
                                   "GET /v1/erasures/{id}, or the output of `appliance subject erase`")
    receipt = doc["receipt"]
    if receipt is None:
        raise ReceiptDocumentError(f"the erasure has no receipt yet (job state {doc.get('state', 'unknown')!r}); "
                                   "fetch GET /v1/erasures/{id} once it is done")
    if not isinstance(receipt, dict):
        raise ReceiptDocumentError("'receipt' is not a JSON object")
    signatures = {doc[k] for k in ("receipt_signature", "signature") if doc.get(k) is not None}
    if not signatures:
        raise ReceiptDocumentError("no 'receipt_signature' or 'signature' field: an unsigned receipt proves nothing")
    if len(signatures) > 1:
        raise ReceiptDocumentError("'receipt_signature' and 'signature' differ: refusing to pick one")
    signature = signatures.pop()
    if not isinstance(signature, str):
        raise ReceiptDocumentError("the signature is not a hex string")
    return receipt, signature


def public_key_id(public_key_pem: bytes | str) -> str:
    """The key id the appliance writes beside its signatures, for a PEM from any source: computed
    over the key re-encoded as the appliance encodes it, so line endings or wrapping do not matter."""
    pem = public_key_pem.encode() if isinstance(public_key_pem, str) else public_key_pem
    try:
        key = load_pem_public_key(pem)
    except ValueError as exc:
        raise ReceiptDocumentError(f"the public key is not a PEM public key ({exc})") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise ReceiptDocumentError("the public key is not an Ed25519 key")
    return key_fingerprint(key.public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo))


def check_receipt_document(doc: Any, public_key_pem: bytes | str) -> ReceiptCheck:
    """Check a receipt document against the pinned public key; see the module doc for what fails."""
    receipt, signature = receipt_from_document(doc)
    pinned_id = public_key_id(public_key_pem)
    check = ReceiptCheck(receipt)
    if receipt.get("type") != RECEIPT_TYPE:
        check.problems.append(f"not an erasure receipt (type {receipt.get('type')!r})")
    if not verify_receipt(receipt, signature, public_key_pem):
        check.problems.append("the signature does not match the receipt under the pinned key "
                              "(the receipt was changed, or signed by another key)")
    signer = receipt.get("signing_key_id")
    if signer != pinned_id:
        check.problems.append(f"the receipt names signing key {signer!r}, the pinned key is {pinned_id!r}")
    for outer, inner in _ECHOED_FIELDS.items():
        if doc.get(outer) is not None and str(doc[outer]) != str(receipt.get(inner)):
            check.problems.append(f"unsigned field {outer!r} ({doc[outer]}) differs from the signed receipt's "
                                  f"{inner!r} ({receipt.get(inner)})")
    return check
