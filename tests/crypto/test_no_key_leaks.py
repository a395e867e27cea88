"""Nothing in logs, exception messages, reprs or tracebacks contains key material.

Runs the crypto operations (including every failure path) with all loggers at DEBUG, then greps what
was captured for the known test keys in raw, hex and base64 forms.
"""

from __future__ import annotations

import base64
import json
import logging
import traceback
from collections.abc import Callable
from pathlib import Path

import pytest

from crypto import (
    CryptoError,
    DekCache,
    TemplateKey,
    aad,
    new_dek,
    new_seed,
    open_sealed,
    open_stream,
    seal,
    seal_stream,
)
from crypto.providers import KeyProvider, LocalFileProvider, VaultTransitProvider
from tests.crypto.openbao_server import VaultServer, isolated_vault_provider


def _forms(secret: bytes) -> list[str]:
    return [
        secret.hex(),
        secret.hex().upper(),
        base64.b64encode(secret).decode(),
        base64.urlsafe_b64encode(secret).decode(),
        base64.b64encode(secret).decode().rstrip("="),
        repr(secret)[2:-1],
    ]


class Transcript:
    """Everything an operator could see: log lines, exception text, chained tracebacks, reprs."""

    def __init__(self) -> None:
        self.texts: list[str] = []

    def expect_failure(self, action: Callable[[], object]) -> None:
        try:
            action()
        except CryptoError as exc:
            self.texts += [str(exc), repr(exc), "".join(traceback.format_exception(exc))]
        else:
            pytest.fail("expected a CryptoError")

    def leaks(self, secrets: list[bytes]) -> list[str]:
        joined = "\n".join(self.texts)
        return [form for secret in secrets for form in _forms(secret) if form in joined]


def _exercise(provider: KeyProvider, transcript: Transcript, secrets: list[bytes]) -> None:
    deks = [new_dek() for _ in range(20)]
    secrets += deks
    wrapped = provider.wrap_many(deks, b"ctx")
    assert provider.unwrap_many(wrapped, b"ctx") == deks
    transcript.expect_failure(lambda: provider.unwrap_many(wrapped, b"wrong"))
    tampered = bytearray(wrapped[5])
    tampered[-6] ^= 0x01
    # Vault answers a partly failed batch with the *other* items' plaintexts in the body: must not surface.
    transcript.expect_failure(lambda: provider.unwrap_many([*wrapped[:5], bytes(tampered), *wrapped[6:]], b"ctx"))
    transcript.expect_failure(lambda: provider.unwrap(b"%s:v1:not-base64!" % provider.name.encode()))
    provider.rotate_kek()
    rewrapped = provider.rewrap_many(wrapped, b"ctx")
    provider.set_min_decryption_version(2)
    transcript.expect_failure(lambda: provider.unwrap_many(wrapped, b"ctx"))
    assert provider.unwrap_many(rewrapped, b"ctx") == deks
    transcript.texts += [repr(provider), str(provider)]

    dek = deks[0]
    blob = seal(dek, b"raw vector bytes", aad("encoding", "s1", "e1", "m"))
    transcript.expect_failure(lambda: open_sealed(dek, blob, aad("encoding", "s1", "e2", "m")))
    transcript.expect_failure(lambda: open_sealed(deks[1], blob, aad("encoding", "s1", "e1", "m")))
    sealed = b"".join(seal_stream(dek, [b"x" * 5000], b"media", 1024))
    transcript.expect_failure(lambda: b"".join(open_stream(dek, [sealed[:-1]], b"media")))
    cache = DekCache()
    cache.put("s1", dek)
    seed = new_seed()
    secrets.append(seed)
    transcript.texts += [repr(cache), repr(TemplateKey.from_seed(seed, "m", 1, 8))]


def test_no_key_material_in_logs_or_errors_local(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    transcript, secrets = Transcript(), []
    with caplog.at_level(logging.DEBUG):
        provider = LocalFileProvider(tmp_path / "keys")
        _exercise(provider, transcript, secrets)
    kek_file = json.loads((tmp_path / "keys" / "kek.json").read_text())
    secrets += [base64.b64decode(k) for k in kek_file["keys"].values()]
    transcript.texts.append(caplog.text)
    planted = Transcript()
    planted.texts.append(f"oops {base64.b64encode(secrets[0]).decode()}")
    assert planted.leaks(secrets)  # the grep itself finds a leak when there is one
    assert caplog.text  # the capture worked (the provider logs its warning and rotations)
    assert transcript.leaks(secrets) == []


def test_no_key_material_in_logs_or_errors_vault(vault_server: VaultServer, caplog: pytest.LogCaptureFixture) -> None:
    transcript, secrets = Transcript(), []
    # The app's logging setup (from other tests) quiets urllib3; this test wants its DEBUG lines too.
    with caplog.at_level(logging.DEBUG), caplog.at_level(logging.DEBUG, logger="urllib3"):
        provider = isolated_vault_provider(vault_server)
        assert isinstance(provider, VaultTransitProvider)
        _exercise(provider, transcript, secrets)
        transcript.expect_failure(lambda: VaultTransitProvider(vault_server.addr, "bad", "secret-xyz").wrap(b"k"))
    transcript.texts.append(caplog.text)
    assert "POST /v1/" in caplog.text  # urllib3 debug lines were captured
    assert transcript.leaks(secrets) == []
    assert "secret-xyz" not in caplog.text and vault_server.secret_id not in "\n".join(transcript.texts)
