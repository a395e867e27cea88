"""LocalFileProvider specifics: file modes, the warning, persistence, and rotation seen across processes."""

from __future__ import annotations

import logging
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from crypto import CryptoError, new_dek
from crypto.providers import LocalFileProvider


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_creates_private_key_files_on_first_use(tmp_path: Path) -> None:
    key_dir = tmp_path / "data" / "keys"
    LocalFileProvider(key_dir)
    assert _mode(key_dir) == 0o700
    assert _mode(key_dir / "kek.json") == 0o600
    assert _mode(key_dir / "signing-ed25519.pem") == 0o600


def test_warns_at_start_that_it_is_the_weaker_choice(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="crypto.providers.local"):
        LocalFileProvider(tmp_path / "keys")
    assert any(r.levelno == logging.WARNING and "weaker" in r.getMessage() for r in caplog.records)


def test_keys_persist_across_instances(tmp_path: Path) -> None:
    first = LocalFileProvider(tmp_path / "keys")
    dek = new_dek()
    wrapped = first.wrap(dek, b"c")
    signature = first.sign(b"x")
    second = LocalFileProvider(tmp_path / "keys")
    assert second.unwrap(wrapped, b"c") == dek
    assert second.verify(b"x", signature)
    assert second.public_key_pem() == first.public_key_pem()


def test_refuses_key_files_readable_by_others(tmp_path: Path) -> None:
    LocalFileProvider(tmp_path / "keys")
    os.chmod(tmp_path / "keys" / "kek.json", 0o644)
    with pytest.raises(CryptoError, match="chmod 600"):
        LocalFileProvider(tmp_path / "keys")


def test_sees_a_rotation_made_by_another_process(tmp_path: Path) -> None:
    provider = LocalFileProvider(tmp_path / "keys")
    dek = new_dek()
    script = (
        "import sys; from pathlib import Path; from crypto.providers import LocalFileProvider; "
        "p = LocalFileProvider(Path(sys.argv[1])); p.rotate_kek(); "
        "sys.stdout.buffer.write(p.wrap(bytes.fromhex(sys.argv[2])))"
    )
    out = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "keys"), dek.hex()], check=True, capture_output=True
    ).stdout
    assert provider.kek_version() == 2
    assert provider.wrapped_version(out) == 2
    assert provider.unwrap(out) == dek
