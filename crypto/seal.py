"""The sealing recipe: AES-256-GCM with a versioned envelope and bound associated data.

This module and ``crypto.stream`` are the only places in the project that make nonces. Callers pass a
DEK (from ``new_dek`` and a key provider) and an associated-data string built with ``aad`` that says
what the blob *is* (record kind, ids, model), so a blob copied to another row fails to open.

Envelope (all integers big-endian), like Fernet's token, every field fixed-size except the last::

    offset  size  field
    0       1     format version, 0x01
    1       4     key version (uint32): which DEK/seed version sealed this blob, chosen by the caller
    5       12    nonce, 96 random bits from os.urandom (never reused: 2^-32 collision bound at 2^32 blobs/key)
    17      n+16  AES-256-GCM ciphertext of the n-byte plaintext, then the 16-byte tag

The first 5 bytes (the header) are authenticated too: GCM's associated data is ``header || aad``,
so changing the version fields fails to open just like changing the ciphertext.
"""

from __future__ import annotations

import os
import struct

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from crypto.errors import AuthenticationError

__all__ = ["DEK_SIZE", "ENVELOPE_OVERHEAD", "FORMAT_VERSION", "aad", "new_dek", "open_sealed", "seal"]

FORMAT_VERSION = 1
DEK_SIZE = 32
NONCE_SIZE = 12
TAG_SIZE = 16
_HEADER = struct.Struct(">BI")
ENVELOPE_OVERHEAD = _HEADER.size + NONCE_SIZE + TAG_SIZE
_AAD_MAGIC = b"appliance-aad-v1"
_MAX_KEY_VERSION = 2**32 - 1


def new_dek() -> bytes:
    """Return a fresh 256-bit data-encryption key from the OS CSPRNG."""
    return os.urandom(DEK_SIZE)


def aad(*parts: str | bytes | int) -> bytes:
    """Encode context parts unambiguously: ``aad("a", "bc") != aad("ab", "c")`` and ``aad(1) != aad("1")``.

    Each part becomes a type tag (``s``, ``b`` or ``i``), a 4-byte length and the bytes (UTF-8 for
    ``str``, ASCII decimal for ``int``), after a magic prefix and a part count.
    """
    out = bytearray(_AAD_MAGIC)
    out += struct.pack(">I", len(parts))
    for part in parts:
        if isinstance(part, bool):
            raise TypeError("aad parts must be str, bytes or int, not bool")
        if isinstance(part, str):
            tag, raw = b"s", part.encode("utf-8")
        elif isinstance(part, bytes | bytearray | memoryview):
            tag, raw = b"b", bytes(part)
        elif isinstance(part, int):
            tag, raw = b"i", str(part).encode("ascii")
        else:
            raise TypeError(f"aad parts must be str, bytes or int, not {type(part).__name__}")
        out += tag + struct.pack(">I", len(raw)) + raw
    return bytes(out)


def _cipher(dek: bytes) -> AESGCM:
    """Reject keys of the wrong size loudly: a short key is a bug, not an authentication failure."""
    if len(dek) != DEK_SIZE:
        raise ValueError(f"a DEK must be {DEK_SIZE} bytes, got {len(dek)}")
    return AESGCM(dek)


def seal(dek: bytes, plaintext: bytes, aad: bytes, key_version: int = 1) -> bytes:
    """Encrypt and authenticate ``plaintext`` bound to ``aad``; returns the envelope described above."""
    if not 0 <= key_version <= _MAX_KEY_VERSION:
        raise ValueError("key_version must fit in 32 bits")
    header = _HEADER.pack(FORMAT_VERSION, key_version)
    nonce = os.urandom(NONCE_SIZE)
    return header + nonce + _cipher(dek).encrypt(nonce, plaintext, header + aad)


def envelope_key_version(blob: bytes) -> int:
    """Read the (unauthenticated until opened) key version so the caller can pick the right DEK."""
    if len(blob) < ENVELOPE_OVERHEAD or blob[0] != FORMAT_VERSION:
        raise AuthenticationError("not a sealed envelope (too short or unknown format version)")
    return int(_HEADER.unpack_from(blob)[1])


def open_sealed(dek: bytes, blob: bytes, aad: bytes) -> bytes:
    """Verify and decrypt an envelope; any mismatch raises ``AuthenticationError`` and returns nothing."""
    cipher = _cipher(dek)
    if len(blob) < ENVELOPE_OVERHEAD:
        raise AuthenticationError("sealed blob is truncated")
    if blob[0] != FORMAT_VERSION:
        raise AuthenticationError(f"unknown sealed format version {blob[0]}")
    header, nonce = blob[: _HEADER.size], blob[_HEADER.size : _HEADER.size + NONCE_SIZE]
    try:
        return cipher.decrypt(nonce, blob[_HEADER.size + NONCE_SIZE :], header + aad)
    except InvalidTag:
        raise AuthenticationError("sealed blob failed authentication (wrong key, context or tampered)") from None
