"""KEK rotation driver: rewrap every stored wrapped key to the latest KEK version, in batches, resumably.

Independent of any database: the caller supplies two functions over its table, e.g. for PostgreSQL::

    def fetch_batch(below_version, after, limit):   # rows still under an older KEK, in id order
        return conn.execute(
            "SELECT id, wrapped FROM subject_keys WHERE kek_version < %s AND (%s::uuid IS NULL OR id > %s)"
            " ORDER BY id LIMIT %s", (below_version, after, after, limit)).fetchall()

    def store_batch(rows):                           # one transaction per batch
        with conn.transaction():
            cur.executemany("UPDATE subject_keys SET wrapped = %s, kek_version = %s WHERE id = %s",
                            [(w, provider.wrapped_version(w), i) for i, w in rows])

Resumable by construction: a run killed half-way left every stored batch at the target version, and the
next run only fetches rows below it, so it continues where the last one stopped. The service keeps
serving throughout: old versions still unwrap until the operator retires them with
``provider.set_min_decryption_version(target)`` once ``rewrap_all`` has returned.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import TypeVar

from crypto.providers.base import KeyProvider

__all__ = ["RewrapProgress", "rewrap_all"]

K = TypeVar("K", bound=Hashable)


@dataclass
class RewrapProgress:
    """Counters of one ``rewrap_all`` run, passed to the progress callback after every stored batch."""

    target_version: int
    rewrapped: int = 0
    skipped: int = 0  # fetched rows already at (or above) the target version
    batches: int = 0


def rewrap_all(
    provider: KeyProvider,
    fetch_batch: Callable[[int, K | None, int], list[tuple[K, bytes]]],
    store_batch: Callable[[list[tuple[K, bytes]]], None],
    *,
    batch_size: int = 1000,
    context: bytes | Callable[[K], bytes] = b"",
    target_version: int | None = None,
    progress: Callable[[RewrapProgress], None] | None = None,
) -> RewrapProgress:
    """Rewrap, batch by batch, every row ``fetch_batch`` returns until it returns none; returns the counters.

    ``fetch_batch(below_version, after_id, limit)`` returns up to ``limit`` ``(id, wrapped)`` rows with
    a KEK version below ``below_version`` and id greater than ``after_id`` (``None``: from the start),
    in id order. ``store_batch(rows)`` persists ``(id, new_wrapped)`` atomically. ``context`` is the
    wrap context: one for all rows, or a function of the row id. The target is the provider's latest
    KEK version unless given; rotate first (``provider.rotate_kek()``), then call this.
    """
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    target = provider.kek_version() if target_version is None else target_version
    stats = RewrapProgress(target_version=target)
    after: K | None = None
    while rows := fetch_batch(target, after, batch_size):
        after = rows[-1][0]
        stale = [(row_id, wrapped) for row_id, wrapped in rows if provider.wrapped_version(wrapped) < target]
        stats.skipped += len(rows) - len(stale)
        if stale:
            ctx = [context(i) for i, _ in stale] if callable(context) else context
            new = provider.rewrap_many([w for _, w in stale], ctx)
            store_batch([(row_id, wrapped) for (row_id, _), wrapped in zip(stale, new, strict=True)])
            stats.rewrapped += len(stale)
        stats.batches += 1
        if progress is not None:
            progress(stats)
    return stats
