"""Migrations: re-running is a no-op; an applied file that changed is refused."""

from __future__ import annotations

import shutil
from importlib import resources
from pathlib import Path

import psycopg
import pytest

from appliance.db.migrate import MigrationError, discover, migrate


def test_rerunning_migrations_is_a_noop(admin_dsn: str) -> None:
    assert migrate(admin_dsn) == []
    with psycopg.connect(admin_dsn) as conn:
        versions = [r[0] for r in conn.execute("SELECT version FROM schema_migrations ORDER BY 1")]
    assert versions == [m.version for m in discover()]


def test_changed_applied_migration_is_refused(admin_dsn: str, tmp_path: Path) -> None:
    src = Path(str(resources.files("appliance") / "migrations"))
    for f in src.glob("*.sql"):
        shutil.copy(f, tmp_path / f.name)
    first = sorted(tmp_path.glob("*.sql"))[0]
    first.write_text(first.read_text() + "\n-- edited after it was applied\n")
    with pytest.raises(MigrationError, match="was changed after it was applied"):
        migrate(admin_dsn, tmp_path)


def test_new_migration_is_applied_once_in_a_transaction(admin_dsn: str, tmp_path: Path) -> None:
    src = Path(str(resources.files("appliance") / "migrations"))
    for f in src.glob("*.sql"):
        shutil.copy(f, tmp_path / f.name)
    (tmp_path / "9998_broken.sql").write_text("CREATE TABLE t_half (x int); SELECT no_such_function();")
    with pytest.raises(MigrationError, match="9998_broken failed"):
        migrate(admin_dsn, tmp_path)
    with psycopg.connect(admin_dsn) as conn:
        assert conn.execute("SELECT to_regclass('t_half')").fetchone()[0] is None  # rolled back
    (tmp_path / "9998_broken.sql").unlink()
    (tmp_path / "9999_probe.sql").write_text("CREATE TABLE t_probe (x int);")
    try:
        assert migrate(admin_dsn, tmp_path) == ["9999"]
        assert migrate(admin_dsn, tmp_path) == []
    finally:
        with psycopg.connect(admin_dsn) as conn:
            conn.execute("DROP TABLE t_probe")
            conn.execute("DELETE FROM schema_migrations WHERE version = '9999'")


def test_service_role_cannot_change_the_audit_log(settings) -> None:  # type: ignore[no-untyped-def]
    with psycopg.connect(settings.database_url.get_secret_value()) as conn:
        for stmt in ("UPDATE audit_log SET outcome = 'x'", "DELETE FROM audit_log", "TRUNCATE audit_log"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(stmt)
            conn.rollback()
