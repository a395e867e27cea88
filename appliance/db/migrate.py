"""Ordered SQL migrations, each applied once in its own transaction and recorded with a checksum.

An applied file whose text later changes is refused: the database and the code would disagree
about the schema, and silently re-running or skipping would hide it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import psycopg

LOCK_KEY = 0x6170706C69616E63  # "applianc": one migrator at a time across processes


class MigrationError(RuntimeError):
    """A migration could not be applied, or an applied one was changed."""


@dataclass(frozen=True)
class Migration:
    version: str
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def discover(folder: Path | None = None) -> list[Migration]:
    """Migrations named ``NNNN_name.sql``, in version order."""
    if folder is None:
        base = resources.files("appliance") / "migrations"
        files = [(f.name, f.read_text()) for f in base.iterdir() if f.name.endswith(".sql")]
    else:
        files = [(f.name, f.read_text()) for f in folder.glob("*.sql")]
    out = []
    for fname, text in sorted(files):
        version, _, rest = fname.partition("_")
        if not version.isdigit():
            raise MigrationError(f"migration file {fname!r} must start with a number")
        out.append(Migration(version, rest.removesuffix(".sql"), text))
    versions = [m.version for m in out]
    if len(set(versions)) != len(versions):
        raise MigrationError(f"duplicate migration versions in {versions}")
    return out


def migrate(dsn: str, folder: Path | None = None) -> list[str]:
    """Apply pending migrations; returns the versions applied now (empty when up to date)."""
    migrations = discover(folder)
    applied_now: list[str] = []
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SELECT pg_advisory_lock(%s)", (LOCK_KEY,))
        try:
            conn.execute(
                """CREATE TABLE IF NOT EXISTS schema_migrations (
                       version text PRIMARY KEY,
                       name text NOT NULL,
                       checksum text NOT NULL,
                       applied_at timestamptz NOT NULL DEFAULT now())"""
            )
            applied = dict(conn.execute("SELECT version, checksum FROM schema_migrations").fetchall())
            for m in migrations:
                if m.version in applied:
                    if applied[m.version] != m.checksum:
                        raise MigrationError(
                            f"migration {m.version}_{m.name} was changed after it was applied "
                            f"(checksum {applied[m.version][:12]}… in the database, {m.checksum[:12]}… "
                            "on disk); add a new migration instead of editing an applied one"
                        )
                    continue
                try:
                    with conn.transaction():
                        conn.execute(m.sql)  # type: ignore[arg-type]  # our own files, not input
                        conn.execute(
                            "INSERT INTO schema_migrations (version, name, checksum) VALUES (%s, %s, %s)",
                            (m.version, m.name, m.checksum),
                        )
                except psycopg.Error as exc:
                    raise MigrationError(f"migration {m.version}_{m.name} failed: {exc}") from exc
                applied_now.append(m.version)
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", (LOCK_KEY,))
    return applied_now


def pending(dsn: str, folder: Path | None = None) -> list[str]:
    with psycopg.connect(dsn) as conn:
        exists = conn.execute("SELECT to_regclass('schema_migrations')").fetchone()
        applied = set()
        if exists and exists[0]:
            applied = {r[0] for r in conn.execute("SELECT version FROM schema_migrations")}
    return [m.version for m in discover(folder) if m.version not in applied]
