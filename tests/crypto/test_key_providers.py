"""The KeyProvider contract, proved for LocalFileProvider and VaultTransitProvider (real OpenBao)."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from crypto import AuthenticationError, KeyNotFound, new_dek
from crypto.providers import KeyProvider


def test_provider_satisfies_the_protocol(provider: KeyProvider) -> None:
    assert isinstance(provider, KeyProvider)
    assert provider.name in ("local", "vault")


def test_wrap_unwrap_round_trip(provider: KeyProvider) -> None:
    dek = new_dek()
    wrapped = provider.wrap(dek, b"subject:42")
    assert dek not in wrapped
    assert wrapped.startswith(f"{provider.name}:v1:".encode())
    assert provider.unwrap(wrapped, b"subject:42") == dek


def test_batch_round_trip_keeps_order(provider: KeyProvider) -> None:
    deks = [new_dek() for _ in range(300)]
    wrapped = provider.wrap_many(deks, b"ctx")
    assert len(set(wrapped)) == len(wrapped)
    assert provider.unwrap_many(wrapped, b"ctx") == deks


def test_per_item_contexts_are_bound_to_each_item(provider: KeyProvider) -> None:
    deks = [new_dek() for _ in range(3)]
    contexts = [b"subject:1", b"subject:2", b"subject:3"]
    wrapped = provider.wrap_many(deks, contexts)
    assert provider.unwrap_many(wrapped, contexts) == deks
    with pytest.raises(AuthenticationError):
        provider.unwrap_many(wrapped, list(reversed(contexts)))


def test_empty_batches_cost_nothing(provider: KeyProvider) -> None:
    assert provider.wrap_many([]) == []
    assert provider.unwrap_many([]) == []
    assert provider.rewrap_many([]) == []


def test_wrong_context_fails_authentication(provider: KeyProvider) -> None:
    wrapped = provider.wrap(new_dek(), b"subject:1")
    with pytest.raises(AuthenticationError):
        provider.unwrap(wrapped, b"subject:2")


@pytest.mark.parametrize("position", [12, 20, -5])
def test_tampered_wrapped_key_fails_authentication(provider: KeyProvider, position: int) -> None:
    wrapped = bytearray(provider.wrap(new_dek()))
    wrapped[position] = ord("A") if wrapped[position] != ord("A") else ord("B")
    with pytest.raises(AuthenticationError):
        provider.unwrap(bytes(wrapped))


def test_garbage_is_not_a_wrapped_key(provider: KeyProvider) -> None:
    for junk in (b"", b"garbage", b"vault:vX:abc", b"local:v1", "ключ".encode()):
        with pytest.raises(AuthenticationError):
            provider.unwrap(junk)
        if not junk.startswith(f"{provider.name}:v".encode()):
            with pytest.raises(AuthenticationError):
                provider.wrapped_version(junk)


def test_rotate_rewrap_and_retire_old_versions(provider: KeyProvider) -> None:
    dek = new_dek()
    old = provider.wrap(dek, b"c")
    assert provider.kek_version() == 1 and provider.wrapped_version(old) == 1
    assert provider.rotate_kek() == 2
    assert provider.kek_version() == 2
    assert provider.wrapped_version(provider.wrap(dek, b"c")) == 2
    (new,) = provider.rewrap_many([old], b"c")
    assert provider.wrapped_version(new) == 2
    assert provider.unwrap(new, b"c") == dek
    assert provider.unwrap(old, b"c") == dek  # still readable until retired
    provider.set_min_decryption_version(2)
    with pytest.raises(KeyNotFound):
        provider.unwrap(old, b"c")
    with pytest.raises(KeyNotFound):
        provider.rewrap_many([old], b"c")
    assert provider.unwrap(new, b"c") == dek


def test_min_decryption_version_must_exist(provider: KeyProvider) -> None:
    with pytest.raises(ValueError):
        provider.set_min_decryption_version(5)


def test_signatures_verify_offline_with_the_public_pem(provider: KeyProvider) -> None:
    data = b"audit checkpoint: head=ab12, seq=1000"
    signature = provider.sign(data)
    assert len(signature) == 64
    assert provider.verify(data, signature)
    assert not provider.verify(data + b"!", signature)
    assert not provider.verify(data, bytes(64))
    public = load_pem_public_key(provider.public_key_pem())
    assert isinstance(public, Ed25519PublicKey)
    public.verify(signature, data)  # what an auditor runs, with nothing but the PEM


def test_health_passes_when_the_provider_can_serve(provider: KeyProvider) -> None:
    provider.health()
