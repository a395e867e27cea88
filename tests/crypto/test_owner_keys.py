"""Owner keys, the crypto-shred: one destroyable key per subject, in both providers.

Destroying an owner key must make every stored copy of what it wrapped unopenable (the value is
kept here, as a dead tuple or a backup would keep it) while other owners' keys keep working.
"""

from __future__ import annotations

import pytest
import requests

from crypto.errors import AuthenticationError, KeyNotFound
from crypto.providers import KeyProvider, LocalFileProvider
from crypto.seal import new_dek
from tests.crypto.openbao_server import VaultServer, isolated_vault_provider


def test_owned_wrap_round_trips_and_binds_its_context(provider: KeyProvider) -> None:
    dek = new_dek()
    wrapped = provider.wrap_owned("subject-a", dek, b"ctx-a")
    assert provider.unwrap_owned("subject-a", wrapped, b"ctx-a") == dek
    with pytest.raises(AuthenticationError):
        provider.unwrap_owned("subject-a", wrapped, b"ctx-b")
    assert provider.owned_exists("subject-a")


def test_each_owner_has_its_own_key(provider: KeyProvider) -> None:
    dek = new_dek()
    wrapped = provider.wrap_owned("subject-a", dek, b"c")
    provider.wrap_owned("subject-b", new_dek(), b"c")
    with pytest.raises((AuthenticationError, KeyNotFound)):
        provider.unwrap_owned("subject-b", wrapped, b"c")


def test_destroyed_owner_key_leaves_stale_copies_unopenable_and_others_intact(provider: KeyProvider) -> None:
    victim, other = new_dek(), new_dek()
    stale = provider.wrap_owned("subject-victim", victim, b"c")  # as a dead tuple or a backup keeps it
    kept = provider.wrap_owned("subject-other", other, b"c")
    done = provider.destroy_owned("subject-victim")
    assert done.existed and done.provider == provider.name
    assert not provider.owned_exists("subject-victim")
    with pytest.raises(KeyNotFound):
        provider.unwrap_owned("subject-victim", stale, b"c")
    assert provider.unwrap_owned("subject-other", kept, b"c") == other
    again = provider.destroy_owned("subject-victim")  # idempotent: reported, not an error
    assert not again.existed


def test_a_new_key_for_a_destroyed_owner_does_not_open_the_old_copies(provider: KeyProvider) -> None:
    stale = provider.wrap_owned("subject-x", new_dek(), b"c")
    provider.destroy_owned("subject-x")
    provider.wrap_owned("subject-x", new_dek(), b"c")
    with pytest.raises(AuthenticationError):
        provider.unwrap_owned("subject-x", stale, b"c")


def test_owner_names_are_checked(provider: KeyProvider) -> None:
    for bad in ("", "Subject", "a/b", "a*", "x" * 101):
        with pytest.raises(ValueError):
            provider.wrap_owned(bad, new_dek(), b"")


def test_local_destroy_overwrites_the_key_bytes_in_place(tmp_path) -> None:  # type: ignore[no-untyped-def]
    provider = LocalFileProvider(tmp_path / "keys")
    provider.wrap_owned("subject-a", new_dek(), b"")
    provider.wrap_owned("subject-b", new_dek(), b"")
    path = tmp_path / "keys" / "owner-keys.bin"
    before = path.read_bytes()
    inode = path.stat().st_ino
    slot = before[128:192]  # header, then subject-a, then subject-b
    provider.destroy_owned("subject-b")
    after = path.read_bytes()
    assert path.stat().st_ino == inode  # same file: overwritten in place, not replaced
    assert slot[32:] not in after and after[128:192] == bytes(64)
    # another process sees the destruction at once (the header's generation moved)
    other = LocalFileProvider(tmp_path / "keys")
    assert other.owned_exists("subject-a") and not other.owned_exists("subject-b")


def test_vault_owner_key_is_a_transit_key_the_appliance_may_delete_but_not_its_kek(
    vault_server: VaultServer,
) -> None:
    provider = isolated_vault_provider(vault_server)
    try:
        provider.wrap_owned("subject-a", new_dek(), b"c")
        name = provider.owned_key_prefix + "subject-a"
        root = {"X-Vault-Token": vault_server.root_token}
        assert requests.get(f"{vault_server.addr}/v1/transit/keys/{name}", headers=root, timeout=5).status_code == 200
        provider.destroy_owned("subject-a")
        assert requests.get(f"{vault_server.addr}/v1/transit/keys/{name}", headers=root, timeout=5).status_code == 404
        # The same AppRole token cannot make the KEK deletable, nor delete it.
        token = provider._vault._client.token
        app = {"X-Vault-Token": token}
        kek = provider.kek_name
        cfg = requests.post(f"{vault_server.addr}/v1/transit/keys/{kek}/config", headers=app,
                            json={"deletion_allowed": True}, timeout=5)
        assert cfg.status_code in (200, 204)  # min_decryption_version needs config; deletion is refused below
        gone = requests.delete(f"{vault_server.addr}/v1/transit/keys/{kek}", headers=app, timeout=5)
        assert gone.status_code == 403
        assert provider.kek_version() >= 1
    finally:
        provider.close()


def test_many_owner_keys_are_made_and_opened_in_one_call(provider: KeyProvider) -> None:
    owners = [f"subject-many-{i}" for i in range(20)]
    deks = [new_dek() for _ in owners]
    wrapped = provider.wrap_owned_many([(o, d, o.encode()) for o, d in zip(owners, deks, strict=True)])
    assert provider.unwrap_owned_many([(o, w, o.encode()) for o, w in zip(owners, wrapped, strict=True)]) == deks
    provider.destroy_owned(owners[3])
    with pytest.raises(KeyNotFound):  # one destroyed key fails the whole call, naming no value
        provider.unwrap_owned_many([(o, w, o.encode()) for o, w in zip(owners, wrapped, strict=True)])
    assert provider.unwrap_owned(owners[4], wrapped[4], owners[4].encode()) == deks[4]
