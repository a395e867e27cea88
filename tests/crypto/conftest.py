"""Fixtures for the crypto tests: a real OpenBao server (dev mode, in memory) and both key providers.

``vault_server`` starts one OpenBao per session. Its API listener raises ``max_request_json_strings``
(as the stack and Ansible must) so transit batches of 5,000 keys pass; the dev listener beside it keeps
OpenBao's defaults and is unused. Tests that seal or stop a server start their own with ``make_vault``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from crypto.providers import KeyProvider, LocalFileProvider
from tests.crypto.openbao_server import VaultServer, isolated_vault_provider, start_openbao


@pytest.fixture(scope="session")
def vault_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VaultServer]:
    """One OpenBao for the session, bootstrapped with the default names (appliance-kek, ...)."""
    server = start_openbao(tmp_path_factory.mktemp("openbao"))
    yield server
    server.stop()


@pytest.fixture
def make_vault(tmp_path: Path) -> Iterator[Callable[..., VaultServer]]:
    """Start throwaway servers for tests that seal, stop or freeze them; all are killed afterwards."""
    started: list[VaultServer] = []

    def make(**kwargs: object) -> VaultServer:
        server = start_openbao(tmp_path / f"bao{len(started)}", **kwargs)  # type: ignore[arg-type]
        started.append(server)
        return server

    yield make
    for server in started:
        server.stop()


@pytest.fixture(params=["local", "vault"])
def provider(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[KeyProvider]:
    """Each provider in turn: the whole suite in test_key_providers.py runs against both."""
    if request.param == "local":
        instance: KeyProvider = LocalFileProvider(tmp_path / "keys")
    else:
        instance = isolated_vault_provider(request.getfixturevalue("vault_server"))
    yield instance
    instance.close()
