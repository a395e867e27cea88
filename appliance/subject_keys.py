"""Per-subject DEKs: created on first use, stored only wrapped by the KEK, unwrapped into a cache.

Everything sealed for a subject (raw encodings, display label, linked media) uses this one DEK, so
deleting the ``subject_keys`` row is the crypto-shred of the whole subject (DESIGN.md, "Data model").
The wrap context binds the wrapped DEK to its subject: a wrapped key copied to another row fails.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

import psycopg

from crypto.dek_cache import DekCache
from crypto.providers.base import KeyProvider
from crypto.seal import new_dek


@dataclass(frozen=True)
class SubjectKey:
    key_id: uuid.UUID
    dek: bytes

    def __repr__(self) -> str:  # never print key material
        return f"SubjectKey(key_id={self.key_id})"


class SubjectKeyNotFound(LookupError):
    """The subject has no key: never enrolled, or crypto-shredded by erasure."""


def wrap_context(subject_id: uuid.UUID) -> bytes:
    return b"subject-dek:" + subject_id.bytes


class SubjectKeys:
    """Get-or-create subject DEKs inside the caller's transaction, through one DEK cache."""

    def __init__(self, provider: KeyProvider, cache: DekCache) -> None:
        self.provider = provider
        self.cache = cache

    def get_or_create(self, conn: psycopg.Connection, subject_id: uuid.UUID) -> SubjectKey:
        """Within ``conn``'s transaction; a concurrent creator for the same subject wins once."""
        existing = self.get(conn, subject_id, missing_ok=True)
        if existing is not None:
            return existing
        dek = new_dek()
        wrapped = self.provider.wrap(dek, wrap_context(subject_id))
        key_id = uuid.uuid4()
        row = conn.execute(
            """INSERT INTO subject_keys (subject_id, key_id, wrapped_dek, kek_version)
               VALUES (%s, %s, %s, %s) ON CONFLICT (subject_id) DO NOTHING RETURNING key_id""",
            (subject_id, key_id, wrapped, self.provider.wrapped_version(wrapped)),
        ).fetchone()
        if row is None:  # lost the race: use the winner's key
            found = self.get(conn, subject_id)
            assert found is not None
            return found
        self.cache.put(subject_id, key_id.bytes + dek)
        return SubjectKey(key_id, dek)

    def get(self, conn: psycopg.Connection, subject_id: uuid.UUID, missing_ok: bool = False) -> SubjectKey | None:
        cached = self.cache.get(subject_id)  # key_id (16 bytes) || DEK (32 bytes)
        if cached is not None:
            return SubjectKey(uuid.UUID(bytes=cached[:16]), cached[16:])
        row = conn.execute(
            "SELECT key_id, wrapped_dek FROM subject_keys WHERE subject_id = %s", (subject_id,)
        ).fetchone()
        if row is None:
            if missing_ok:
                return None
            raise SubjectKeyNotFound(str(subject_id))
        key = SubjectKey(row[0], self.provider.unwrap(bytes(row[1]), wrap_context(subject_id)))
        self.cache.put(subject_id, key.key_id.bytes + key.dek)
        return key

    def evict(self, subject_id: uuid.UUID) -> None:
        self.cache.evict(subject_id)
