"""What a running process holds: settings, the pool, the clients, and the services built from them.

One ``AppState`` per process: the API builds it in its lifespan (``appliance.api.app``), CLI commands
that need services build their own. Every service is a typed attribute. Those that log in to Vault or
are not needed by every command are built on first use, so the API starts, and reports not-ready,
while a backing server is down; readiness and requests retry them.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

from minio import Minio
from psycopg_pool import ConnectionPool
from redis import Redis

from appliance import clients
from appliance.audit.log import AuditLog
from appliance.auth import KeyCache
from appliance.blind_index import BlindIndex
from appliance.calibration import ThresholdRefresher
from appliance.matching import IndexService
from appliance.readiness import Readiness
from appliance.settings import Settings
from appliance.subject_keys import SubjectKeys
from appliance.visits import VisitRecorder
from crypto.dek_cache import DekCache
from crypto.providers.base import KeyProvider
from media.retention import Retention
from media.service import Limits, MediaService
from media.store import MediaStore
from vector.templates import TemplateKeys

T = TypeVar("T")


def media_limits(settings: Settings) -> Limits:
    return Limits(
        image_bytes=int(settings.media_max_image_bytes),
        clip_bytes=int(settings.media_max_clip_bytes),
        image_pixels=int(settings.media_max_image_pixels),
        decode_budget=int(settings.media_decode_budget_bytes),
        decode_wait=float(settings.media_decode_wait),
    )


def media_retention(settings: Settings) -> Retention:
    return Retention(
        image_days=settings.media_retention_image_days,
        clip_days=settings.media_retention_clip_days,
        enrolment_days=settings.media_retention_enrolment_days,
    )


@dataclass
class AppState:
    settings: Settings
    pool: ConnectionPool
    redis: Redis
    s3: Minio
    api_keys: KeyCache
    # The hot indexes: set and started by the API (appliance.api.app); None in CLI processes, whose index
    # changes reach the API workers through the feed and the host's tombstone file.
    matcher: IndexService | None = None
    # The applied calibrated thresholds, held in memory for the matcher (API processes only).
    thresholds: ThresholdRefresher | None = None
    # Models whose template key and index_state row exist (appliance.enrolment.ensure_models).
    known_models: set[str] = field(default_factory=set)
    _keys: KeyProvider | None = None
    _blind_index: BlindIndex | None = None
    _subject_keys: SubjectKeys | None = None
    _template_keys: TemplateKeys | None = None
    _audit: AuditLog | None = None
    _media: MediaService | None = None
    _readiness: Readiness | None = None
    _visits: VisitRecorder | None = None
    _lock: threading.RLock = field(default_factory=threading.RLock)

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

    def _once(self, attr: str, build: Callable[[], T]) -> T:
        """The service in ``attr``, built by ``build`` on first use under the lock: two threads asking at
        once get the same one (``build`` may use other services: the lock is re-entrant)."""
        value = getattr(self, attr)
        if value is None:
            with self._lock:
                value = getattr(self, attr)
                if value is None:
                    value = build()
                    setattr(self, attr, value)
        return value

    @property
    def keys(self) -> KeyProvider:
        """The key provider, logged in on first use (raises KeyProviderUnavailable while down)."""
        if self._keys is None:
            provider = clients.key_provider(self.settings)
            with self._lock:
                if self._keys is None:
                    self._keys = provider
        return self._keys

    @property
    def subject_keys(self) -> SubjectKeys:
        """Per-subject DEKs through one bounded DEK cache (erasure evicts from it)."""
        return self._once("_subject_keys", lambda: SubjectKeys(
            self.keys, DekCache(self.settings.dek_cache_size, self.settings.dek_cache_ttl)))

    @property
    def blind_index(self) -> BlindIndex:
        """Keyed hashes of external references (the lookup key is unwrapped once per process)."""
        return self._once("_blind_index", lambda: BlindIndex(self.keys))

    @property
    def template_keys(self) -> TemplateKeys:
        """The process's template-key cache: the hot indexes' own when they run, so both see one version."""
        matcher = self.matcher
        if matcher is not None and matcher.template_keys is not None:
            return matcher.template_keys
        return self._once("_template_keys", lambda: TemplateKeys(self.keys))

    @property
    def audit(self) -> AuditLog:
        """The process's audit trail; its writer starts with the API (or on the first ``submit``)."""
        s = self.settings
        return self._once("_audit", lambda: AuditLog(
            self.pool, keys=lambda: self.keys, queue_size=s.audit_queue_size, batch_max=s.audit_batch_max,
            flush_interval=s.audit_flush_interval, checkpoint_interval=s.audit_checkpoint_interval))

    @property
    def media(self) -> MediaService:
        """Captures in the object store, sealed client-side (uploads, reads, thumbnails, deletes)."""
        s = self.settings
        return self._once("_media", lambda: MediaService(
            MediaStore(self.s3, s.s3_bucket, int(s.media_part_size)), self.pool, self, media_limits(s),
            media_retention(s), DekCache(s.dek_cache_size, s.dek_cache_ttl)))

    @property
    def visits(self) -> VisitRecorder:
        """The visit buffer the match path folds results into; its writer starts with the API."""
        s = self.settings
        return self._once("_visits", lambda: VisitRecorder(
            self.pool, flush_interval=s.visits_flush_interval, buffer_size=s.visits_buffer_size,
            retention_days=s.visits_retention_days))

    @property
    def readiness(self) -> Readiness:
        """One probe per backing server, each on a thread of its own (``GET /readyz``)."""
        return self._once("_readiness", lambda: Readiness(self.settings, self.redis, self.s3, lambda: self.keys))

    def close(self, checkpoint: bool = False) -> None:
        """Stop the services this process built, newest first, then the clients and the pool.

        ``checkpoint``: sign the audit chain heads on the way out (the API does; CLI commands leave it
        to the API's next periodic checkpoint)."""
        if self._visits is not None:
            self._visits.stop()
        if self._audit is not None:
            self._audit.stop(checkpoint=checkpoint)
        if self._media is not None:
            self._media.close()
        if self.thresholds is not None:
            self.thresholds.stop()
        if self.matcher is not None:
            self.matcher.stop()
        self.api_keys.stop()
        clients.close_quietly(self._keys, self.redis)
        self.pool.close()
