"""Template protection: a secret random rotation per model and version (DESIGN.md, "Template protection").

The stored and indexed template is ``t = R @ normalise(v)`` with ``R`` a random orthogonal matrix.
Rotations preserve inner products, so FAISS and pgvector search protected templates with no loss of
accuracy and the match path never unwraps a subject DEK.

What this buys, honestly: templates are *unlinkable* (the same face under two seeds gives unrelated
vectors, so a stolen database cannot be matched against another system) and *renewable* (rotate the
seed, re-derive every template from the sealed raw vectors). It is not encryption: anyone holding the
seed rebuilds ``R`` and inverts it (``R.T @ t``). Confidentiality of raw vectors rests on the AES-GCM
seal and on keeping seeds wrapped by the KEK.

Derivation of R (stable across NumPy versions; only LAPACK rounding may differ between builds)::

    okm  = HKDF-SHA256(ikm=seed, salt=None, info=aad("template-protection-v1", model, version, dim), 32 bytes)
    bits = SHAKE-256(okm) as a stream of uint64 (a CSPRNG keyed by okm)
    G    = dim x dim standard normals from ``bits`` by Box-Muller (row-major)
    Q, U = QR(G);  R = float32(Q * sign(diag(U)))   # sign fix makes Q unique, hence deterministic

NumPy's ``Generator`` distributions are not promised to stay stable across releases, which would
silently change every R after an upgrade; SHAKE-256 and Box-Muller are fixed forever.
"""

from __future__ import annotations

import hashlib
import os

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from crypto.seal import aad

__all__ = ["SEED_SIZE", "TemplateKey", "new_seed"]

SEED_SIZE = 32
MAX_DIM = 4096


def new_seed() -> bytes:
    """Return a fresh 32-byte template-protection seed (store it wrapped by the KEK, never in plaintext)."""
    return os.urandom(SEED_SIZE)


def _gaussian(okm: bytes, count: int) -> np.ndarray:
    """Deterministic standard normals from a SHAKE-256 stream (Box-Muller on 53-bit uniforms)."""
    pairs = (count + 1) // 2
    raw = np.frombuffer(hashlib.shake_256(okm).digest(pairs * 16), dtype="<u8").reshape(pairs, 2)
    u1 = ((raw[:, 0] >> np.uint64(11)).astype(np.float64) + 1.0) * 2.0**-53  # (0, 1]: log is finite
    u2 = (raw[:, 1] >> np.uint64(11)).astype(np.float64) * 2.0**-53  # [0, 1)
    radius = np.sqrt(-2.0 * np.log(u1))
    angle = 2.0 * np.pi * u2
    return np.concatenate([radius * np.cos(angle), radius * np.sin(angle)])[:count]


class TemplateKey:
    """The secret rotation ``R`` of one model and seed version; ``protect`` maps raw vectors to templates."""

    __slots__ = ("_matrix", "_matrix_t32", "dim", "model", "version")

    def __init__(self, matrix: np.ndarray, model: str, version: int) -> None:
        self._matrix = np.ascontiguousarray(matrix, dtype=np.float32)
        self._matrix.setflags(write=False)
        self._matrix_t32 = np.ascontiguousarray(self._matrix.T)
        self._matrix_t32.setflags(write=False)
        self.model = model
        self.version = version
        self.dim = int(self._matrix.shape[0])

    def __repr__(self) -> str:
        return f"TemplateKey(model={self.model!r}, version={self.version}, dim={self.dim})"

    @classmethod
    def from_seed(cls, seed: bytes, model: str, version: int, dim: int) -> TemplateKey:
        """Derive R deterministically (see module doc); model, version and dim each give a different R."""
        if len(seed) != SEED_SIZE:
            raise ValueError(f"a template seed must be {SEED_SIZE} bytes")
        if not 1 <= dim <= MAX_DIM:
            raise ValueError(f"dim must be within 1..{MAX_DIM}")
        info = aad("template-protection-v1", model, version, dim)
        okm = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(seed)
        gaussian = _gaussian(okm, dim * dim).reshape(dim, dim)
        q, upper = np.linalg.qr(gaussian)
        signs = np.where(np.diag(upper) < 0, -1.0, 1.0)
        return cls(q * signs, model, version)

    def protect_query(self, x: np.ndarray) -> np.ndarray:
        """``protect`` for rows already checked (finite, non-zero, right width): the match path's version.

        R is orthogonal, so normalising after the rotation gives the same direction with fewer steps;
        float32 throughout (queries need no float64 accumulation to rank neighbours)."""
        y = x @ self._matrix_t32
        y /= np.sqrt(np.einsum("ij,ij->i", y, y))[:, None]
        return y

    def protect(self, v: np.ndarray) -> np.ndarray:
        """Return ``R @ normalise(v)`` as float32 for one vector (shape (d,)) or a batch (shape (n, d)).

        Raises ValueError for a wrong shape, a non-finite value or a zero vector, which have no direction.
        """
        x = np.asarray(v, dtype=np.float32)
        if x.ndim not in (1, 2) or x.shape[-1] != self.dim:
            raise ValueError(f"expected shape ({self.dim},) or (n, {self.dim}) for model {self.model!r}")
        if not np.isfinite(x).all():
            raise ValueError("vector contains NaN or infinity")
        norms = np.linalg.norm(x, axis=-1, keepdims=True)
        if (norms == 0).any():
            raise ValueError("cannot protect a zero vector")
        return np.asarray((x / norms) @ self._matrix.T, dtype=np.float32)
