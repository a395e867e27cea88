"""Vault transit provider against a real OpenBao: round trips, token renewal, outages, policy, bootstrap."""

from __future__ import annotations

import base64
import os
import signal
import time
from collections.abc import Callable

import hvac
import pytest
import requests

from crypto import CryptoError, KeyProviderUnavailable, new_dek
from crypto.providers import VaultTransitProvider
from crypto.vault_setup import bootstrap_vault, render_policy
from tests.crypto.openbao_server import RequestLog, VaultServer, isolated_vault_provider
from tests.freeze import freeze


def test_ten_thousand_keys_wrap_and_unwrap_in_at_most_five_round_trips(vault_server: VaultServer) -> None:
    requests_seen = RequestLog()
    provider = VaultTransitProvider(
        vault_server.addr, vault_server.role_id, vault_server.secret_id, session=requests_seen.session
    )
    deks = [new_dek() for _ in range(10_000)]
    wrapped = provider.wrap_many(deks, b"batch")
    assert provider.unwrap_many(wrapped, b"batch") == deks
    # Everything counted, the AppRole login included.
    assert requests_seen.count() <= 5, requests_seen.paths
    assert requests_seen.count("/encrypt/") + requests_seen.count("/decrypt/") == 4
    provider.close()


def test_token_is_renewed_and_replaced_across_a_short_ttl(vault_server: VaultServer) -> None:
    requests_seen = RequestLog()
    provider = isolated_vault_provider(vault_server, token_ttl="2s", token_max_ttl="4s", session=requests_seen.session)
    dek = new_dek()
    wrapped = provider.wrap(dek)
    started = time.monotonic()
    while time.monotonic() - started < 6.0:  # 3 x the TTL, past the max TTL too
        assert provider.unwrap(wrapped) == dek
        time.sleep(0.2)
    assert requests_seen.count("/auth/token/renew-self") >= 1
    assert requests_seen.count("/auth/approle/login") >= 2  # re-login once the max TTL capped renewal
    provider.close()


def test_stopped_vault_raises_unavailable_within_two_seconds(make_vault: Callable[..., VaultServer]) -> None:
    server = make_vault()
    provider = VaultTransitProvider(server.addr, server.role_id, server.secret_id)
    wrapped = provider.wrap(new_dek())
    server.stop()
    started = time.monotonic()
    with pytest.raises(KeyProviderUnavailable, match="unreachable"):
        provider.unwrap(wrapped)
    assert time.monotonic() - started < 2.0
    with pytest.raises(KeyProviderUnavailable):
        provider.health()


def test_frozen_vault_times_out_instead_of_hanging(make_vault: Callable[..., VaultServer]) -> None:
    server = make_vault()
    provider = VaultTransitProvider(server.addr, server.role_id, server.secret_id, timeout=1.0)
    wrapped = provider.wrap(new_dek())
    freeze(server.process.pid)  # every thread stopped, not just signalled
    try:
        started = time.monotonic()
        with pytest.raises(KeyProviderUnavailable, match="did not answer"):
            provider.unwrap(wrapped)
        assert time.monotonic() - started < 2.0
    finally:
        os.kill(server.process.pid, signal.SIGCONT)


def test_sealed_vault_raises_unavailable(make_vault: Callable[..., VaultServer]) -> None:
    server = make_vault()
    provider = VaultTransitProvider(server.addr, server.role_id, server.secret_id)
    wrapped = provider.wrap(new_dek())
    server.root_client().sys.seal()
    started = time.monotonic()
    with pytest.raises(KeyProviderUnavailable, match="sealed"):
        provider.unwrap(wrapped)
    with pytest.raises(KeyProviderUnavailable, match="sealed"):
        provider.health()
    with pytest.raises(KeyProviderUnavailable):
        VaultTransitProvider(server.addr, server.role_id, server.secret_id).wrap(new_dek())
    assert time.monotonic() - started < 2.0


def test_wrong_approle_credentials_are_reported_as_unavailable(vault_server: VaultServer) -> None:
    provider = VaultTransitProvider(vault_server.addr, vault_server.role_id, "not-the-secret")
    with pytest.raises(KeyProviderUnavailable, match="denied AppRole login"):
        provider.wrap(new_dek())


