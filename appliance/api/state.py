"""What a running API process holds: settings, the pool, clients and the key cache.

Clients to Vault are created lazily so the API starts, and reports not-ready, while a backing
server is down; readiness and requests retry them.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from minio import Minio
from psycopg_pool import ConnectionPool
from redis import Redis

from appliance import clients
from appliance.auth import KeyCache
from appliance.settings import Settings

if TYPE_CHECKING:
    from crypto.providers.base import KeyProvider


@dataclass
class AppState:
    settings: Settings
    pool: ConnectionPool
    redis: Redis
    s3: Minio
    api_keys: KeyCache
    extras: dict[str, Any] = field(default_factory=dict)
    _keys: KeyProvider | None = None
    _keys_lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def build(cls, settings: Settings) -> AppState:
        from appliance.db.pool import open_pool

        pool = open_pool(settings)
        return cls(
            settings=settings,
            pool=pool,
            redis=clients.redis_client(settings),
            s3=clients.s3_client(settings),
            api_keys=KeyCache(pool, settings.apikey_cache_ttl),
        )

    @property
    def keys(self) -> KeyProvider:
        """The key provider, logged in on first use (raises KeyProviderUnavailable while down)."""
        if self._keys is None:
            with self._keys_lock:
                if self._keys is None:
                    self._keys = clients.key_provider(self.settings)
        return self._keys

    def close(self) -> None:
        self.api_keys.stop()
        clients.close_quietly(self._keys, self.redis)
        self.pool.close()
