"""Vault/OpenBao transit key provider: the KEK and the signing key never leave Vault.

- Auth and transport: ``crypto.providers.vault_session`` (AppRole login, lazy token renewal,
  bounded timeouts, error mapping).
- KEK: a *derived* aes256-gcm96 transit key. ``context`` goes to transit's key-derivation context,
  not to ``associated_data``, because transit's rewrap endpoint honours the former and ignores the
  latter; every context is prefixed with ``appliance:`` since derived keys need a non-empty one.
- Batches: encrypt, decrypt and rewrap send up to ``batch_size`` (5,000) items per request, so
  10,000 keys cost 2 round trips each way. Each item is 4 JSON strings and OpenBao refuses bodies
  with more than ``max_request_json_strings`` (default 1000, i.e. 249 items) strings, so the server's
  listener should set it to at least 4 x batch_size + 16 (the stack and Ansible use 65536). Against a
  server with a lower limit the provider halves its chunk size until requests pass, and warns once.
- Failures: transport errors, timeouts, 5xx, sealed or denied answers become
  ``KeyProviderUnavailable``; a batch item that does not open becomes ``AuthenticationError``
  (``KeyNotFound`` for a retired or unknown KEK version), naming the item's index, never its value.
- Wrapped values are transit ciphertexts as ASCII bytes, ``b"vault:v<N>:<base64>"``.
- Owner keys: one derived aes256-gcm96 transit key per owner, ``<owned_key_prefix><owner>`` (e.g.
  ``appliance-owned-subject-<uuid>``), created by transit's encrypt upsert on the first wrap (one round
  trip) and destroyed with ``config deletion_allowed`` + ``DELETE`` (two). The policy grants these
  rights on that prefix only, so the appliance can never delete its KEK or signing key.
- Signatures: transit ``ed25519`` key, pure Ed25519 over the input, returned as raw 64 bytes; they are
  verified locally against the public keys, exactly as an auditor does with ``public_key_pem``.
"""

from __future__ import annotations

import base64
import binascii
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import requests
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from crypto.errors import AuthenticationError, CryptoError, KeyNotFound, KeyProviderUnavailable
from crypto.providers.base import Contexts, KeyDestruction, KeyProvider, check_owner, contexts_for, split_wrapped
from crypto.providers.vault_session import RequestTooComplex, VaultSession

__all__ = ["VaultTransitProvider"]

log = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = 5000
OWNED_PARALLEL = 8  # owner-key requests in flight at once (bulk enrolment, re-keys)
_CONTEXT_PREFIX = b"appliance:"


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _derivation_contexts(context: Contexts, count: int) -> list[str]:
    """Transit derivation contexts (base64) for a batch: derived keys refuse an empty context."""
    return [_b64(_CONTEXT_PREFIX + c) for c in contexts_for(context, count)]


def _item_error(operation: str, index: int, message: str) -> CryptoError:
    """Classify a per-item batch error from transit."""
    if "disallowed by policy" in message or "too old" in message:
        return KeyNotFound(f"{operation} item {index}: KEK version is retired (min_decryption_version)")
    if "too new" in message or "not found" in message:
        return KeyNotFound(f"{operation} item {index}: KEK version does not exist ({message[:120]})")
    if "permission denied" in message:
        return KeyProviderUnavailable(f"{operation} item {index}: Vault denied the operation")
    return AuthenticationError(f"{operation} item {index}: Vault could not open the value ({message[:120]})")


def _verifies(keys: dict[int, Ed25519PublicKey], data: bytes, signature: bytes) -> bool:
    for key in keys.values():
        try:
            key.verify(bytes(signature), bytes(data))
        except InvalidSignature:
            continue
        return True
    return False


