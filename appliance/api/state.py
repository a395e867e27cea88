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
from appliance.blind_index import BlindIndex
from appliance.settings import Settings
from appliance.subject_keys import SubjectKeys
from crypto.dek_cache import DekCache

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
    _blind_index: BlindIndex | None = None
    _keys_lock: threading.RLock = field(default_factory=threading.RLock)

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
    def subject_keys(self) -> SubjectKeys:
        """Per-subject DEKs through one bounded DEK cache (erasure evicts from it)."""
        found = self.extras.get("subject_keys")
        if found is None:
            with self._keys_lock:
                found = self.extras.get("subject_keys")
                if found is None:
                    cache = DekCache(self.settings.dek_cache_size, self.settings.dek_cache_ttl)
                    found = self.extras["subject_keys"] = SubjectKeys(self.keys, cache)
        return found  # type: ignore[no-any-return]

    @property
    def blind_index(self) -> BlindIndex:
        """Keyed hashes of external references (the lookup key is unwrapped once per process)."""
        if self._blind_index is None:
            with self._keys_lock:
                if self._blind_index is None:
                    self._blind_index = BlindIndex(self.keys)
        return self._blind_index

    @property
    def keys(self) -> KeyProvider:
        """The key provider, logged in on first use (raises KeyProviderUnavailable while down)."""
        if self._keys is None:
            provider = clients.key_provider(self.settings)
            with self._keys_lock:
                if self._keys is None:
                    self._keys = provider
        return self._keys

    def close(self) -> None:
        self.api_keys.stop()
        clients.close_quietly(self._keys, self.redis)
        self.pool.close()
