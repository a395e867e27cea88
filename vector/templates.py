"""Embedding validation and the per-model template keys (the seeds of ``crypto.template.TemplateKey``).

A model's seed is created on first use, stored only wrapped by the KEK in ``template_keys``, and
unwrapped once per process per version; the hot path then protects queries without any round trip.
"""

from __future__ import annotations

import hashlib
import threading

import numpy as np
import psycopg

from crypto.providers.base import KeyDestruction, KeyProvider
from crypto.template import TemplateKey, new_seed
from vector.errors import InvalidVector, UnknownModel

FLOAT32_LE = np.dtype("<f4")


# Every float32 step after validation (the sum of squares in ``TemplateKey.protect``, the rotation
# and re-normalisation in ``protect_query``) stays in float32's normal range, with orders of headroom,
# for a norm in this window: squares stay below 1e30 (float32 overflows past ~3.4e38), and the largest
# rotated component (>= norm / sqrt(dim), dim <= 4096) squares to >= 2e-34, far above the subnormal
# range (< 1.2e-38) where precision is lost. Outside it float32 turned [1e19]*128 into an all-zero
# template and small constant probes into an infinite similarity. Real embeddings have norms ~0.1..100.
NORM_MIN, NORM_MAX = 1e-15, 1e15
_SQ_MIN, _SQ_MAX = NORM_MIN**2, NORM_MAX**2


def as_matrix(values: object, dim: int) -> np.ndarray:
    """Turn one vector or a list of vectors into a validated (n, dim) float32 matrix.

    ``values`` must already be numbers (the API validates its schemas strictly: numpy would read
    ``"0.1"`` and ``True`` as numbers). Raises InvalidVector for a wrong dimension or a row that
    ``check_matrix`` refuses. The message never echoes values: they are biometric data.
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
    """``x`` unchanged if every row is finite with an L2 norm in [NORM_MIN, NORM_MAX], else InvalidVector.

    One pass (a match-path cost): the squared norms are summed in float32, which is exact enough here
    because the window lies deep inside float32's range. Whatever escapes it fails the same test: a
    NaN gives NaN (``min``/``max`` propagate it), an infinite value or an overflowing square gives inf,
    an underflowing vector gives (nearly) zero. Only the error message is worked out in float64.
    """
    sq = np.einsum("ij,ij->i", x, x)
    if not (sq.min() >= _SQ_MIN and sq.max() <= _SQ_MAX):
        raise InvalidVector(_why_invalid(x))
    return x


def _why_invalid(x: np.ndarray) -> str:
    sq = np.einsum("ij,ij->i", x, x, dtype=np.float64)
    row = int(np.flatnonzero(~((sq >= _SQ_MIN) & (sq <= _SQ_MAX)))[0])
    where = f"embedding {row}" if len(x) > 1 else "embedding"
    if not np.isfinite(x[row]).all():
        return f"{where} contains NaN or infinite values"
    if sq[row] == 0:
        return f"{where} is a zero vector"
    return (f"{where} has an L2 norm outside [{NORM_MIN:g}, {NORM_MAX:g}]: it cannot be normalised "
            "reliably in float32 (scale it, e.g. send it normalised)")


def normalise(x: np.ndarray) -> np.ndarray:
    """L2-normalise rows (float32); the sealed raw vector is the normalised one."""
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def seed_owner(model: str, version: int) -> str:
    """Owner-key name of one template seed: destroying it (after a re-key) turns every stale copy of the
    templates protected under this version (dead tuples, WAL, backups, old snapshots) into noise."""
    return f"template-{hashlib.sha256(model.encode()).hexdigest()[:16]}-v{version}"


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
        wrapped = self.provider.wrap_owned(seed_owner(model, 1), seed, seed_context(model, 1))
        with conn.transaction():
            conn.execute(  # kek_version 0: wrapped by the seed's own owner key, not the KEK
                """INSERT INTO template_keys (model, version, dim, wrapped_seed, kek_version, state, scheme)
                   VALUES (%s, 1, %s, %s, 0, 'active', 'owner') ON CONFLICT DO NOTHING""",
                (model, dim, wrapped),
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
            "SELECT dim, wrapped_seed, scheme FROM template_keys WHERE model = %s AND version = %s", (model, version)
        ).fetchone()
        if row is None:
            raise UnknownModel(f"model {model!r} has no template key version {version}")
        if row[2] == "owner":
            seed = self.provider.unwrap_owned(seed_owner(model, version), bytes(row[1]), seed_context(model, version))
        else:  # written before migration 0008, wrapped by the shared KEK
            seed = self.provider.unwrap(bytes(row[1]), seed_context(model, version))
        key = TemplateKey.from_seed(seed, model, version, int(row[0]))
        with self._lock:
            self._keys[(model, version)] = key
        return key

    def create_version(self, conn: psycopg.Connection, model: str, dim: int, version: int) -> TemplateKey:
        """Insert a 'pending' key version (rotation); idempotent when it already exists."""
        seed = new_seed()
        wrapped = self.provider.wrap_owned(seed_owner(model, version), seed, seed_context(model, version))
        conn.execute(
            """INSERT INTO template_keys (model, version, dim, wrapped_seed, kek_version, state, scheme)
               VALUES (%s, %s, %s, %s, 0, 'pending', 'owner') ON CONFLICT DO NOTHING""",
            (model, version, dim, wrapped),
        )
        return self.get(conn, model, version)

    def destroy_version(self, conn: psycopg.Connection, model: str, version: int) -> KeyDestruction:
        """Destroy a retired version's seed for good (after a re-key): its templates, wherever a stale copy
        lies, can no longer be turned back into face vectors by anyone holding the appliance's credentials."""
        with self._lock:
            self._keys.pop((model, version), None)
        done = self.provider.destroy_owned(seed_owner(model, version))
        conn.execute("""UPDATE template_keys SET destroyed_at = coalesce(destroyed_at, now())
                        WHERE model = %s AND version = %s""", (model, version))
        return done
