"""A tenant's storage quotas in the store: count, bytes on disk, bytes resident. A refused cache changes
nothing stored; a replace counts the old version's bytes as freed; memory makes room from the tenant's own
caches only."""

from __future__ import annotations

from pathlib import Path

import pytest

from prefix_caches import PrefixCacheQuotaExceeded, PrefixCacheStore, StorageQuota, kv
from prefix_caches.names import cache_paths
from tests.prefix_caches.test_store import kv_cache, manifest


def _one_size(tmp_path: Path, name: str, tokens: int) -> int:
    """A cache's file size (the same for any content of that shape and name)."""
    probe = PrefixCacheStore(tmp_path / "probe")
    return probe.save(manifest(name, tokens), kv.exact(kv_cache(tokens))).size_bytes


def test_count_quota_refuses_a_new_cache_but_not_a_replace(tmp_path: Path) -> None:
    store = PrefixCacheStore(tmp_path, quota_of=lambda t: StorageQuota(max_caches=1 if t == "t" else None))
    store.check_new("t", "a", replace=False)
    store.save(manifest("a", 8), kv.exact(kv_cache(8)))
    with pytest.raises(PrefixCacheQuotaExceeded) as refused:
        store.check_new("t", "b", replace=False)
    assert refused.value.quota == "prefix_cache_count_quota" and "may keep 1 prefix caches and has 1" in str(
        refused.value
    )
    with pytest.raises(PrefixCacheQuotaExceeded):  # the check at save, where concurrent creates meet
        store.save(manifest("b", 8), kv.exact(kv_cache(8)))
    assert not cache_paths(tmp_path, "t", "b")[0].exists() and [m.name for m in store.list("t")] == ["a"]
    store.check_new("t", "a", replace=True)
    store.save(manifest("a", 16), kv.exact(kv_cache(16)))  # a replace: still one cache
    store.save(manifest("x", 8, tenant="other"), kv.exact(kv_cache(8)))  # another tenant: its own quota
    store.save(manifest("y", 8, tenant="other"), kv.exact(kv_cache(8)))


def test_disk_quota_counts_a_replaced_version_as_freed_and_a_refusal_keeps_the_old(tmp_path: Path) -> None:
    small, large = _one_size(tmp_path, "b", 8), _one_size(tmp_path, "a", 64)
    store = PrefixCacheStore(tmp_path / "s", quota_of=lambda _: StorageQuota(max_disk_bytes=small + large - 1))
    old = store.save(manifest("a", 64), kv.exact(kv_cache(64)))
    store.save(manifest("a", 64), kv.exact(kv_cache(64)))  # large replacing large: fits (old bytes freed)
    kept = store.get("t", "a")
    with pytest.raises(PrefixCacheQuotaExceeded) as refused:
        store.save(manifest("b", 8), kv.exact(kv_cache(8)))  # large + small > quota
    assert refused.value.quota == "prefix_cache_disk_quota"
    assert f"uses {large}; this cache takes {small}" in str(refused.value)
    arrays, _ = cache_paths(store.root, "t", "a")
    assert store.get("t", "a") is kept and arrays.stat().st_size == kept.size_bytes == old.size_bytes
    assert store.arrays(kept)[0][0].offset == 64  # the stored cache still loads
    assert not any(p.name.startswith(".") for p in arrays.parent.iterdir())  # no temporary left behind
    store.delete("t", "a")
    store.save(manifest("b", 8), kv.exact(kv_cache(8)))  # room again


def test_disk_quota_already_spent_refuses_before_the_build(tmp_path: Path) -> None:
    store = PrefixCacheStore(tmp_path, quota_of=lambda _: StorageQuota(max_disk_bytes=1))
    with pytest.raises(PrefixCacheQuotaExceeded):
        store.save(manifest("a", 8), kv.exact(kv_cache(8)))
    store.check_new("t", "a", replace=False)  # nothing used yet: a build may try
    store2 = PrefixCacheStore(tmp_path / "2", quota_of=lambda t: StorageQuota(max_disk_bytes=10**9 if t else 0))
    store2.save(manifest("a", 8), kv.exact(kv_cache(8)))
    store2.quota_of = lambda _: StorageQuota(max_disk_bytes=1)  # now over (a quota lowered by a restart)
    with pytest.raises(PrefixCacheQuotaExceeded):
        store2.check_new("t", "b", replace=False)


def test_memory_quota_evicts_the_tenants_own_lru_never_another_tenants(tmp_path: Path) -> None:
    one = kv.cache_nbytes(kv.exact(kv_cache(8)))
    store = PrefixCacheStore(
        tmp_path, quota_of=lambda t: StorageQuota(max_memory_bytes=2 * one) if t == "t" else StorageQuota()
    )
    store.save(manifest("o1", 8, tenant="other"), kv.exact(kv_cache(8)))
    for name in ("a", "b"):
        store.save(manifest(name, 8), kv.exact(kv_cache(8)))
    store.arrays(store.get("t", "a"))  # a is the tenant's most recently used
    store.save(manifest("c", 8), kv.exact(kv_cache(8)))
    usage = store.usage()
    assert usage[("m", "t")].resident == 2 and usage[("m", "t")].bytes_in_memory <= 2 * one
    assert store.is_resident(store.get("t", "a")) and not store.is_resident(store.get("t", "b"))
    assert store.is_resident(store.get("other", "o1"))  # older than all of them, and kept
    store.save(manifest("big", 64), kv.exact(kv_cache(64)))  # alone larger than the quota
    assert not store.is_resident(store.get("t", "big")) and store.is_resident(store.get("t", "c"))
