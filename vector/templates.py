"""Embedding validation and the per-model template keys (the seeds of ``crypto.template.TemplateKey``).

A model's seed is created on first use, stored only wrapped by the KEK in ``template_keys``, and
unwrapped once per process per version; the hot path then protects queries without any round trip.
"""

from __future__ import annotations

import threading

import numpy as np
import psycopg

from crypto.providers.base import KeyProvider
from crypto.template import TemplateKey, new_seed
from vector.errors import InvalidVector, UnknownModel

FLOAT32_LE = np.dtype("<f4")


def as_matrix(values: object, dim: int) -> np.ndarray:
    """Turn one vector or a list of vectors into a validated (n, dim) float32 matrix.

    Raises InvalidVector for a wrong dimension, non-finite values or a zero vector (no direction).
    The message never echoes values: they are biometric data.
    """
    try:
        with np.errstate(over="ignore"):  # values beyond float32 become inf and are rejected below
            x = np.asarray(values, dtype=np.float32)
    except (TypeError, ValueError):
        raise InvalidVector("embedding must be an array of numbers") from None
    if x.ndim == 1:
        x = x[None, :]
    if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] != dim:
        got = x.shape[-1] if x.ndim >= 1 and x.size else 0
        raise InvalidVector(f"expected {dim} dimensions, got {got}")
    return check_matrix(x)


def from_float32_bytes(body: bytes, dim: int) -> np.ndarray:
    """Parse a raw little-endian float32 body of n*dim values (the pipelines' zero-JSON path)."""
    if not body or len(body) % (4 * dim):
        raise InvalidVector(f"raw body must be a whole number of {dim}-dimension float32 vectors")
    return check_matrix(np.frombuffer(body, dtype=FLOAT32_LE).reshape(-1, dim))  # read-only view, no copy


def check_matrix(x: np.ndarray) -> np.ndarray:
    if not np.isfinite(x).all():
        raise InvalidVector("embedding contains NaN or infinite values")
    if not x.any(axis=1).all():  # every row has a non-zero value (-0.0 counts as zero); half abs().max()'s cost
        raise InvalidVector("embedding is a zero vector")
    return x


def normalise(x: np.ndarray) -> np.ndarray:
    """L2-normalise rows (float32); the sealed raw vector is the normalised one."""
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def seed_context(model: str, version: int) -> bytes:
    """Wrap context binding a seed to its model and version: a wrapped seed copied to another row fails."""
    return b"template-seed:" + model.encode() + b":" + str(version).encode()


class TemplateKeys:
    """Cache of unwrapped template keys per (model, version); creates version 1 of a model on first use."""

    def __init__(self, provider: KeyProvider) -> None:
        self.provider = provider
        self._keys: dict[tuple[str, int], TemplateKey] = {}
        self._lock = threading.Lock()

    def ensure_model(self, conn: psycopg.Connection, model: str, dim: int) -> int:
        """Make sure the model has an active key and an index_state row; returns the active version."""
        row = conn.execute("SELECT template_version FROM index_state WHERE model = %s", (model,)).fetchone()
        if row is not None:
            return int(row[0])
        seed = new_seed()
        wrapped = self.provider.wrap(seed, seed_context(model, 1))
        with conn.transaction():
            conn.execute(
                """INSERT INTO template_keys (model, version, dim, wrapped_seed, kek_version, state)
                   VALUES (%s, 1, %s, %s, %s, 'active') ON CONFLICT DO NOTHING""",
                (model, dim, wrapped, self.provider.wrapped_version(wrapped)),
            )
            conn.execute(
                "INSERT INTO index_state (model, template_version) VALUES (%s, 1) ON CONFLICT DO NOTHING", (model,)
            )
        row = conn.execute("SELECT template_version FROM index_state WHERE model = %s", (model,)).fetchone()
        assert row is not None
        return int(row[0])

    def get(self, conn: psycopg.Connection, model: str, version: int) -> TemplateKey:
        """The TemplateKey of one version (unwrapping its seed on first use in this process)."""
        key = self._keys.get((model, version))
        if key is not None:
            return key
        row = conn.execute(
            "SELECT dim, wrapped_seed FROM template_keys WHERE model = %s AND version = %s", (model, version)
        ).fetchone()
        if row is None:
            raise UnknownModel(f"model {model!r} has no template key version {version}")
        seed = self.provider.unwrap(bytes(row[1]), seed_context(model, version))
        key = TemplateKey.from_seed(seed, model, version, int(row[0]))
        with self._lock:
            self._keys[(model, version)] = key
        return key

    def create_version(self, conn: psycopg.Connection, model: str, dim: int, version: int) -> TemplateKey:
        """Insert a 'pending' key version (rotation); idempotent when it already exists."""
        seed = new_seed()
        wrapped = self.provider.wrap(seed, seed_context(model, version))
        conn.execute(
            """INSERT INTO template_keys (model, version, dim, wrapped_seed, kek_version, state)
               VALUES (%s, %s, %s, %s, %s, 'pending') ON CONFLICT DO NOTHING""",
            (model, version, dim, wrapped, self.provider.wrapped_version(wrapped)),
        )
        return self.get(conn, model, version)
