"""Blind index: a keyed hash finds a subject by its external reference without storing the reference.

``external_ref`` is PII, so it is stored sealed with the subject's DEK (erased with the subject) and
looked up through ``HMAC-SHA256(lookup key, "external-ref" || ref)``. The 32-byte lookup key is made on
first use and stored only wrapped by the KEK (``lookup_keys``, rewrapped by KEK rotation like any
other wrapped key). What a stale hash still allows, honestly: someone holding the database *and* the
KEK can test a guessed reference against it; it never yields the reference itself.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import threading

import psycopg

from crypto.providers.base import KeyProvider

NAME = "external_ref"


def lookup_context(name: str) -> bytes:
    """Wrap context of a lookup key: a wrapped key copied to another row fails to open."""
    return b"lookup-key:" + name.encode()


class BlindIndex:
    """The process's lookup key, unwrapped once; ``digest`` is what the ``external_ref_hash`` column holds."""

    def __init__(self, provider: KeyProvider) -> None:
        self.provider = provider
        self._key: bytes | None = None
        self._lock = threading.Lock()

    def digest(self, conn: psycopg.Connection, ref: str) -> bytes:
        return hmac.new(self._lookup_key(conn), b"external-ref\x00" + ref.encode(), hashlib.sha256).digest()

    def digests(self, conn: psycopg.Connection, refs: list[str]) -> list[bytes]:
        return [self.digest(conn, r) for r in refs]

    def _lookup_key(self, conn: psycopg.Connection) -> bytes:
        """Read (and cache) the key; create it inside the caller's transaction when there is none.

        A key this transaction created is not cached: if the transaction rolls back, so does the key.
        """
        if self._key is not None:
            return self._key
        with self._lock:
            if self._key is not None:
                return self._key
            row = conn.execute("SELECT wrapped_key FROM lookup_keys WHERE name = %s", (NAME,)).fetchone()
            if row is not None:
                self._key = self.provider.unwrap(bytes(row[0]), lookup_context(NAME))
                return self._key
            key = os.urandom(32)
            wrapped = self.provider.wrap(key, lookup_context(NAME))
            created = conn.execute(
                """INSERT INTO lookup_keys (name, wrapped_key, kek_version) VALUES (%s, %s, %s)
                   ON CONFLICT (name) DO NOTHING RETURNING name""",
                (NAME, wrapped, self.provider.wrapped_version(wrapped))).fetchone()
            if created is not None:
                return key
            row = conn.execute("SELECT wrapped_key FROM lookup_keys WHERE name = %s", (NAME,)).fetchone()
            self._key = self.provider.unwrap(bytes(row[0]), lookup_context(NAME))
            return self._key
