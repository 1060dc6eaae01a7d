"""The store on its own: names and paths, atomic files, manifests that cannot be read, the LRU budget."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from adapters.mlx_lm.blas import load_optimised_blas

load_optimised_blas()

import mlx.core as mx  # noqa: E402
from mlx_lm.models.cache import KVCache  # noqa: E402

from prefix_caches import (  # noqa: E402
    InvalidCacheName,
    Manifest,
    PrefixCacheNotFound,
    PrefixCacheStore,
    kv,  # noqa: E402
)
from prefix_caches.names import cache_paths, tenant_dir  # noqa: E402
from prefix_caches.store import tokens_sha256  # noqa: E402


def kv_cache(tokens: int, layers: int = 2) -> list[KVCache]:
    cache = [KVCache() for _ in range(layers)]
    for c in cache:
        c.update_and_fetch(mx.random.normal((1, 2, tokens, 32)), mx.random.normal((1, 2, tokens, 32)))
    return cache


def manifest(name: str, tokens: int, tenant: str = "t") -> Manifest:
    ids = list(range(tokens))
    return Manifest(
        name=name,
        tenant=tenant,
        model="m",
        model_fingerprint="f",
        tokenizer_fingerprint="t",
        chat_template_fingerprint="c",
        mlx_version="0.32.4",
        mlx_lm_version="0.32.2",
        source="prompt",
        tokens=ids,
        tokens_sha256=tokens_sha256(ids),
        created_at=time.time(),
    )


def test_saved_file_holds_only_the_prefix(tmp_path: Path) -> None:
    store = PrefixCacheStore(tmp_path)
    cache = kv_cache(10)
    assert cache[0].keys.shape[2] == 256  # mlx-lm's buffer: padding past the offset
    saved = store.save(manifest("a", 10), kv.exact(cache))
    loaded, resident = PrefixCacheStore(tmp_path).arrays(saved)
    assert not resident and loaded[0].keys.shape[2] == 10 and loaded[0].offset == 10
    assert kv.arrays_sha256(loaded) == kv.arrays_sha256(kv.exact(cache))
    assert not [p for p in tmp_path.rglob("*") if ".tmp" in p.name]  # atomic writes leave no temp files


def test_views_never_write_into_the_stored_arrays(tmp_path: Path) -> None:
    stored = kv.exact(kv_cache(10))
    before = kv.arrays_sha256(stored)
    for reuse in (10, 9, 3):  # an exact hit trims one token: writes then land inside the old length
        mine = kv.view(stored, reuse)
        for c in mine:
            c.update_and_fetch(mx.ones((1, 2, 4, 32)), mx.ones((1, 2, 4, 32)))
        mx.eval([c.keys for c in mine])
    assert kv.arrays_sha256(stored) == before


def test_names_cannot_escape_the_store(tmp_path: Path) -> None:
    for bad in ("../x", "a/b", "", ".x", "x" * 129, "a\x00b"):
        with pytest.raises(InvalidCacheName):
            cache_paths(tmp_path, "t", bad)
    # A tenant folder that is a symlink pointing outside is refused.
    outside = tmp_path.parent / "outside"
    outside.mkdir(exist_ok=True)
    tenant_dir(tmp_path, "evil").symlink_to(outside)
    with pytest.raises(InvalidCacheName):
        cache_paths(tmp_path, "evil", "name")


def test_unreadable_manifests_are_ignored(tmp_path: Path) -> None:
    store = PrefixCacheStore(tmp_path)
    store.save(manifest("good", 4), kv.exact(kv_cache(4)))
    folder = tenant_dir(tmp_path, "t")
    (folder / "broken.json").write_text("{not json")
    (folder / "other.json").write_text('{"name": "x"}')
    again = PrefixCacheStore(tmp_path)
    again.scan()
    assert [m.name for m in again.list("t")] == ["good"]
    assert again.list("someone-else") == []
    with pytest.raises(PrefixCacheNotFound):
        again.get("someone-else", "good")


def test_lru_keeps_within_the_byte_budget(tmp_path: Path) -> None:
    one = kv.cache_nbytes(kv.exact(kv_cache(8)))
    store = PrefixCacheStore(tmp_path, memory_budget_bytes=2 * one)
    for name in ("a", "b"):
        store.save(manifest(name, 8), kv.exact(kv_cache(8)))
    store.arrays(store.get("t", "a"))  # a is now the most recently used
    store.save(manifest("c", 8), kv.exact(kv_cache(8)))
    assert store.stats()["resident"] == 2 and store.stats()["bytes_in_memory"] <= 2 * one
    assert store.arrays(store.get("t", "a"))[1] is True  # still resident
    assert store.arrays(store.get("t", "b"))[1] is False  # evicted: read back from disk
