"""Signed erasure receipts: what was destroyed, signed so anyone with the public key can check it.

The signature is Ed25519 over the canonical JSON of the receipt (appliance.audit.chain.canonical_json),
made by the same key that signs audit checkpoints (``appliance audit export`` ships its public key).
"""

from __future__ import annotations

from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from appliance.audit.chain import canonical_json
from appliance.audit.checkpoints import provider_key_id
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
