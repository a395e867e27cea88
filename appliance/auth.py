"""API keys: ``apl_<prefix>_<secret>``, stored only as SHA-256 of the secret, with scopes.

The secret is 256 random bits, so a fast hash is enough (no password stretching needed) and a
lookup costs one dict access. A background refresher reloads the whole (small) table every
``apikey_cache_ttl`` seconds, so the match path never touches PostgreSQL and a revocation is
effective within about one refresh period (≤ 1 s).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from functools import cached_property

import psycopg
from psycopg_pool import ConnectionPool

from appliance.errors import Forbidden, Unauthorized
from appliance.logs import get_logger

log = get_logger(__name__)

KEY_PREFIX = "apl"
_VERIFIED_MAX = 1024  # headers remembered per refresh period by KeyCache


class Scope(StrEnum):
    MATCH = "match"
    ENROLL = "enroll"
    MEDIA = "media"
    AUDIT = "audit"
    ADMIN = "admin"


@dataclass(frozen=True)
class ApiKey:
    id: uuid.UUID
    name: str
    prefix: str
    secret_hash: bytes
    scopes: frozenset[str]
    created_at: datetime | None = None
    revoked_at: datetime | None = None

    @cached_property
    def actor(self) -> str:
        """How the audit log names this caller: never the secret, only the key id (cached: match path)."""
        return f"apikey:{self.id}"

    def allows(self, scope: Scope | str) -> bool:
        # admin implies every scope: an operator key can do everything a pipeline key can.
        return str(scope) in self.scopes or Scope.ADMIN.value in self.scopes


def _hash(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


def parse_token(token: str) -> tuple[str, str]:
    """Split ``apl_<prefix>_<secret>``; raises Unauthorized on any other shape."""
    parts = token.split("_", 2)
    if len(parts) != 3 or parts[0] != KEY_PREFIX or len(parts[1]) != 12 or len(parts[2]) < 32:
        raise Unauthorized("malformed API key")
    return parts[1], parts[2]


def create_key(conn: psycopg.Connection, name: str, scopes: list[str]) -> tuple[ApiKey, str]:
    """Create a key in ``conn``'s transaction; returns the record and the full token (shown once)."""
    unknown = set(scopes) - {s.value for s in Scope}
    if unknown or not scopes:
        raise ValueError(f"unknown or empty scopes: {sorted(unknown) or scopes}")
    prefix = secrets.token_hex(6)
    secret = secrets.token_urlsafe(32)
    key = ApiKey(uuid.uuid4(), name, prefix, _hash(secret), frozenset(scopes))
    conn.execute(
        "INSERT INTO api_keys (id, name, prefix, secret_hash, scopes) VALUES (%s, %s, %s, %s, %s)",
        (key.id, name, prefix, key.secret_hash, sorted(scopes)),
    )
    return key, f"{KEY_PREFIX}_{prefix}_{secret}"


def revoke_key(conn: psycopg.Connection, key_id_or_prefix: str) -> uuid.UUID | None:
    """Revoke by id or prefix in ``conn``'s transaction; returns the revoked key's id, if any was active."""
    row = conn.execute(
        "UPDATE api_keys SET revoked_at = now() WHERE revoked_at IS NULL AND (id::text = %s OR prefix = %s) "
        "RETURNING id",
        (key_id_or_prefix, key_id_or_prefix),
    ).fetchone()
    return row[0] if row else None


def list_keys(conn: psycopg.Connection) -> list[ApiKey]:
    return [_row(r) for r in conn.execute(_SELECT + " ORDER BY created_at").fetchall()]


_SELECT = "SELECT id, name, prefix, secret_hash, scopes, created_at, revoked_at FROM api_keys"


def _row(r: tuple) -> ApiKey:  # type: ignore[type-arg]
    return ApiKey(r[0], r[1], r[2], bytes(r[3]), frozenset(r[4]), r[5], r[6])


def _fetch(pool: ConnectionPool, sql: str, params: tuple = ()) -> list[tuple]:  # type: ignore[type-arg]
    with pool.connection() as conn:
        return conn.execute(sql, params).fetchall()  # type: ignore[arg-type]


class KeyCache:
    """In-process view of the active API keys, refreshed in the background.

    ``authenticate`` is a dict lookup plus a constant-time compare; it only goes to PostgreSQL for
    a prefix it has never seen (a key created since the last refresh), at most once per refresh.
    A header it has verified since the last refresh is answered by one dict lookup (``_verified``:
    every match repeats its pipeline's header); each refresh starts that dict afresh, so a revoked
    key stops working at the same moment as without it. The lookup leaks nothing useful by timing:
    it compares strings only after their hashes match, and str hashes are SipHash under a
    per-process random key, so a guess cannot be steered towards a stored header.
    """

    def __init__(self, pool: ConnectionPool, ttl: float) -> None:
        self._pool = pool
        self._ttl = ttl
        self._keys: dict[str, ApiKey] = {}
        self._misses: dict[str, float] = {}
        self._verified: dict[str, ApiKey] = {}  # Authorization header -> its key, since the last refresh
        self._loaded_at = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="apikey-refresh", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=2)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.refresh()
            except Exception as exc:  # PostgreSQL down: keep serving the last known keys
                log.warning("apikey_refresh_failed", error=type(exc).__name__)
            self._stop.wait(self._ttl)

    def refresh(self) -> None:
        rows = _fetch(self._pool, _SELECT + " WHERE revoked_at IS NULL")
        keys = {k.prefix: k for k in map(_row, rows)}
        with self._lock:
            self._keys = keys
            self._verified = {}  # after _keys: a header verified against older keys lands in the old dict
            self._misses.clear()
            self._loaded_at = time.monotonic()

    def authenticate(self, authorization: str | None) -> ApiKey:
        verified = self._verified
        key = verified.get(authorization) if authorization else None
        if key is not None:
            return key
        key = self._verify(authorization)
        if authorization and len(verified) < _VERIFIED_MAX:  # only verified headers: ~one per live key
            verified[authorization] = key
        return key

    def _verify(self, authorization: str | None) -> ApiKey:
        if not authorization:
            raise Unauthorized("missing Authorization: Bearer <API key>")
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise Unauthorized("use Authorization: Bearer <API key>")
        prefix, secret = parse_token(token.strip())
        key = self._keys.get(prefix)
        if key is None:
            key = self._lookup_new(prefix)
        if key is None or not hmac.compare_digest(key.secret_hash, _hash(secret)):
            raise Unauthorized("invalid or revoked API key")
        return key

    def _lookup_new(self, prefix: str) -> ApiKey | None:
        now = time.monotonic()
        with self._lock:
            if now - self._misses.get(prefix, -1e9) < self._ttl:
                return None
            self._misses[prefix] = now
        rows = _fetch(self._pool, _SELECT + " WHERE revoked_at IS NULL AND prefix = %s", (prefix,))
        if not rows:
            return None
        key = _row(rows[0])
        with self._lock:
            self._keys = {**self._keys, prefix: key}
        return key


def require(key: ApiKey, scope: Scope) -> None:
    if not key.allows(scope):
        raise Forbidden(f"this API key lacks the '{scope.value}' scope")
