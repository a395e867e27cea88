"""The service's PostgreSQL pool; every multi-statement write runs inside ``conn.transaction()``."""

from __future__ import annotations

import contextlib

import psycopg
from pgvector.psycopg import register_vector
from psycopg import Connection
from psycopg_pool import ConnectionPool

from appliance.settings import Settings


def _configure(conn: Connection) -> None:
    # Before the first migration the vector type does not exist yet; readiness still works.
    with contextlib.suppress(psycopg.ProgrammingError):
        register_vector(conn)
    conn.rollback()
    conn.execute("SET application_name = 'appliance'")
    conn.commit()


def open_pool(settings: Settings, wait: bool = False) -> ConnectionPool:
    """Open the pool lazily so the API starts (and reports not-ready) while PostgreSQL is down."""
    pool = ConnectionPool(
        settings.database_url.get_secret_value(),
        min_size=settings.db_pool_min,
        max_size=settings.db_pool_max,
        kwargs={"connect_timeout": settings.db_connect_timeout},
        configure=_configure,
        timeout=settings.db_connect_timeout,
        reconnect_timeout=0,
        open=False,
        name="appliance",
    )
    pool.open(wait=wait)
    return pool


def admin_dsn(settings: Settings) -> str:
    """The owner DSN for migrations; falls back to the service DSN when no owner is configured."""
    url = settings.database_admin_url or settings.database_url
    return url.get_secret_value()
