"""Idempotent Vault/OpenBao bootstrap for the appliance: transit keys, policy, AppRole.

Run with a root (or admin) token by the local service stack after it starts OpenBao, and mirrored by
the Ansible role, which renders the same ``vault_policy.hcl``. Running it again changes nothing except
issuing a fresh ``secret_id`` (earlier ones stay valid); a key that exists with the wrong type is an
error rather than silently reused.
"""

from __future__ import annotations

import re
from importlib import resources
from typing import Any

import hvac
import hvac.exceptions
import requests

from crypto.errors import CryptoError, KeyProviderUnavailable

__all__ = ["POLICY_TEMPLATE", "bootstrap_vault", "render_policy"]

POLICY_TEMPLATE = "vault_policy.hcl"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_MOUNT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_./-]*$")
_PLACEHOLDER = re.compile(r"\{\{\s*(\w+)\s*\}\}")


def render_policy(mount: str, kek_name: str, signing_key_name: str, owned_key_prefix: str = "appliance-owned-") -> str:
    """Fill ``vault_policy.hcl``; names are checked so they cannot break out of an HCL string."""
    values = {"transit_mount": mount, "kek_name": kek_name, "signing_key_name": signing_key_name,
              "owned_key_prefix": owned_key_prefix}
    for key, value in values.items():
        if not (_MOUNT if key == "transit_mount" else _NAME).match(value):
            raise ValueError(f"invalid {key}: {value!r}")
    template = resources.files("crypto").joinpath(POLICY_TEMPLATE).read_text(encoding="utf-8")
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], template)


def _ensure_transit_key(client: hvac.Client, mount: str, name: str, key_type: str, derived: bool) -> None:
    try:
        info = client.secrets.transit.read_key(name=name, mount_point=mount)["data"]
    except hvac.exceptions.InvalidPath:
        client.secrets.transit.create_key(name=name, key_type=key_type, derived=derived, mount_point=mount)
        return
    if info.get("type") != key_type or bool(info.get("derived")) != derived:
        raise CryptoError(
            f"transit key {mount}/{name} exists as type={info.get('type')} derived={info.get('derived')}; "
            f"the appliance needs type={key_type} derived={derived}"
        )


def _bootstrap(
    client: hvac.Client,
    mount: str,
    kek_name: str,
    signing_key_name: str,
    role_name: str,
    role: dict[str, Any],
    owned_key_prefix: str,
) -> tuple[str, str]:
    mounts = client.sys.list_mounted_secrets_engines()["data"]
    if f"{mount}/" not in mounts:
        client.sys.enable_secrets_engine("transit", path=mount)
    elif mounts[f"{mount}/"]["type"] != "transit":
        raise CryptoError(f"{mount}/ is mounted as {mounts[f'{mount}/']['type']}, not transit")
    # Derived: transit rewrap honours a derivation context but not associated_data (see providers.vault).
    _ensure_transit_key(client, mount, kek_name, "aes256-gcm96", derived=True)
    _ensure_transit_key(client, mount, signing_key_name, "ed25519", derived=False)
    client.sys.create_or_update_policy(name=role_name, policy=render_policy(mount, kek_name, signing_key_name,
                                                                                  owned_key_prefix))
    if "approle/" not in client.sys.list_auth_methods()["data"]:
        client.sys.enable_auth_method("approle")
    client.auth.approle.create_or_update_approle(role_name, token_policies=[role_name], **role)
    role_id = client.auth.approle.read_role_id(role_name)["data"]["role_id"]
    secret_id = client.auth.approle.generate_secret_id(role_name)["data"]["secret_id"]
    return str(role_id), str(secret_id)


def bootstrap_vault(
    addr: str,
    root_token: str,
    *,
    mount: str = "transit",
    kek_name: str = "appliance-kek",
    signing_key_name: str = "appliance-signing",
    role_name: str = "appliance",
    owned_key_prefix: str = "appliance-owned-",
    token_ttl: str = "1h",  # noqa: S107 - a duration, not a secret
    token_max_ttl: str = "24h",  # noqa: S107 - a duration, not a secret
    timeout: float = 10.0,
) -> tuple[str, str]:
    """Make Vault ready for ``VaultTransitProvider`` and return fresh AppRole ``(role_id, secret_id)``.

    The policy is named after the role and allows exactly what ``vault_policy.hcl`` lists.
    """
    if not _NAME.match(role_name):
        raise ValueError(f"invalid role_name: {role_name!r}")
    client = hvac.Client(url=addr, token=root_token, timeout=timeout)
    role = {"token_ttl": token_ttl, "token_max_ttl": token_max_ttl, "token_type": "service"}
    try:
        return _bootstrap(client, mount, kek_name, signing_key_name, role_name, role, owned_key_prefix)
    except requests.RequestException as exc:
        raise KeyProviderUnavailable(f"Vault at {addr} is unreachable for bootstrap ({type(exc).__name__})") from None
    except hvac.exceptions.VaultDown:
        raise KeyProviderUnavailable(f"Vault at {addr} is sealed; unseal it before bootstrap") from None
    except hvac.exceptions.VaultError as exc:
        raise CryptoError(f"Vault bootstrap at {addr} failed: {type(exc).__name__}: {exc.errors}") from None
    finally:
        client.adapter.close()
