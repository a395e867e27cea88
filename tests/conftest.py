"""Session fixtures: the real service stack, started once, migrated, and torn down at the end.

Every test that needs a server uses these; nothing is mocked. The stack lives in its own folder
under ``var/test/`` with free ports, so a developer's ``make up`` stack is never touched.
"""

from __future__ import annotations

import os
import shutil
import tomllib
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# The 74 real dlib embeddings live in shared/ beside the checkout (CI lays a copy there too).
FACES = Path(os.environ.get("APPLIANCE_SHARED_DIR", ROOT.parent / "shared")) / "data" / "faces_dlib128.npz"


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """The four real servers (PostgreSQL+pgvector, Valkey, SeaweedFS S3, OpenBao), migrated."""
    from appliance.db.migrate import migrate
    from appliance.stack.manager import Stack
    from appliance.stack.process import free_port
    from appliance.stack.services import StackExtraMissing

    var_dir = ROOT / "var" / "test" / f"{os.getpid()}-{uuid.uuid4().hex[:6]}"
    s = Stack(var_dir, persistent_vault=True, api_port=free_port())
    try:
        s.require_servers()
    except StackExtraMissing as exc:
        pytest.fail(f"the tests run against the local stack: {exc}", pytrace=False)
    try:
        s.up()
        migrate(_load(s.config_file)["database_admin_url"])
        yield s
    finally:
        s.down()
        if os.environ.get("APPLIANCE_KEEP_TEST_VAR") != "1":
            shutil.rmtree(var_dir, ignore_errors=True)


def _load(path: Path) -> dict[str, object]:
    with open(path, "rb") as f:
        return tomllib.load(f)


@pytest.fixture(scope="session")
def settings(stack: object):  # type: ignore[no-untyped-def]
    """Settings pointing at the test stack (what `appliance serve` would read)."""
    from appliance.settings import Settings

    values = _load(stack.config_file)  # type: ignore[attr-defined]
    values.pop("port", None)
    return Settings(**values, log_json=True)


@pytest.fixture(scope="session")
def admin_dsn(settings):  # type: ignore[no-untyped-def]
    return settings.database_admin_url.get_secret_value()


@pytest.fixture(scope="session")
def app(settings):  # type: ignore[no-untyped-def]
    from appliance.api.app import create_app

    return create_app(settings)


@pytest.fixture(scope="session")
def client(app):  # type: ignore[no-untyped-def]
    """An HTTP client bound to the app in-process; the servers behind it are real."""
    from fastapi.testclient import TestClient

    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


@pytest.fixture(scope="session")
def make_key(admin_dsn):  # type: ignore[no-untyped-def]
    """Create an API key with the given scopes; returns the bearer header dict."""
    import psycopg

    from appliance.auth import create_key

    def make(*scopes: str, name: str = "test") -> dict[str, str]:
        with psycopg.connect(admin_dsn) as conn:
            _, token = create_key(conn, name, list(scopes))
        return {"Authorization": f"Bearer {token}"}

    return make


@pytest.fixture(scope="session")
def admin_headers(make_key):  # type: ignore[no-untyped-def]
    return make_key("admin", name="test-admin")


@pytest.fixture(scope="session")
def blind_hashes(settings, admin_dsn):  # type: ignore[no-untyped-def]
    """The ``external_ref_hash`` values of references, as the appliance computes them (tests find rows by them)."""
    import psycopg

    from appliance import clients
    from appliance.blind_index import BlindIndex

    index = BlindIndex(clients.key_provider(settings))

    def digests(refs: list[str]) -> list[bytes]:
        with psycopg.connect(admin_dsn) as conn:
            return index.digests(conn, refs)

    return digests
