"""KEK rotation of 100,000 wrapped keys: killed half-way, resumed, then the old version retired."""

from __future__ import annotations

import pytest

from crypto import KeyNotFound, RewrapProgress, new_dek, rewrap_all
from crypto.providers import KeyProvider

ROWS = 100_000
BATCH = 5000


class Killed(Exception):
    """Stands in for the CLI being killed between two batches."""


class MemoryTable:
    """A list as the table of wrapped keys (row id = index); the DB-level test lives in tests/appliance."""

    def __init__(self, provider: KeyProvider, wrapped: list[bytes]) -> None:
        self.provider = provider
        self.rows = list(wrapped)
        self.stored_batches = 0
        self.kill_after: int | None = None

    def fetch_batch(self, below_version: int, after: int | None, limit: int) -> list[tuple[int, bytes]]:
        out = []
        for row_id in range(0 if after is None else after + 1, len(self.rows)):
            if self.provider.wrapped_version(self.rows[row_id]) < below_version:
                out.append((row_id, self.rows[row_id]))
                if len(out) == limit:
                    break
        return out

    def store_batch(self, rows: list[tuple[int, bytes]]) -> None:
        if self.kill_after is not None and self.stored_batches >= self.kill_after:
            raise Killed
        for row_id, wrapped in rows:
            self.rows[row_id] = wrapped
        self.stored_batches += 1

    def versions(self) -> set[int]:
        return {self.provider.wrapped_version(w) for w in self.rows}


def _context(row_id: int) -> bytes:
    return b"subject-key:%d" % row_id


def test_rewrap_of_100k_keys_resumes_after_a_kill_and_retires_the_old_version(provider: KeyProvider) -> None:
    deks = [new_dek() for _ in range(ROWS)]
    contexts = [_context(i) for i in range(ROWS)]
    original = provider.wrap_many(deks, contexts)
    table = MemoryTable(provider, original)
    target = provider.rotate_kek()
    assert target == 2

    table.kill_after = 10
    with pytest.raises(Killed):
        rewrap_all(provider, table.fetch_batch, table.store_batch, batch_size=BATCH, context=_context)
    half = sum(provider.wrapped_version(w) == target for w in table.rows)
    assert half == 10 * BATCH
    # Mid-rotation the service keeps serving: both versions unwrap.
    assert provider.unwrap_many([table.rows[0], table.rows[-1]], [contexts[0], contexts[-1]]) == [deks[0], deks[-1]]

    table.kill_after = None
    seen: list[RewrapProgress] = []
    stats = rewrap_all(
        provider, table.fetch_batch, table.store_batch, batch_size=BATCH, context=_context, progress=seen.append
    )
    assert stats.rewrapped == ROWS - half and stats.target_version == target
    assert seen and seen[-1].rewrapped == ROWS - half
    assert table.versions() == {target}
    assert provider.unwrap_many(table.rows, contexts) == deks

    provider.set_min_decryption_version(target)
    assert provider.unwrap_many(table.rows[:10], contexts[:10]) == deks[:10]
    with pytest.raises(KeyNotFound):
        provider.unwrap_many(original[:10], contexts[:10])


def test_rewrap_skips_rows_already_at_the_target(provider: KeyProvider) -> None:
    rows = provider.wrap_many([new_dek() for _ in range(5)])
    provider.rotate_kek()
    rows.append(provider.wrap(new_dek()))
    store: list[tuple[int, bytes]] = []

    def fetch_everything_once(below: int, after: int | None, limit: int) -> list[tuple[int, bytes]]:
        return [] if after is not None else list(enumerate(rows))  # a table without a version filter

    stats = rewrap_all(provider, fetch_everything_once, store.extend)
    assert (stats.rewrapped, stats.skipped, stats.batches) == (5, 1, 1)
    assert [i for i, _ in store] == [0, 1, 2, 3, 4]
