"""`appliance backup create` then `restore` into a fresh PostgreSQL gives the same data back."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from appliance import clients
from appliance.backup import BackupError, create_backup, list_backups, restore_backup
from appliance.stack.process import free_port
from appliance.stack.services import Postgres

TABLES = ("subjects", "subject_keys", "encodings", "template_keys", "media", "api_keys", "schema_migrations")


@pytest.fixture
def fresh_postgres(tmp_path: Path) -> Iterator[Postgres]:
    """A second, empty PostgreSQL server: the 'new host' of a disaster recovery."""
    pg = Postgres(tmp_path / "dr", {})
    pg.allocate(lambda: free_port())
    pg.start()
    with psycopg.connect(pg.dsn(), autocommit=True) as conn:
        conn.execute("CREATE ROLE appliance_rw NOLOGIN")
        conn.execute("CREATE DATABASE appliance")
    try:
        yield pg
    finally:
        pg.stop()


def _counts(dsn: str) -> dict[str, int]:
    with psycopg.connect(dsn) as conn:
        return {t: conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in TABLES}


def test_backup_then_restore_into_a_fresh_database_keeps_every_row(settings, admin_dsn, client, admin_headers,
                                                                   fresh_postgres) -> None:  # type: ignore[no-untyped-def]
    with psycopg.connect(admin_dsn) as conn:
        for _ in range(3):
            conn.execute("INSERT INTO subjects (id) VALUES (%s)", (uuid.uuid4(),))
    s3, keys = clients.s3_client(settings), clients.key_provider(settings)
    info = create_backup(admin_dsn, s3, settings.s3_backup_bucket, keys)
    assert info.key in [b.key for b in list_backups(s3, settings.s3_backup_bucket)]

    raw = s3.get_object(settings.s3_backup_bucket, info.key).read()
    assert b"CREATE TABLE" not in raw and b"subjects" not in raw  # sealed, not a readable dump

    target = fresh_postgres.dsn(db="appliance")
    assert restore_backup(target, s3, settings.s3_backup_bucket, keys, info.key) == info.key
    assert _counts(target) == _counts(admin_dsn)

    with pytest.raises(BackupError, match="not empty"):
        restore_backup(target, s3, settings.s3_backup_bucket, keys, info.key)
