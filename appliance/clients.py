"""Clients for the backing servers, each built with short timeouts so a dead server fails fast."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

import redis
import urllib3
from minio import Minio

from appliance.settings import Settings

if TYPE_CHECKING:
    from crypto.providers.base import KeyProvider


def redis_client(settings: Settings) -> redis.Redis:
    return redis.Redis.from_url(
        settings.redis_url.get_secret_value(),
        socket_timeout=settings.redis_timeout,
        socket_connect_timeout=settings.redis_timeout,
        health_check_interval=30,
    )


def s3_client(settings: Settings, retries: int = 2) -> Minio:
    """A MinIO SDK client; works the same against MinIO in production and SeaweedFS locally."""
    http = urllib3.PoolManager(
        timeout=urllib3.Timeout(connect=min(2.0, settings.s3_timeout), read=settings.s3_timeout),
        maxsize=16,
        retries=urllib3.Retry(total=retries, backoff_factor=0.2, status_forcelist=(500, 502, 503, 504)),
    )
    return Minio(
        settings.s3_endpoint,
        access_key=settings.s3_access_key.get_secret_value(),
        secret_key=settings.s3_secret_key.get_secret_value(),
        secure=settings.s3_secure,
        region=settings.s3_region,
        http_client=http,
    )


def key_provider(settings: Settings) -> KeyProvider:
    """The KEK holder named in settings: Vault transit (production) or a local 0600 file."""
    if settings.key_provider == "vault":
        from crypto.providers.vault import VaultTransitProvider

        return VaultTransitProvider(
            addr=settings.vault_addr,
            role_id=settings.vault_role_id.get_secret_value(),
            secret_id=settings.vault_secret_id.get_secret_value(),
            mount=settings.vault_transit_mount,
            kek_name=settings.vault_kek_name,
            signing_key_name=settings.vault_signing_key_name,
            owned_key_prefix=settings.vault_owned_key_prefix,
            timeout=settings.vault_timeout,
        )
    from crypto.providers.local import LocalFileProvider

    return LocalFileProvider(settings.key_dir)


def close_quietly(*things: Any) -> None:
    for thing in things:
        close = getattr(thing, "close", None)
        if close is not None:
            with contextlib.suppress(Exception):  # shutting down; nothing useful to do
                close()
