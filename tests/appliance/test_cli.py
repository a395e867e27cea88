"""`appliance apikey create|list|revoke` and `appliance migrate` against the real database."""

from __future__ import annotations

import os
import subprocess
import sys
import time


def _cli(stack, *args: str) -> subprocess.CompletedProcess[str]:  # type: ignore[no-untyped-def]
    env = {**os.environ, "APPLIANCE_CONFIG": str(stack.config_file)}
    return subprocess.run([sys.executable, "-m", "appliance", *args], env=env, capture_output=True,
                          text=True, timeout=60, check=False)


def test_apikey_lifecycle_through_the_cli(stack, client) -> None:  # type: ignore[no-untyped-def]
    created = _cli(stack, "apikey", "create", "--name", "camera-7", "--scopes", "match,enroll")
    assert created.returncode == 0, created.stderr
    token = created.stdout.strip()
    bearer = {"Authorization": f"Bearer {token}"}
    assert sorted(client.get("/v1/whoami", headers=bearer).json()["scopes"]) == ["enroll", "match"]

    listed = _cli(stack, "apikey", "list")
    assert "camera-7" in listed.stdout and token.split("_", 2)[2] not in listed.stdout

    prefix = token.split("_")[1]
    assert _cli(stack, "apikey", "revoke", prefix).returncode == 0
    deadline = time.monotonic() + 1.0
    while client.get("/v1/whoami", headers=bearer).status_code == 200:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert _cli(stack, "apikey", "revoke", prefix).returncode == 1  # already revoked


def test_apikey_create_rejects_unknown_scopes(stack) -> None:  # type: ignore[no-untyped-def]
    bad = _cli(stack, "apikey", "create", "--name", "x", "--scopes", "match,root")
    assert bad.returncode == 2 and "root" in bad.stderr


def test_migrate_cli_is_a_noop_when_up_to_date(stack) -> None:  # type: ignore[no-untyped-def]
    result = _cli(stack, "migrate")
    assert result.returncode == 0 and "up to date" in result.stdout
