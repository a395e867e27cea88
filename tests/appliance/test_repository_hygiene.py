"""Nothing under git holds a secret, and var/ (generated keys, data, settings) is ignored."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SECRET_PATTERNS = {
    "api key": re.compile(r"apl_[0-9a-f]{12}_[A-Za-z0-9_-]{32,}"),
    "private key": re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    "vault token": re.compile(r"\b(hvs|s|hvb|b)\.[A-Za-z0-9]{24,}\b"),
    "postgres url with password": re.compile(r"postgres(ql)?://[^:/\s]+:[^@\s{]{8,}@"),
}


def _tracked_files() -> list[Path]:
    out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    return [ROOT / p for p in out.decode().split("\0") if p]


def test_no_tracked_file_contains_a_secret() -> None:
    findings = []
    for path in _tracked_files():
        try:
            text = path.read_text(errors="ignore")
        except (IsADirectoryError, FileNotFoundError):
            continue
        for what, pattern in SECRET_PATTERNS.items():
            findings += [f"{path.relative_to(ROOT)}: {what}" for _ in pattern.finditer(text)]
    assert findings == []


def test_var_and_the_generated_settings_are_ignored() -> None:
    for candidate in ("var/appliance.toml", "var/stack/secrets/s3-secret-key", "var/admin.key"):
        result = subprocess.run(["git", "check-ignore", "-q", candidate], cwd=ROOT, check=False)
        assert result.returncode == 0, f"{candidate} is not git-ignored"
    assert not [p for p in _tracked_files() if "var" in p.relative_to(ROOT).parts[:1]]
