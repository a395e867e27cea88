"""`appliance backup create` then `restore` into a fresh PostgreSQL gives the same data back."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import psycopg
import pytest
from pydantic import SecretStr

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


def _wait_matchable(client, headers, body, timeout: float = 30.0):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while True:
        r = client.post("/v1/match", json=body, headers=headers)
        if r.status_code == 200 or time.monotonic() > deadline:
            return r
        time.sleep(0.2)


def test_matches_still_work_on_an_appliance_restored_from_backup(settings, admin_dsn, client, make_key,
                                                                  fresh_postgres) -> None:  # type: ignore[no-untyped-def]
    """Disaster recovery: same Vault and object store, a new database restored from the backup."""
    from fastapi.testclient import TestClient

    from appliance.api.app import create_app

    rng = np.random.default_rng(7)
    vector = rng.normal(size=128).tolist()
    headers = make_key("admin")
    subject = client.post("/v1/subjects", json={"label": "restored person"}, headers=headers).json()["id"]
    enrolled = client.post(f"/v1/subjects/{subject}/encodings",
                           json={"model": "dlib-resnet-v1", "vectors": [vector]}, headers=headers)
    assert enrolled.status_code == 201, enrolled.text
    query = {"model": "dlib-resnet-v1", "embedding": vector}
    assert _wait_matchable(client, headers, query).json()["subject_id"] == subject

    forgotten = client.post("/v1/subjects", json={"label": "erased after the backup"}, headers=headers).json()["id"]
    assert client.post(f"/v1/subjects/{forgotten}/encodings", headers=headers,
                       json={"model": "dlib-resnet-v1", "vectors": [rng.normal(size=128).tolist()]}).status_code == 201

    s3, keys = clients.s3_client(settings), clients.key_provider(settings)
    info = create_backup(admin_dsn, s3, settings.s3_backup_bucket, keys)
    assert client.delete(f"/v1/subjects/{forgotten}", headers=headers).status_code in (200, 202)
    restore_backup(fresh_postgres.dsn(db="appliance"), s3, settings.s3_backup_bucket, keys, info.key)
    with psycopg.connect(fresh_postgres.dsn(db="appliance")) as conn:  # the erasure is replayed on restore
        assert conn.execute("SELECT state FROM subjects WHERE id = %s", (forgotten,)).fetchone()[0] == "erased"
        assert conn.execute("SELECT count(*) FROM subject_keys WHERE subject_id = %s", (forgotten,)).fetchone()[0] == 0
        assert conn.execute("SELECT count(*) FROM encodings WHERE subject_id = %s", (forgotten,)).fetchone()[0] == 0
    with psycopg.connect(fresh_postgres.dsn(), autocommit=True) as conn:
        conn.execute("CREATE ROLE appliance LOGIN PASSWORD 'restored-test-only' IN ROLE appliance_rw")
    assert _counts(fresh_postgres.dsn(db="appliance")) == _counts(admin_dsn)

    restored = settings.model_copy(update={
        "database_url": SecretStr(fresh_postgres.dsn("appliance", "restored-test-only", "appliance")),
        "database_admin_url": SecretStr(fresh_postgres.dsn(db="appliance")),
        "var_dir": settings.var_dir / "restored",
    })
    with TestClient(create_app(restored), raise_server_exceptions=False) as restored_client:
        r = _wait_matchable(restored_client, headers, query)
        assert r.status_code == 200, r.text
        assert r.json()["decision"] == "match" and r.json()["subject_id"] == subject