def _approle_client(server: VaultServer) -> hvac.Client:
    client = hvac.Client(url=server.addr, timeout=5)
    client.auth.approle.login(role_id=server.role_id, secret_id=server.secret_id)
    return client


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("get", "/v1/sys/mounts", None),
        ("get", "/v1/sys/policies/acl/appliance", None),
        ("post", "/v1/sys/seal", {}),
        ("get", "/v1/transit/export/encryption-key/appliance-kek", None),
        ("get", "/v1/transit/export/signing-key/appliance-signing", None),
        ("get", "/v1/transit/backup/appliance-kek", None),
        ("list", "/v1/transit/keys", None),
        ("post", "/v1/transit/keys/brand-new-key", {"type": "aes256-gcm96"}),
        ("post", "/v1/transit/encrypt/upserted-key", {"plaintext": "AAAA"}),
        ("delete", "/v1/transit/keys/appliance-kek", None),
        ("post", "/v1/transit/keys/appliance-kek/trim", {"min_available_version": 1}),
        ("post", "/v1/transit/encrypt/other-key", {"plaintext": "AAAA", "context": "AAAA"}),
        ("post", "/v1/transit/datakey/plaintext/appliance-kek", {"context": "AAAA"}),
        ("post", "/v1/transit/sign/appliance-kek", {"input": "AAAA"}),
        ("post", "/v1/transit/encrypt/appliance-signing", {"plaintext": "AAAA"}),
        ("post", "/v1/transit/keys/appliance-signing/rotate", {}),
        ("post", "/v1/auth/approle/role/appliance/secret-id", {}),
        ("post", "/v1/auth/token/create", {}),
        ("get", "/v1/secret/data/anything", None),
    ],
)
def test_approle_policy_denies_everything_beyond_the_appliance_needs(
    vault_server: VaultServer, method: str, path: str, body: dict[str, str] | None
) -> None:
    vault_server.root_client().secrets.transit.create_key("other-key", derived=True)  # exists for the test
    client = _approle_client(vault_server)
    response = client.adapter.request(method, path, json=body, raise_exception=False)
    status = response.status_code if isinstance(response, requests.Response) else 200
    assert status == 403, f"{method} {path} was allowed"


def test_approle_policy_allows_what_the_appliance_needs(vault_server: VaultServer) -> None:
    client = _approle_client(vault_server)
    ctx = base64.b64encode(b"appliance:").decode()
    for method, path, body in [
        ("get", "/v1/auth/token/lookup-self", None),
        ("post", "/v1/auth/token/renew-self", {}),
        ("get", "/v1/transit/keys/appliance-kek", None),
        ("get", "/v1/transit/keys/appliance-signing", None),
        ("post", "/v1/transit/encrypt/appliance-kek", {"plaintext": "AAAA", "context": ctx}),
        ("post", "/v1/transit/sign/appliance-signing", {"input": "AAAA"}),
    ]:
        response = client.adapter.request(method, path, json=body, raise_exception=False)
        status = response.status_code if isinstance(response, requests.Response) else 200
        assert status == 200, f"{method} {path} was refused ({status})"


def test_bootstrap_is_idempotent_and_installs_the_policy_template(vault_server: VaultServer) -> None:
    role_id, secret_id = bootstrap_vault(vault_server.addr, vault_server.root_token)
    assert role_id == vault_server.role_id and secret_id != vault_server.secret_id
    for secret in (secret_id, vault_server.secret_id):  # a fresh secret_id; earlier ones stay valid
        VaultTransitProvider(vault_server.addr, role_id, secret).health()
    policy = vault_server.root_client().sys.read_policy("appliance")["data"]["rules"]
    assert policy == render_policy("transit", "appliance-kek", "appliance-signing")
    assert "{{" not in policy and 'path "transit/encrypt/appliance-kek"' in policy


def test_bootstrap_refuses_a_kek_of_the_wrong_type(vault_server: VaultServer) -> None:
    vault_server.root_client().secrets.transit.create_key("not-derived-kek")
    with pytest.raises(CryptoError, match="derived"):
        bootstrap_vault(vault_server.addr, vault_server.root_token, kek_name="not-derived-kek", role_name="wrong")


def test_render_policy_rejects_names_that_could_inject_hcl() -> None:
    with pytest.raises(ValueError):
        render_policy("transit", 'kek" {}\npath "sys/*', "signing")


def test_provider_adapts_to_a_server_with_default_json_limits(make_vault: Callable[..., VaultServer]) -> None:
    server = make_vault(json_strings_limit=None)  # OpenBao default: 1000 JSON strings per request
    provider = VaultTransitProvider(server.addr, server.role_id, server.secret_id)
    deks = [new_dek() for _ in range(1000)]
    assert provider.unwrap_many(provider.wrap_many(deks)) == deks
    assert provider.batch_size < 250
