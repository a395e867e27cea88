"""On-disk snapshots of a hot index, so a restart at 1M encodings is ready in seconds, not minutes.

A snapshot holds protected templates and metadata only (never raw vectors), sealed with a fresh DEK
(chunked AES-256-GCM, ``crypto.stream``) whose wrapped form, from the key provider, sits in the file
header. The header (model, template version, feed position, part layout) is bound as associated
data, so a snapshot cannot be replayed under another model, version or position.

File layout: ``b"APPLIDX1"`` | uint32 BE header length | header JSON | sealed stream of the parts.
"""

from __future__ import annotations

import base64
import json
import os
import struct
from pathlib import Path

import numpy as np

from crypto.errors import CryptoError
from crypto.providers.base import KeyProvider
from crypto.seal import aad, new_dek
from crypto.stream import open_stream_into, seal_stream
from vector.errors import SnapshotError
from vector.index import HotIndex, IndexParams
from vector.memory import huge_page_buffer

MAGIC = b"APPLIDX1"
SEGMENT = 4 << 20
_PARTS = ("faiss", "labels", "subjects", "encodings", "dead")


def _context(model: str) -> bytes:
    return b"index-snapshot:" + model.encode()


def save(path: Path, index: HotIndex, provider: KeyProvider, *, model: str, version: int, feed_seq: int) -> int:
    """Write atomically (temp file, fsync, rename); returns the file size."""
    parts = index.to_parts()
    layout = [{"name": n, "dtype": parts[n].dtype.str, "shape": list(parts[n].shape)} for n in _PARTS]
    dek = new_dek()
    wrapped = provider.wrap(dek, _context(model))
    ef_search, tuned_at = index.tuning_state()
    header = json.dumps({
        "model": model, "version": version, "feed_seq": feed_seq, "dim": index.dim, "kind": index.kind,
        "wrapped_dek": base64.b64encode(wrapped).decode(), "parts": layout,
        "ef_search": ef_search, "tuned_at": tuned_at,
    }, sort_keys=True).encode()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    size = 0
    with os.fdopen(fd, "wb") as f:
        f.write(MAGIC + struct.pack(">I", len(header)) + header)
        chunks = (np.ascontiguousarray(parts[n]).reshape(-1).view(np.uint8).data for n in _PARTS)
        for piece in seal_stream(dek, chunks, aad("index-snapshot", header), SEGMENT):
            f.write(piece)
        f.flush()
        os.fsync(f.fileno())
        size = f.tell()
    os.replace(tmp, path)
    return size


def read_header(path: Path) -> dict:  # type: ignore[type-arg]
    try:
        with open(path, "rb") as f:
            if f.read(len(MAGIC)) != MAGIC:
                raise SnapshotError(f"{path} is not an index snapshot")
            (length,) = struct.unpack(">I", f.read(4))
            return json.loads(f.read(length))  # type: ignore[no-any-return]
    except (OSError, ValueError, struct.error) as exc:
        raise SnapshotError(f"cannot read snapshot {path}: {exc}") from None


def load(path: Path, provider: KeyProvider, params: IndexParams | None = None) -> tuple[HotIndex, dict]:  # type: ignore[type-arg]
    """Open, verify and rebuild the index; raises SnapshotError on any problem (then warm from PostgreSQL).

    The plaintext exists only in memory: it is decrypted segment by segment straight into one
    huge-page buffer, from which the index reads its arrays in place (``HotIndex.from_parts(borrow=True)``).
    """
    meta = read_header(path)
    with open(path, "rb") as f:
        f.seek(len(MAGIC))
        (length,) = struct.unpack(">I", f.read(4))
        header = f.read(length)
        try:
            dek = provider.unwrap(base64.b64decode(meta["wrapped_dek"]), _context(meta["model"]))
            sizes = [int(np.prod(p["shape"])) * np.dtype(p["dtype"]).itemsize for p in meta["parts"]]
            plain = huge_page_buffer(sum(sizes))
            open_stream_into(dek, f, aad("index-snapshot", header), memoryview(plain)[: sum(sizes)])
        except (CryptoError, ValueError, KeyError, OSError) as exc:
            raise SnapshotError(f"snapshot {path} does not open: {exc}") from None
    parts: dict[str, np.ndarray] = {}
    offset = 0
    for spec, size in zip(meta["parts"], sizes, strict=True):
        dtype = np.dtype(spec["dtype"])
        parts[spec["name"]] = np.frombuffer(plain, dtype, size // dtype.itemsize, offset).reshape(spec["shape"])
        offset += size
    try:
        tuned = (int(meta["ef_search"]), int(meta["tuned_at"])) if meta.get("tuned_at") else None
        return HotIndex.from_parts(int(meta["dim"]), parts, params, borrow=True, tuned=tuned), meta
    except (ValueError, RuntimeError) as exc:
        raise SnapshotError(f"snapshot {path} is inconsistent: {exc}") from None
