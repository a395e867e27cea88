"""Per-subject DEKs, each wrapped by the subject's own owner key; destroying that key is the crypto-shred.

Everything sealed for a subject (raw encodings, display label, external reference, linked media) uses
this one DEK. The DEK is stored only wrapped by an owner key that belongs to this subject alone
(``crypto.providers.base``, "Owner keys"), so erasure destroys that key in the key provider: every
copy of the wrapped DEK (dead tuples, WAL, backups) then opens for nobody, the appliance included,
while other subjects stay restorable from the same backups. The wrap context binds the wrapped DEK to
its subject: a wrapped key copied to another row fails.

Rows written before migration 0008 are wrapped by the shared KEK (``scheme = 'kek'``);
``upgrade_legacy_keys`` moves them to owner keys. Copies of those old KEK-wrapped values stay in old
WAL and backups until the KEK versions that wrapped them are destroyed (docs: "Security").
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from dataclasses import dataclass

import psycopg

from crypto.dek_cache import DekCache
from crypto.providers.base import KeyDestruction, KeyProvider
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


def owner_name(subject_id: uuid.UUID) -> str:
    """The subject's owner-key name in the provider (a Vault transit key ``<prefix>subject-<uuid>``)."""
    return f"subject-{subject_id}"


class SubjectKeys:
    """Get-or-create subject DEKs inside the caller's transaction, through one DEK cache."""

    def __init__(self, provider: KeyProvider, cache: DekCache) -> None:
        self.provider = provider
        self.cache = cache

    def get_or_create(self, conn: psycopg.Connection, subject_id: uuid.UUID) -> SubjectKey:
        """Within ``conn``'s transaction; a concurrent creator for the same subject wins once."""
        return self.get_or_create_many(conn, [subject_id])[subject_id]

    def get_or_create_many(
        self, conn: psycopg.Connection, subject_ids: Iterable[uuid.UUID]
    ) -> dict[uuid.UUID, SubjectKey]:
        """Keys of many subjects (bulk enrolment): cached ones free, stored ones unwrapped, missing ones made.

        Each owner key is its own key in the provider, so an uncached subject costs one round trip; the
        provider overlaps them (``wrap_owned_many``/``unwrap_owned_many``).
        """
        wanted = list(dict.fromkeys(subject_ids))
        out = {sid: key for sid in wanted if (key := self._cached(sid)) is not None}
        todo = [sid for sid in wanted if sid not in out]
        if not todo:
            return out
        rows = conn.execute(
            "SELECT subject_id, key_id, wrapped_dek, scheme FROM subject_keys WHERE subject_id = ANY(%s)", (todo,)
        ).fetchall()
        owned = [(sid, key_id, bytes(w)) for sid, key_id, w, scheme in rows if scheme == "owner"]
        deks = self.provider.unwrap_owned_many([(owner_name(s), w, wrap_context(s)) for s, _, w in owned])
        for (sid, key_id, _), dek in zip(owned, deks, strict=True):
            self.cache.put(sid, key_id.bytes + dek)
            out[sid] = SubjectKey(key_id, dek)
        for sid, key_id, wrapped, scheme in rows:
            if scheme != "owner":
                out[sid] = self._open(sid, key_id, bytes(wrapped), scheme)
        new = [sid for sid in todo if sid not in out]
        fresh = [new_dek() for _ in new]
        wrapped_new = self.provider.wrap_owned_many(
            [(owner_name(sid), dek, wrap_context(sid)) for sid, dek in zip(new, fresh, strict=True)])
        for sid, dek, wrapped in zip(new, fresh, wrapped_new, strict=True):
            key_id = uuid.uuid4()
            row = conn.execute(  # kek_version 0: not under the KEK, so KEK rotation leaves the row alone
                """INSERT INTO subject_keys (subject_id, key_id, wrapped_dek, kek_version, scheme)
                   VALUES (%s, %s, %s, 0, 'owner') ON CONFLICT (subject_id) DO NOTHING RETURNING key_id""",
                (sid, key_id, wrapped),
            ).fetchone()
            if row is None:  # lost the race: the winner wrapped under the same owner key
                out[sid] = self.get(conn, sid)  # type: ignore[assignment]
            else:
                self.cache.put(sid, key_id.bytes + dek)
                out[sid] = SubjectKey(key_id, dek)
        return out

    def get(self, conn: psycopg.Connection, subject_id: uuid.UUID, missing_ok: bool = False) -> SubjectKey | None:
        cached = self._cached(subject_id)
        if cached is not None:
            return cached
        row = conn.execute(
            "SELECT key_id, wrapped_dek, scheme FROM subject_keys WHERE subject_id = %s", (subject_id,)
        ).fetchone()
        if row is None:
            if missing_ok:
                return None
            raise SubjectKeyNotFound(str(subject_id))
        return self._open(subject_id, row[0], bytes(row[1]), row[2])

    def destroy(self, subject_id: uuid.UUID) -> KeyDestruction:
        """The crypto-shred: destroy the subject's owner key in the provider and forget the cached DEK."""
        self.cache.evict(subject_id)
        return self.provider.destroy_owned(owner_name(subject_id))

    def evict(self, subject_id: uuid.UUID) -> None:
        self.cache.evict(subject_id)

    def _cached(self, subject_id: uuid.UUID) -> SubjectKey | None:
        cached = self.cache.get(subject_id)  # key_id (16 bytes) || DEK (32 bytes)
        return None if cached is None else SubjectKey(uuid.UUID(bytes=cached[:16]), cached[16:])

    def _open(self, subject_id: uuid.UUID, key_id: uuid.UUID, wrapped: bytes, scheme: str) -> SubjectKey:
        if scheme == "owner":
            dek = self.provider.unwrap_owned(owner_name(subject_id), wrapped, wrap_context(subject_id))
        else:
            dek = self.provider.unwrap(wrapped, wrap_context(subject_id))
        self.cache.put(subject_id, key_id.bytes + dek)
        return SubjectKey(key_id, dek)


def upgrade_legacy_keys(conn: psycopg.Connection, provider: KeyProvider, batch: int = 500) -> int:
    """Re-wrap KEK-wrapped subject DEKs (before migration 0008) under owner keys; returns how many moved.

    Idempotent and resumable: each batch commits on its own; a row already moved is skipped.
    """
    moved = 0
    while True:
        with conn.transaction():
            rows = conn.execute(
                """SELECT subject_id, wrapped_dek FROM subject_keys WHERE scheme = 'kek'
                   ORDER BY subject_id LIMIT %s FOR UPDATE SKIP LOCKED""", (batch,)).fetchall()
            if not rows:
                return moved
            deks = provider.unwrap_many([bytes(r[1]) for r in rows], [wrap_context(r[0]) for r in rows])
            for (sid, _), dek in zip(rows, deks, strict=True):
                wrapped = provider.wrap_owned(owner_name(sid), dek, wrap_context(sid))
                conn.execute("""UPDATE subject_keys SET wrapped_dek = %s, scheme = 'owner', kek_version = 0
                                WHERE subject_id = %s""", (wrapped, sid))
            moved += len(rows)
