"""Per-object DEKs wrapped ahead of use, against the stack's real Vault: one transit call per batch,
every key fresh and bound to the media id it is handed out with, none older than ``max_age``."""

from __future__ import annotations

import uuid
from typing import Any

import psycopg
import pytest

from crypto.errors import AuthenticationError
from media.crypt import DekReserve, wrap_context
from tests.media import samples


class CountingProvider:
    """The real provider, counting wrap round trips (a spy, not a stand-in: every call reaches Vault)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.calls = 0

    def wrap_many(self, deks: list[bytes], context: Any = b"") -> list[bytes]:
        self.calls += 1
        return self.inner.wrap_many(deks, context)  # type: ignore[no-any-return]

    def wrapped_version(self, wrapped: bytes) -> int:
        return self.inner.wrapped_version(wrapped)  # type: ignore[no-any-return]


@pytest.fixture
def provider(app, client) -> CountingProvider:  # type: ignore[no-untyped-def]
    return CountingProvider(app.state.appliance.keys)


def test_one_round_trip_wraps_a_batch_of_fresh_keys_bound_to_their_ids(provider):  # type: ignore[no-untyped-def]
    reserve = DekReserve(lambda: provider, batch=16)  # type: ignore[arg-type, return-value]
    keys = [k for _ in range(5) for k in reserve.take(3)]
    assert provider.calls == 1  # 15 keys out of one batch of 16
    assert len({k.media_id for k in keys}) == 15 and len({k.dek for k in keys}) == 15
    vault = provider.inner
    assert vault.unwrap_many([k.wrapped for k in keys], [wrap_context(k.media_id) for k in keys]) == [
        k.dek for k in keys]
    assert all(k.kek_version == vault.kek_version() for k in keys)
    with pytest.raises(AuthenticationError):  # the wrap context names the media id: no other row can use it
        vault.unwrap(keys[0].wrapped, wrap_context(keys[1].media_id))
    reserve.take(3)  # one left in the batch: a new batch, the leftover dropped
    assert provider.calls == 2
    assert "dek=" not in repr(keys[0]) and keys[0].dek.hex() not in repr(keys[0])


def test_keys_older_than_max_age_are_never_handed_out(provider):  # type: ignore[no-untyped-def]
    now = [1000.0]
    reserve = DekReserve(lambda: provider, batch=8, max_age=5.0, clock=lambda: now[0])  # type: ignore[arg-type, return-value]
    first = reserve.take(1)[0]
    now[0] += 4.9
    reserve.take(1)
    assert provider.calls == 1
    now[0] += 0.2  # the batch is now 5.1 s old: a KEK rotated meanwhile must reach the next upload
    fresh = reserve.take(1)[0]
    assert provider.calls == 2 and fresh.media_id != first.media_id


def test_while_the_provider_is_down_queued_uploads_fail_fast_then_retry():  # type: ignore[no-untyped-def]
    """Refills are serialised: without the fail-fast, N queued uploads would wait N Vault timeouts."""
    from appliance.stack.process import free_port
    from crypto.errors import KeyProviderUnavailable
    from crypto.providers.vault import VaultTransitProvider

    down = CountingProvider(VaultTransitProvider(f"http://127.0.0.1:{free_port()}", "role", "secret", timeout=0.5))
    now = [0.0]
    reserve = DekReserve(lambda: down, retry_after=1.0, clock=lambda: now[0])  # type: ignore[arg-type, return-value]
    with pytest.raises(KeyProviderUnavailable):
        reserve.take(3)
    assert down.calls == 1
    now[0] += 0.5
    with pytest.raises(KeyProviderUnavailable, match="moments ago"):
        reserve.take(3)
    assert down.calls == 1  # failed at once, without its own round trip
    now[0] += 0.6
    with pytest.raises(KeyProviderUnavailable):
        reserve.take(3)
    assert down.calls == 2  # past retry_after: tries the provider again


def test_each_row_of_an_unlinked_upload_has_its_own_dek_wrapped_for_its_own_id(app, client, media_headers,
                                                                                admin_dsn):
    """What KEK rotation relies on (appliance.keyring rewraps media.wrapped_dek with the row's own id)."""
    r = client.post("/v1/media", content=samples.jpeg(), headers={**media_headers,
                                                                  "Content-Type": "application/octet-stream"})
    media_id = r.json()["id"]
    with psycopg.connect(admin_dsn) as conn:
        rows = conn.execute("SELECT id, wrapped_dek, kek_version FROM media WHERE id = %s OR parent_id = %s",
                            (media_id, media_id)).fetchall()
    assert len(rows) == 3 and len({bytes(w) for _, w, _ in rows}) == 3
    vault = app.state.appliance.keys
    deks = vault.unwrap_many([bytes(w) for _, w, _ in rows], [wrap_context(i) for i, _, _ in rows])
    assert len(set(deks)) == 3
    assert all(v == vault.wrapped_version(bytes(w)) for _, w, v in rows)
    with pytest.raises(AuthenticationError):
        vault.unwrap(bytes(rows[0][1]), wrap_context(uuid.uuid4()))


def test_kek_rotation_rewraps_thumbnail_rows_which_still_open(app, client, media_headers, admin_dsn):
    """Thumbnails sealed in their rows keep their own wrapped DEK, so the keyring's media pass covers them."""
    from appliance.keyring import TABLES, rewrap_table

    media_id = client.post("/v1/media", content=samples.jpeg(), headers={
        **media_headers, "Content-Type": "application/octet-stream"}).json()["id"]
    urls = [f"/v1/media/{media_id}", *(f"/v1/media/{media_id}/thumbnail?size={s}" for s in (128, 256))]
    before = [client.get(url, headers=media_headers).content for url in urls]
    vault = app.state.appliance.keys
    target = vault.rotate_kek()
    with psycopg.connect(admin_dsn) as conn:
        rewrap_table(conn, vault, next(t for t in TABLES if t.table == "media"), 1000)
        versions = conn.execute("SELECT kek_version, wrapped_dek FROM media WHERE id = %s OR parent_id = %s",
                                (media_id, media_id)).fetchall()
    assert len(versions) == 3 and all(v == target == vault.wrapped_version(bytes(w)) for v, w in versions)
    app.state.appliance.media.dek_cache.clear()  # unwrap the rewrapped keys, not cached ones
    assert [client.get(url, headers=media_headers).content for url in urls] == before
