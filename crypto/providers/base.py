"""The one interface behind which the KEK lives (DESIGN.md, "Keys"): Vault transit or a local file.

Contract every provider keeps (the parametrised suite in tests/crypto proves it for both):

- ``wrap*`` returns self-describing bytes that name the provider and the KEK version
  (``b"vault:v3:..."``, ``b"local:v3:..."``); ``wrapped_version`` reads that version back without
  unwrapping, so rotation can find what still needs a rewrap.
- ``context`` is bound to the wrapped key: unwrapping with another context fails. The ``*_many``
  calls take one context for every item or a sequence of one context per item (e.g. rotation
  across subjects whose keys are wrapped with their own ids).
- Failures: ``KeyProviderUnavailable`` when the provider cannot serve (sealed, unreachable, timed
  out, denied), ``AuthenticationError`` for a wrapped value that does not open, ``KeyNotFound`` for
  a KEK version that does not exist or was retired with ``set_min_decryption_version``.
- Signatures are raw 64-byte Ed25519 signatures over ``data``; ``public_key_pem`` lets an auditor
  verify them offline with ``cryptography`` alone.
- Owner keys (the crypto-shred, DESIGN.md "GDPR"): ``wrap_owned`` wraps under a key that belongs to
  one owner (a subject) alone, created on first use; ``destroy_owned`` deletes it for good, so every
  copy of what it wrapped (dead tuples, WAL, backups) stops opening while other owners are untouched.
  Their wrapped values are never rewrapped by KEK rotation: each owner key lives and dies on its own.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from crypto.errors import AuthenticationError

__all__ = ["Contexts", "KeyDestruction", "KeyProvider", "check_owner", "contexts_for", "split_wrapped"]

Contexts = bytes | Sequence[bytes]
_OWNER = re.compile(r"^[a-z][a-z0-9-]{0,99}$")


@dataclass(frozen=True)
class KeyDestruction:
    """What ``destroy_owned`` did, stated for a receipt: where the key lived and whether it was there."""

    provider: str
    location: str
    existed: bool
    method: str


def check_owner(owner: str) -> str:
    """Owner names become Vault key names and file records: a strict alphabet keeps them unambiguous."""
    if not _OWNER.match(owner):
        raise ValueError(f"invalid owner key name {owner!r}")
    return owner


@runtime_checkable
class KeyProvider(Protocol):
    """Wraps DEKs under a versioned KEK and signs with an Ed25519 key; implementations are thread-safe."""

    name: str

    def wrap_many(self, dek_list: list[bytes], context: Contexts = b"") -> list[bytes]:
        """Wrap each DEK under the latest KEK version, in as few round trips as the provider allows."""
        ...

    def unwrap_many(self, wrapped: list[bytes], context: Contexts = b"") -> list[bytes]:
        """Unwrap each value (all with the same context); the whole call fails if any item fails."""
        ...

    def wrap(self, dek: bytes, context: bytes = b"") -> bytes:
        """Wrap one DEK; see ``wrap_many``."""
        return self.wrap_many([dek], context)[0]

    def unwrap(self, wrapped: bytes, context: bytes = b"") -> bytes:
        """Unwrap one value; see ``unwrap_many``."""
        return self.unwrap_many([wrapped], context)[0]

    def rewrap_many(self, wrapped: list[bytes], context: Contexts = b"") -> list[bytes]:
        """Re-encrypt wrapped values under the latest KEK version without returning the DEKs."""
        ...

    def rotate_kek(self) -> int:
        """Create a new KEK version, used by every later wrap; returns the new version number."""
        ...

    def kek_version(self) -> int:
        """The latest KEK version (the one ``wrap`` uses)."""
        ...

    def wrapped_version(self, wrapped: bytes) -> int:
        """The KEK version named by a wrapped value's prefix (not authenticated until unwrap)."""
        ...

    def set_min_decryption_version(self, v: int) -> None:
        """Retire KEK versions below ``v``: values wrapped under them no longer unwrap (KeyNotFound)."""
        ...

    def wrap_owned(self, owner: str, dek: bytes, context: bytes = b"") -> bytes:
        """Wrap one DEK under ``owner``'s own key, creating that key on first use (one round trip)."""
        ...

    def unwrap_owned(self, owner: str, wrapped: bytes, context: bytes = b"") -> bytes:
        """Unwrap a value from ``wrap_owned``; ``KeyNotFound`` once the owner's key is destroyed."""
        ...

    def wrap_owned_many(self, items: Sequence[tuple[str, bytes, bytes]]) -> list[bytes]:
        """``wrap_owned`` of each ``(owner, dek, context)``; providers overlap the round trips."""
        return [self.wrap_owned(owner, dek, context) for owner, dek, context in items]

    def unwrap_owned_many(self, items: Sequence[tuple[str, bytes, bytes]]) -> list[bytes]:
        """``unwrap_owned`` of each ``(owner, wrapped, context)``; the whole call fails if any item fails."""
        return [self.unwrap_owned(owner, wrapped, context) for owner, wrapped, context in items]

    def destroy_owned(self, owner: str) -> KeyDestruction:
        """Delete ``owner``'s key for good (idempotent: a missing key is reported, not an error)."""
        ...

    def owned_exists(self, owner: str) -> bool:
        """True while ``owner``'s key exists (the erasure checks its destruction with this)."""
        ...

    def sign(self, data: bytes) -> bytes:
        """Sign ``data`` with the Ed25519 signing key; returns the raw 64-byte signature."""
        ...

    def verify(self, data: bytes, signature: bytes) -> bool:
        """True iff ``signature`` is a valid signature of ``data`` by the signing key."""
        ...

    def public_key_pem(self) -> bytes:
        """The Ed25519 public key as SubjectPublicKeyInfo PEM, for offline verification."""
        ...

    def health(self) -> None:
        """Return if the provider can serve now; raise ``KeyProviderUnavailable`` otherwise."""
        ...

    def close(self) -> None:
        """Release connections and forget tokens and cached key state (a later call starts afresh)."""
        ...


def split_wrapped(wrapped: bytes, scheme: str) -> tuple[int, bytes]:
    """Split ``b"<scheme>:v<N>:<body>"`` into (N, body); anything else raises ``AuthenticationError``."""
    parts = bytes(wrapped).split(b":", 2)
    if len(parts) != 3 or parts[0] != scheme.encode() or not parts[1][:1] == b"v" or not parts[1][1:].isdigit():
        raise AuthenticationError(f"not a {scheme} wrapped key (expected b'{scheme}:v<N>:...')")
    return int(parts[1][1:]), parts[2]


def contexts_for(context: Contexts, count: int) -> list[bytes]:
    """Expand the ``context`` argument of the ``*_many`` calls to one context per item."""
    if isinstance(context, bytes | bytearray | memoryview):
        return [bytes(context)] * count
    contexts = [bytes(c) for c in context]
    if len(contexts) != count:
        raise ValueError(f"got {len(contexts)} contexts for {count} items")
    return contexts
