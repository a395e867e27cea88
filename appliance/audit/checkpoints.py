"""Signed checkpoints: the key provider signs each chain head, so cutting the tail of a chain shows.

A checkpoint says "chain C had ``count`` records and its record ``seq`` hashed to ``head_hash``" at
``ts``. ``kind`` is ``periodic`` or ``shutdown`` (the head as written), ``manual`` (CLI), or
``retention``: the last record removed by a partition drop, which anchors the new first record.
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from typing import Any

from prometheus_client import Counter
from psycopg import Connection

from appliance.audit.chain import checkpoint_message, ts_text
from appliance.logs import get_logger
from crypto.providers.base import KeyProvider

log = get_logger(__name__)
CHECKPOINTS = Counter("appliance_audit_checkpoints_total", "Signed audit checkpoints", ["kind"])
_FINGERPRINTS: dict[int, str] = {}


def key_fingerprint(pem: bytes) -> str:
    """The key id stored with each signature: the first 16 hex digits of SHA-256 over the PEM."""
    return hashlib.sha256(pem.strip()).hexdigest()[:16]


def provider_key_id(keys: KeyProvider) -> str:
    found = _FINGERPRINTS.get(id(keys))
    if found is None:
        found = _FINGERPRINTS[id(keys)] = key_fingerprint(keys.public_key_pem())
    return found


def sign_checkpoint(keys: KeyProvider, chain: str, seq: int, head: bytes, kind: str) -> dict[str, Any]:
    """A checkpoint in its exported form, signed (one key provider round trip)."""
    cp: dict[str, Any] = {
        "chain": chain,
        "seq": seq,
        "head_hash": head.hex(),
        "count": seq,  # seq is gap-free from 1, so the head's seq is the number of records ever written
        "ts": ts_text(datetime.now(UTC)),
        "kind": kind,
    }
    cp["signature"] = keys.sign(checkpoint_message(cp)).hex()
    cp["key_id"] = provider_key_id(keys)
    return cp


def insert_checkpoint(conn: Connection[Any], cp: dict[str, Any]) -> None:
    conn.execute(
        """INSERT INTO audit_checkpoints (ts, chain, seq, head_hash, count, key_id, signature, kind)
           VALUES (%s, %s, %s, %s, %s, %s, %s, %s)""",
        (datetime.fromisoformat(cp["ts"]), cp["chain"], cp["seq"], bytes.fromhex(cp["head_hash"]), cp["count"],
         cp["key_id"], bytes.fromhex(cp["signature"]), cp["kind"]),
    )
    CHECKPOINTS.labels(cp["kind"]).inc()


def write_checkpoints(conn: Connection[Any], keys: KeyProvider, kind: str = "periodic") -> int:
    """Sign every chain head that moved since its last checkpoint; returns the number written."""
    heads = conn.execute("SELECT chain, seq, hash FROM audit_heads WHERE seq > 0").fetchall()
    last = dict(
        conn.execute(
            "SELECT DISTINCT ON (chain) chain, seq FROM audit_checkpoints ORDER BY chain, id DESC"
        ).fetchall()
    )
    conn.commit()  # do not hold a snapshot across the signing round trips
    written = 0
    for chain, seq, head in heads:
        if last.get(chain) == seq:
            continue
        cp = sign_checkpoint(keys, chain, seq, bytes(head), kind)
        with conn.transaction():
            insert_checkpoint(conn, cp)
        written += 1
    if written:
        log.info("audit: checkpoints signed", kind=kind, chains=written)
    return written


def row_to_checkpoint(row: dict[str, Any]) -> dict[str, Any]:
    """An audit_checkpoints row in the exported form."""
    return {
        "chain": row["chain"],
        "seq": int(row["seq"]),
        "head_hash": bytes(row["head_hash"]).hex(),
        "count": int(row["count"]),
        "ts": ts_text(row["ts"]),
        "kind": row["kind"],
        "key_id": row["key_id"],
        "signature": bytes(row["signature"]).hex(),
    }
