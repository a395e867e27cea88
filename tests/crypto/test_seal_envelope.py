"""The sealing recipe: round trip and every kind of tampering, as properties (hypothesis)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from crypto import AuthenticationError, aad, new_dek, open_sealed, seal
from crypto.seal import ENVELOPE_OVERHEAD, envelope_key_version

# No per-example deadline: CI machines are shared, and these tests prove correctness, not speed.
relaxed = settings(deadline=None)
keys = st.binary(min_size=32, max_size=32)
plaintexts = st.binary(max_size=2048)
contexts = st.binary(max_size=64)
aad_parts = st.lists(st.one_of(st.text(max_size=8), st.binary(max_size=8), st.integers()), max_size=5)


@relaxed
@given(keys, plaintexts, contexts, st.integers(0, 2**32 - 1))
def test_open_inverts_seal(key: bytes, plaintext: bytes, context: bytes, key_version: int) -> None:
    blob = seal(key, plaintext, context, key_version)
    assert len(blob) == len(plaintext) + ENVELOPE_OVERHEAD
    assert envelope_key_version(blob) == key_version
    assert open_sealed(key, blob, context) == plaintext


@relaxed
@given(keys, plaintexts, contexts, st.data())
def test_any_flipped_bit_fails(key: bytes, plaintext: bytes, context: bytes, data: st.DataObject) -> None:
    blob = bytearray(seal(key, plaintext, context))
    bit = data.draw(st.integers(0, len(blob) * 8 - 1))
    blob[bit // 8] ^= 1 << (bit % 8)
    with pytest.raises(AuthenticationError):
        open_sealed(key, bytes(blob), context)


@relaxed
@given(keys, plaintexts, contexts, st.data())
def test_any_truncation_fails(key: bytes, plaintext: bytes, context: bytes, data: st.DataObject) -> None:
    blob = seal(key, plaintext, context)
    cut = data.draw(st.integers(0, len(blob) - 1))
    with pytest.raises(AuthenticationError):
        open_sealed(key, blob[:cut], context)


@relaxed
@given(keys, plaintexts, contexts, contexts)
def test_wrong_associated_data_fails(key: bytes, plaintext: bytes, context: bytes, other: bytes) -> None:
    blob = seal(key, plaintext, context)
    if other != context:
        with pytest.raises(AuthenticationError):
            open_sealed(key, blob, other)


@relaxed
@given(keys, keys, plaintexts, contexts)
def test_wrong_key_fails(key: bytes, other: bytes, plaintext: bytes, context: bytes) -> None:
    blob = seal(key, plaintext, context)
    if other != key:
        with pytest.raises(AuthenticationError):
            open_sealed(other, blob, context)


def test_blob_copied_to_another_row_fails() -> None:
    dek = new_dek()
    blob = seal(dek, b"\x00" * 512, aad("encoding", "subject-1", "enc-1", "arcface-r100"))
    with pytest.raises(AuthenticationError):
        open_sealed(dek, blob, aad("encoding", "subject-1", "enc-2", "arcface-r100"))


@relaxed
@given(aad_parts, aad_parts)
def test_aad_encoding_is_unambiguous(a: list[str | bytes | int], b: list[str | bytes | int]) -> None:
    same = [(type(x), x) for x in a] == [(type(y), y) for y in b]
    assert (aad(*a) == aad(*b)) == same


def test_aad_distinguishes_splits_and_types() -> None:
    assert aad("ab", "c") != aad("a", "bc")
    assert aad(1) != aad("1") != aad(b"1")
    with pytest.raises(TypeError):
        aad(True)


def test_sealing_uses_a_fresh_nonce_every_time() -> None:
    dek = new_dek()
    assert seal(dek, b"same", b"ctx") != seal(dek, b"same", b"ctx")


def test_keys_of_the_wrong_size_are_a_programming_error() -> None:
    with pytest.raises(ValueError):
        seal(b"short", b"x", b"")
