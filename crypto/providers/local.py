"""Local file key provider, for an offline appliance without Vault and for the quick start.

The weaker choice, and it says so at start: the KEK sits on the same disk as the data it protects,
so it only helps against a stolen database dump or backup, not a stolen disk. Prefer Vault transit.

Files in ``key_dir`` (created 0700 on first use; files 0600, refused if group/other can read them):

- ``kek.json``: ``{"format": 1, "latest_version": N, "min_decryption_version": M,
  "keys": {"1": "<base64 32-byte AES key>", ...}}``, replaced atomically on rotate/config.
- ``signing-ed25519.pem``: the Ed25519 signing key, PKCS#8 PEM, unencrypted.
- ``owner-keys.bin``: a 64-byte header (``APPOWNK1``, a big-endian uint64 generation bumped by every
  write, so each process knows when to re-read), then one 64-byte slot per owner key
  (``SHA-256(owner) || 32-byte AES key``); an all-zero slot is free. Destroying a key overwrites its
  slot in place with zeros and fsyncs; a new key reuses the first free slot. Overwriting in place is
  what a file can do: on copy-on-write file systems (btrfs, ZFS) or flash that remaps writes the old
  block may survive physically, one more reason this provider is the weaker choice.

Wrapped format (scheme ``local``, format 1), ASCII like Vault's so both fit the same column::

    b"local:v<N>:" + base64( nonce (12 random bytes) || AES-256-GCM(KEK_N, dek) with 16-byte tag )

The associated data is ``b"local:v<N>:" + context``: the version prefix and the caller's context
are both authenticated.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import stat
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from crypto.errors import AuthenticationError, CryptoError, KeyNotFound, KeyProviderUnavailable
from crypto.providers.base import Contexts, KeyDestruction, KeyProvider, check_owner, contexts_for, split_wrapped

__all__ = ["LocalFileProvider"]

log = logging.getLogger(__name__)

_KEK_FILE = "kek.json"
_SIGNING_FILE = "signing-ed25519.pem"
_LOCK_FILE = ".lock"
_OWNER_FILE = "owner-keys.bin"
_NONCE_SIZE = 12
_SLOT = 64
_OWNED_PREFIX = b"local-owned:v1:"
_OWNER_MAGIC = b"APPOWNK1"


@dataclass(frozen=True)
class _KekState:
    latest_version: int
    min_decryption_version: int
    keys: dict[int, bytes]
    stamp: tuple[int, int]  # (inode, mtime_ns) of kek.json when read


class LocalFileProvider(KeyProvider):
    """KEK versions and an Ed25519 key in 0600 files; same behaviour as the Vault provider otherwise."""

    name = "local"

    def __init__(self, key_dir: Path) -> None:
        self.key_dir = Path(key_dir)
        self._lock = threading.Lock()
        self._owners: tuple[bytes, dict[bytes, tuple[int, bytes]]] | None = None
        log.warning(
            "crypto: using the LOCAL FILE key provider (%s): the KEK is stored on this host's disk, "
            "which is weaker than Vault transit; use it only for offline appliances or the quick start",
            self.key_dir,
        )
        self.key_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        with self._file_lock():
            if not self._path(_KEK_FILE).exists():
                self._write_state(1, 1, {1: AESGCM.generate_key(bit_length=256)})
            if not self._path(_SIGNING_FILE).exists():
                pem = Ed25519PrivateKey.generate().private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                )
                self._write_private(_SIGNING_FILE, pem)
        self._state = self._read_state()
        self._signing_key = self._read_signing_key()

    def __repr__(self) -> str:
        return f"LocalFileProvider(key_dir={str(self.key_dir)!r})"

    # --- files -----------------------------------------------------------------------------------

    def _path(self, name: str) -> Path:
        return self.key_dir / name

    @contextlib.contextmanager
    def _file_lock(self) -> Iterator[None]:
        """Serialise creation and updates across processes (API workers and the CLI share the files)."""
        fd = os.open(self._path(_LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _write_private(self, name: str, data: bytes) -> None:
        """Write a 0600 file atomically: readers see the old or the new file, never half of one."""
        tmp = self._path(f".{name}.tmp")
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self._path(name))
        dir_fd = os.open(self.key_dir, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def _read_private(self, name: str) -> tuple[bytes, os.stat_result]:
        path = self._path(name)
        try:
            with open(path, "rb") as fh:
                info = os.fstat(fh.fileno())
                if stat.S_IMODE(info.st_mode) & 0o077:
                    raise CryptoError(f"{path} is readable by group or others; run: chmod 600 {path}")
                return fh.read(), info
        except OSError as exc:
            raise KeyProviderUnavailable(f"cannot read key file {path}: {exc.strerror}") from None

    def _write_state(self, latest: int, minimum: int, keys: dict[int, bytes]) -> None:
        doc = {
            "format": 1,
            "latest_version": latest,
            "min_decryption_version": minimum,
            "keys": {str(v): base64.b64encode(k).decode() for v, k in sorted(keys.items())},
        }
        self._write_private(_KEK_FILE, json.dumps(doc, indent=2).encode())

    def _read_state(self) -> _KekState:
        raw, info = self._read_private(_KEK_FILE)
        try:
            doc = json.loads(raw)
            if doc.get("format") != 1:
                raise ValueError("unknown format")
            keys = {int(v): base64.b64decode(k, validate=True) for v, k in doc["keys"].items()}
            return _KekState(
                int(doc["latest_version"]), int(doc["min_decryption_version"]), keys, (info.st_ino, info.st_mtime_ns)
            )
        except (ValueError, KeyError, TypeError, binascii.Error):
            raise CryptoError(f"{self._path(_KEK_FILE)} is not a valid KEK file") from None

    def _current(self) -> _KekState:
        """The KEK state, re-read when another process (the CLI) rotated or retired a version."""
        try:
            info = os.stat(self._path(_KEK_FILE))
        except OSError as exc:
            raise KeyProviderUnavailable(f"cannot read key file {self._path(_KEK_FILE)}: {exc.strerror}") from None
        with self._lock:
            if (info.st_ino, info.st_mtime_ns) != self._state.stamp:
                self._state = self._read_state()
            return self._state

    def _read_signing_key(self) -> Ed25519PrivateKey:
        raw, _ = self._read_private(_SIGNING_FILE)
        key = serialization.load_pem_private_key(raw, password=None)
        if not isinstance(key, Ed25519PrivateKey):
            raise CryptoError(f"{self._path(_SIGNING_FILE)} does not hold an Ed25519 key")
        return key

    # --- wrapping --------------------------------------------------------------------------------

    def wrap_many(self, dek_list: list[bytes], context: Contexts = b"") -> list[bytes]:
        state = self._current()
        version = state.latest_version
        prefix = b"local:v%d:" % version
        cipher = AESGCM(state.keys[version])
        out = []
        for dek, ctx in zip(dek_list, contexts_for(context, len(dek_list)), strict=True):
            nonce = os.urandom(_NONCE_SIZE)
            out.append(prefix + base64.b64encode(nonce + cipher.encrypt(nonce, bytes(dek), prefix + ctx)))
        return out

    def unwrap_many(self, wrapped: list[bytes], context: Contexts = b"") -> list[bytes]:
        state = self._current()
        ciphers: dict[int, AESGCM] = {}
        out = []
        for index, (item, ctx) in enumerate(zip(wrapped, contexts_for(context, len(wrapped)), strict=True)):
            version, body = split_wrapped(item, "local")
            if version < state.min_decryption_version:
                raise KeyNotFound(
                    f"item {index}: KEK version {version} is retired "
                    f"(min_decryption_version={state.min_decryption_version})"
                )
            if version not in state.keys:
                raise KeyNotFound(f"item {index}: KEK version {version} does not exist")
            cipher = ciphers.setdefault(version, AESGCM(state.keys[version]))
            try:
                raw = base64.b64decode(body, validate=True)
                out.append(cipher.decrypt(raw[:_NONCE_SIZE], raw[_NONCE_SIZE:], b"local:v%d:" % version + ctx))
            except (InvalidTag, binascii.Error, ValueError):
                raise AuthenticationError(
                    f"item {index}: wrapped key failed authentication (wrong context or tampered)"
                ) from None
        return out

    def rewrap_many(self, wrapped: list[bytes], context: Contexts = b"") -> list[bytes]:
        """Unwrap and wrap in-process: there is no separate key service to keep the DEKs inside."""
        return self.wrap_many(self.unwrap_many(wrapped, context), context)

    def wrapped_version(self, wrapped: bytes) -> int:
        return split_wrapped(wrapped, "local")[0]

    def kek_version(self) -> int:
        return self._current().latest_version

    # --- owner keys (crypto-shred) ---------------------------------------------------------------

    def _owner_fd(self) -> int:
        fd = os.open(self._path(_OWNER_FILE), os.O_RDWR | os.O_CREAT, 0o600)
        if stat.S_IMODE(os.fstat(fd).st_mode) & 0o077:
            os.close(fd)
            raise CryptoError(f"{self._path(_OWNER_FILE)} is readable by group or others")
        return fd

    def _owner_index(self, fd: int) -> dict[bytes, tuple[int, bytes]]:
        """``{digest: (offset, key)}``, re-read only when the header's generation moved (any writer bumps it)."""
        header = os.pread(fd, _SLOT, 0)
        generation = header[8:16] if header[:8] == _OWNER_MAGIC else b""
        if self._owners is not None and self._owners[0] == generation:
            return self._owners[1]
        data = os.pread(fd, os.fstat(fd).st_size, 0)
        index: dict[bytes, tuple[int, bytes]] = {}
        for offset in range(_SLOT, len(data) - len(data) % _SLOT, _SLOT):
            slot = data[offset : offset + _SLOT]
            if any(slot):
                index[slot[:32]] = (offset, slot[32:])
        self._owners = (generation, index)
        return index

    def _owner_keys(self, owners: Sequence[str], create: bool) -> list[bytes | None]:
        """Each owner's key (made when ``create``), under one file lock and at most one fsync for the lot."""
        digests = [hashlib.sha256(check_owner(o).encode()).digest() for o in owners]
        with self._file_lock():
            fd = self._owner_fd()
            try:
                index = self._owner_index(fd)
                missing = [d for d in dict.fromkeys(digests) if d not in index]
                if create and missing:
                    used = {offset for offset, _ in index.values()}
                    size = os.fstat(fd).st_size
                    end = max(_SLOT, size - size % _SLOT)
                    free = (o for o in range(_SLOT, end, _SLOT) if o not in used)
                    writes = []
                    for digest in missing:
                        offset = next(free, None)
                        if offset is None:
                            offset, end = end, end + _SLOT
                        index[digest] = (offset, AESGCM.generate_key(bit_length=256))
                        writes.append((offset, digest + index[digest][1]))
                    self._owner_write(fd, index, writes)
                return [index[d][1] if d in index else None for d in digests]
            finally:
                os.close(fd)

    def _owner_write(self, fd: int, index: dict[bytes, tuple[int, bytes]], slots: list[tuple[int, bytes]]) -> None:
        """Write slots and bump the generation, then fsync: other processes re-read before trusting a cache."""
        header = os.pread(fd, _SLOT, 0)
        generation = int.from_bytes(header[8:16], "big") + 1 if header[:8] == _OWNER_MAGIC else 1
        for offset, slot in slots:
            os.pwrite(fd, slot, offset)
        new_header = _OWNER_MAGIC + generation.to_bytes(8, "big") + bytes(_SLOT - 16)
        os.pwrite(fd, new_header, 0)
        os.fsync(fd)
        self._owners = (new_header[8:16], index)

    def wrap_owned(self, owner: str, dek: bytes, context: bytes = b"") -> bytes:
        return self.wrap_owned_many([(owner, dek, context)])[0]

    def wrap_owned_many(self, items: Sequence[tuple[str, bytes, bytes]]) -> list[bytes]:
        keys = self._owner_keys([owner for owner, _, _ in items], create=True)
        out = []
        for (_, dek, context), key in zip(items, keys, strict=True):
            assert key is not None
            nonce = os.urandom(_NONCE_SIZE)
            sealed = AESGCM(key).encrypt(nonce, bytes(dek), _OWNED_PREFIX + context)
            out.append(_OWNED_PREFIX + base64.b64encode(nonce + sealed))
        return out

    def unwrap_owned(self, owner: str, wrapped: bytes, context: bytes = b"") -> bytes:
        if not bytes(wrapped).startswith(_OWNED_PREFIX):
            raise AuthenticationError("not a local owner-wrapped key")
        key = self._owner_keys([owner], create=False)[0]
        if key is None:
            raise KeyNotFound(f"owner key {owner} does not exist (destroyed by an erasure?)")
        try:
            raw = base64.b64decode(bytes(wrapped)[len(_OWNED_PREFIX) :], validate=True)
            return AESGCM(key).decrypt(raw[:_NONCE_SIZE], raw[_NONCE_SIZE:], _OWNED_PREFIX + context)
        except (InvalidTag, binascii.Error, ValueError):
            raise AuthenticationError("owner-wrapped key failed authentication (wrong context or tampered)") from None

    def owned_exists(self, owner: str) -> bool:
        return self._owner_keys([owner], create=False)[0] is not None

    def destroy_owned(self, owner: str) -> KeyDestruction:
        digest = hashlib.sha256(check_owner(owner).encode()).digest()
        with self._file_lock():
            fd = self._owner_fd()
            try:
                index = self._owner_index(fd)
                found = index.pop(digest, None)
                if found is not None:
                    self._owner_write(fd, index, [(found[0], bytes(_SLOT))])
            finally:
                os.close(fd)
        path = self._path(_OWNER_FILE)
        where = f"slot {found[0] // _SLOT} of {path}" if found is not None else str(path)
        return KeyDestruction("local", where, found is not None, "slot overwritten in place with zeros and fsynced")

    def rotate_kek(self) -> int:
        with self._file_lock():
            state = self._read_state()
            keys = dict(state.keys)
            latest = state.latest_version + 1
            keys[latest] = AESGCM.generate_key(bit_length=256)
            self._write_state(latest, state.min_decryption_version, keys)
        log.info("crypto: local KEK rotated to version %d", latest)
        return latest

    def set_min_decryption_version(self, v: int) -> None:
        with self._file_lock():
            state = self._read_state()
            if not 1 <= v <= state.latest_version:
                raise ValueError(f"min_decryption_version must be within 1..{state.latest_version}")
            # Retired versions are kept in the file, as Vault keeps them, so the change can be undone.
            self._write_state(state.latest_version, v, state.keys)
        log.info("crypto: local KEK min_decryption_version set to %d", v)

    # --- signing ---------------------------------------------------------------------------------

    def sign(self, data: bytes) -> bytes:
        return self._signing_key.sign(bytes(data))

    def verify(self, data: bytes, signature: bytes) -> bool:
        try:
            self._signing_key.public_key().verify(bytes(signature), bytes(data))
        except InvalidSignature:
            return False
        return True

    def public_key_pem(self) -> bytes:
        return self._signing_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    # --- lifecycle -------------------------------------------------------------------------------

    def health(self) -> None:
        state = self._current()
        if state.latest_version not in state.keys:
            raise KeyProviderUnavailable(f"{self._path(_KEK_FILE)} lacks its latest KEK version")

    def close(self) -> None:
        with self._lock:
            self._state = _KekState(0, 0, {}, (0, 0))
            self._owners = None
