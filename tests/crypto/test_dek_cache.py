"""DekCache: bounded LRU with TTL, explicit eviction, metrics, thread safety."""

from __future__ import annotations

import threading

from prometheus_client import REGISTRY

from crypto import DekCache, new_dek


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_returns_what_was_put_until_the_ttl_passes() -> None:
    clock = FakeClock()
    cache = DekCache(max_size=10, ttl=300.0, clock=clock)
    dek = new_dek()
    cache.put("s1", dek)
    clock.now += 299
    assert cache.get("s1") == dek
    clock.now += 2
    assert cache.get("s1") is None
    assert len(cache) == 0


def test_least_recently_used_goes_first_when_full() -> None:
    cache = DekCache(max_size=2, ttl=60.0)
    cache.put("a", new_dek())
    cache.put("b", new_dek())
    assert cache.get("a") is not None  # a is now the most recent
    cache.put("c", new_dek())
    assert cache.get("b") is None
    assert cache.get("a") is not None and cache.get("c") is not None


def test_explicit_eviction_and_clear_forget_keys() -> None:
    cache = DekCache()
    cache.put("erased-subject", new_dek())
    cache.put("other", new_dek())
    cache.evict("erased-subject")
    cache.evict("never-cached")
    assert cache.get("erased-subject") is None
    cache.clear()
    assert cache.get("other") is None


def test_counts_hits_misses_and_evictions() -> None:
    hits, misses = _metric("appliance_dek_cache_hits_total"), _metric("appliance_dek_cache_misses_total")
    lru, explicit = (_metric("appliance_dek_cache_evictions_total", reason=r) for r in ("lru", "explicit"))
    cache = DekCache(max_size=1)
    cache.put("a", new_dek())
    cache.get("a")
    cache.get("zzz")
    cache.put("b", new_dek())
    cache.evict("b")
    assert _metric("appliance_dek_cache_hits_total") == hits + 1
    assert _metric("appliance_dek_cache_misses_total") == misses + 1
    assert _metric("appliance_dek_cache_evictions_total", reason="lru") == lru + 1
    assert _metric("appliance_dek_cache_evictions_total", reason="explicit") == explicit + 1


def test_repr_never_shows_keys() -> None:
    cache = DekCache()
    dek = new_dek()
    cache.put("s", dek)
    assert dek.hex() not in repr(cache) and "s" not in repr(cache).replace("size", "")


def test_stays_bounded_and_consistent_under_concurrent_use() -> None:
    cache = DekCache(max_size=100, ttl=60.0)
    deks = {i: new_dek() for i in range(500)}
    errors: list[str] = []

    def worker(offset: int) -> None:
        for n in range(2000):
            key = (n * 7 + offset) % 500
            cache.put(key, deks[key])
            got = cache.get((key + 3) % 500)
            if got is not None and got != deks[(key + 3) % 500]:
                errors.append("wrong dek")
            if n % 50 == 0:
                cache.evict(key)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(cache) <= 100
