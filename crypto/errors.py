"""One exception hierarchy for ``crypto``; the API maps each class to a problem+json status in one place.

Messages name the operation and the key or server involved, never key material or plaintext.
"""

from __future__ import annotations

__all__ = ["AuthenticationError", "CryptoError", "KeyNotFound", "KeyProviderUnavailable"]


class CryptoError(Exception):
    """Base class: anything ``crypto`` raises on purpose derives from it."""


class KeyProviderUnavailable(CryptoError):
    """The key provider cannot serve now (sealed, unreachable, timed out, denied); the API answers 503."""


class AuthenticationError(CryptoError):
    """An AEAD open failed: wrong key, wrong associated data, tampered, truncated or malformed input."""


class KeyNotFound(CryptoError):
    """The key or key version a blob names does not exist or has been retired (min_decryption_version)."""
