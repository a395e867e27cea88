"""An API of its own over its own PostgreSQL and S3 (Redis and Vault from the session stack), for the
tests that freeze a server: freezing the session stack's would stall every other test's requests."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import psycopg
import pytest

from appliance.stack.services import ObjectStore, Postgres
from tests.appliance.own_servers import settings_with, start_object_store, start_postgres


@dataclass
class Isolated:
    client: Any  # fastapi.testclient.TestClient
    headers: dict[str, str]
    settings: Any
    pg: Postgres
    s3: ObjectStore
    admin_dsn: str


@pytest.fixture(scope="session")
def isolated(stack, settings) -> Iterator[Isolated]:  # type: ignore[no-untyped-def]
    from fastapi.testclient import TestClient

    from appliance.api.app import create_app
    from appliance.auth import create_key

    root = stack.var_dir / "isolated"
    pg = s3 = None
    try:
        pg, dsn, admin = start_postgres(root)
        s3 = start_object_store(root)
        # Its own PostgreSQL, so its own Redis database: the change feed's sequence numbers and tombstones
        # belong to one PostgreSQL (following the session's stream would make it re-sync for nothing).
        redis_url = settings.redis_url.get_secret_value().rsplit("/", 1)[0] + "/6"
        own = settings_with(settings, var_dir=root / "var", database_url=dsn, database_admin_url=admin,
                            redis_url=redis_url, s3_endpoint=s3.endpoint(), s3_access_key=s3.state["access_key"],
                            s3_secret_key=s3.secret_key)
        with psycopg.connect(admin) as conn:
            _, token = create_key(conn, "isolated", ["admin"])
        with TestClient(create_app(own), raise_server_exceptions=False) as client:
            yield Isolated(client, {"Authorization": f"Bearer {token}"}, own, pg, s3, admin)
    finally:
        for server in (s3, pg):
            if server is not None:
                server.stop()
        shutil.rmtree(root, ignore_errors=True)