class VaultTransitProvider(KeyProvider):
    """KEK and Ed25519 signing key in Vault/OpenBao transit, reached with AppRole credentials."""

    name = "vault"

    def __init__(
        self,
        addr: str,
        role_id: str,
        secret_id: str,
        mount: str = "transit",
        kek_name: str = "appliance-kek",
        signing_key_name: str = "appliance-signing",
        timeout: float = 2.0,
        *,
        approle_mount: str = "approle",
        owned_key_prefix: str = "appliance-owned-",
        batch_size: int = DEFAULT_BATCH_SIZE,
        verify: bool | str = True,
        session: requests.Session | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        self._vault = VaultSession(
            addr, role_id, secret_id, timeout=timeout, approle_mount=approle_mount, verify=verify, session=session
        )
        self.addr = self._vault.addr
        self.mount = mount
        self.kek_name = kek_name
        self.signing_key_name = signing_key_name
        self.owned_key_prefix = owned_key_prefix
        self.timeout = timeout
        self.batch_size = batch_size
        self._public_keys: dict[int, Ed25519PublicKey] = {}
        self._warned_batch = False

    def __repr__(self) -> str:
        return f"VaultTransitProvider(addr={self.addr!r}, mount={self.mount!r}, kek={self.kek_name!r})"

    # --- transport -------------------------------------------------------------------------------

    def _batch(self, operation: str, items: list[dict[str, str]], field: str, key: str | None = None) -> list[str]:
        """Run transit ``operation`` over items in chunks of ``batch_size``; returns ``field`` per item."""
        out: list[str] = []
        key = key or self.kek_name
        path = f"/v1/{self.mount}/{operation}/{key}"
        start = 0
        while start < len(items):
            chunk = items[start : start + self.batch_size]
            what = f"transit {operation} of {len(chunk)} keys with {key}"
            try:
                body = self._vault.call("post", path, what, json={"batch_input": chunk})
            except RequestTooComplex:
                if len(chunk) == 1:
                    raise
                self.batch_size = len(chunk) // 2
                log.log(
                    logging.DEBUG if self._warned_batch else logging.WARNING,
                    "crypto: Vault at %s refused a %d-item batch as too complex; trying %d. Raise the "
                    "listener's max_request_json_strings to keep round trips low",
                    self.addr,
                    len(chunk),
                    self.batch_size,
                )
                self._warned_batch = True
                continue
            results = body.get("data", {}).get("batch_results")
            if not isinstance(results, list) or len(results) != len(chunk):
                raise KeyProviderUnavailable(f"Vault at {self.addr} returned a malformed answer to {what}")
            for offset, result in enumerate(results):
                if result.get("error") or field not in result:
                    raise _item_error(operation, start + offset, str(result.get("error", "missing result")))
                out.append(str(result[field]))
            start += len(chunk)
        return out

    def _ciphertexts(self, wrapped: list[bytes]) -> list[str]:
        texts = []
        for index, item in enumerate(wrapped):
            split_wrapped(item, "vault")
            try:
                texts.append(bytes(item).decode("ascii"))
            except UnicodeDecodeError:
                raise AuthenticationError(f"item {index}: not a vault wrapped key") from None
        return texts

    def wrap_many(self, dek_list: list[bytes], context: Contexts = b"") -> list[bytes]:
        contexts = _derivation_contexts(context, len(dek_list))
        items = [{"plaintext": _b64(bytes(dek)), "context": c} for dek, c in zip(dek_list, contexts, strict=True)]
        return [c.encode("ascii") for c in self._batch("encrypt", items, "ciphertext")]

    def unwrap_many(self, wrapped: list[bytes], context: Contexts = b"") -> list[bytes]:
        contexts = _derivation_contexts(context, len(wrapped))
        items = [{"ciphertext": c, "context": x} for c, x in zip(self._ciphertexts(wrapped), contexts, strict=True)]
        try:
            return [base64.b64decode(p, validate=True) for p in self._batch("decrypt", items, "plaintext")]
        except binascii.Error:
            raise KeyProviderUnavailable(f"Vault at {self.addr} returned a malformed plaintext") from None

    def rewrap_many(self, wrapped: list[bytes], context: Contexts = b"") -> list[bytes]:
        contexts = _derivation_contexts(context, len(wrapped))
        items = [{"ciphertext": c, "context": x} for c, x in zip(self._ciphertexts(wrapped), contexts, strict=True)]
        return [c.encode("ascii") for c in self._batch("rewrap", items, "ciphertext")]

    def wrapped_version(self, wrapped: bytes) -> int:
        return split_wrapped(wrapped, "vault")[0]

    # --- owner keys (crypto-shred) ---------------------------------------------------------------

    def _owned_name(self, owner: str) -> str:
        return self.owned_key_prefix + check_owner(owner)

    def wrap_owned(self, owner: str, dek: bytes, context: bytes = b"") -> bytes:
        # Upsert: transit creates the key (derived, since a context is given) when it does not exist yet.
        item = {"plaintext": _b64(bytes(dek)), "context": _derivation_contexts(context, 1)[0], "type": "aes256-gcm96"}
        return self._batch("encrypt", [item], "ciphertext", self._owned_name(owner))[0].encode("ascii")

    def unwrap_owned(self, owner: str, wrapped: bytes, context: bytes = b"") -> bytes:
        name = self._owned_name(owner)
        item = {"ciphertext": self._ciphertexts([wrapped])[0], "context": _derivation_contexts(context, 1)[0]}
        try:
            plain = self._batch("decrypt", [item], "plaintext", name)[0]
        except CryptoError as exc:
            if isinstance(exc, KeyProviderUnavailable) or "not found" not in str(exc):
                raise
            raise KeyNotFound(f"owner key {name} does not exist (destroyed by an erasure?)") from None
        try:
            return base64.b64decode(plain, validate=True)
        except binascii.Error:
            raise KeyProviderUnavailable(f"Vault at {self.addr} returned a malformed plaintext") from None

    def wrap_owned_many(self, items: Sequence[tuple[str, bytes, bytes]]) -> list[bytes]:
        """One request per owner key (transit batches are per key), ``OWNED_PARALLEL`` in flight: Vault's
        raft log commits concurrent key creations together, so a bulk load is not one fsync per subject."""
        return self._parallel(lambda item: self.wrap_owned(*item), items)

    def unwrap_owned_many(self, items: Sequence[tuple[str, bytes, bytes]]) -> list[bytes]:
        return self._parallel(lambda item: self.unwrap_owned(*item), items)

    def _parallel(self, call: Callable[[tuple[str, bytes, bytes]], bytes],
                  items: Sequence[tuple[str, bytes, bytes]]) -> list[bytes]:
        if len(items) <= 1:
            return [call(item) for item in items]
        with ThreadPoolExecutor(max_workers=min(OWNED_PARALLEL, len(items)), thread_name_prefix="vault") as pool:
            return list(pool.map(call, items))

    def owned_exists(self, owner: str) -> bool:
        try:
            self._key_info(self._owned_name(owner))
        except KeyNotFound:
            return False
        return True

    def destroy_owned(self, owner: str) -> KeyDestruction:
        name = self._owned_name(owner)
        location = f"Vault transit key {self.mount}/keys/{name} at {self.addr}"
        existed = self.owned_exists(owner)
        if existed:
            self._vault.call("post", f"/v1/{self.mount}/keys/{name}/config", f"allowing deletion of {name}",
                             json={"deletion_allowed": True})
            try:
                self._vault.call("delete", f"/v1/{self.mount}/keys/{name}", f"deleting {name}")
            except CryptoError as exc:  # a concurrent destroyer won: the outcome is the same
                if "not found" not in str(exc):
                    raise
        if self.owned_exists(owner):
            raise KeyProviderUnavailable(f"{location} still exists after its deletion")
        return KeyDestruction("vault", location, existed, "transit key deleted (all versions)")

    # --- KEK lifecycle ---------------------------------------------------------------------------

    def _key_info(self, name: str) -> dict[str, Any]:
        return dict(self._vault.call("get", f"/v1/{self.mount}/keys/{name}", f"reading transit key {name}")["data"])

    def kek_version(self) -> int:
        return int(self._key_info(self.kek_name)["latest_version"])

    def rotate_kek(self) -> int:
        body = self._vault.call("post", f"/v1/{self.mount}/keys/{self.kek_name}/rotate", f"rotating {self.kek_name}")
        latest = (body.get("data") or {}).get("latest_version")
        version = int(latest) if latest else self.kek_version()
        log.info("crypto: Vault KEK %s rotated to version %d", self.kek_name, version)
        return version

    def set_min_decryption_version(self, v: int) -> None:
        latest = self.kek_version()
        if not 1 <= v <= latest:
            raise ValueError(f"min_decryption_version must be within 1..{latest}")
        self._vault.call(
            "post",
            f"/v1/{self.mount}/keys/{self.kek_name}/config",
            f"configuring {self.kek_name}",
            json={"min_decryption_version": v},
        )
        log.info("crypto: Vault KEK %s min_decryption_version set to %d", self.kek_name, v)

    # --- signing ---------------------------------------------------------------------------------

    def sign(self, data: bytes) -> bytes:
        body = self._vault.call(
            "post", f"/v1/{self.mount}/sign/{self.signing_key_name}", "signing", json={"input": _b64(bytes(data))}
        )
        _, raw = split_wrapped(str(body["data"]["signature"]).encode("ascii"), "vault")
        return base64.b64decode(raw)

    def _load_public_keys(self) -> dict[int, Ed25519PublicKey]:
        info = self._key_info(self.signing_key_name)
        if info.get("type") != "ed25519":
            raise CryptoError(f"transit key {self.signing_key_name} is {info.get('type')}, not ed25519")
        keys = {
            int(v): Ed25519PublicKey.from_public_bytes(base64.b64decode(k["public_key"]))
            for v, k in info["keys"].items()
        }
        self._public_keys = keys
        return keys

    def verify(self, data: bytes, signature: bytes) -> bool:
        """Check against every public key version; reload them once on failure (the key may have rotated)."""
        if _verifies(self._public_keys or self._load_public_keys(), data, signature):
            return True
        return _verifies(self._load_public_keys(), data, signature)

    def public_key_pem(self) -> bytes:
        keys = self._load_public_keys()
        return keys[max(keys)].public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)

    # --- lifecycle -------------------------------------------------------------------------------

    def health(self) -> None:
        resp = self._vault.send("get", "/v1/sys/health", "health check")
        if resp.status_code not in (200, 429, 473):  # active, standby, performance standby
            raise self._vault.unavailable(resp, "health check")
        self._key_info(self.kek_name)

    def close(self) -> None:
        self._vault.close()
