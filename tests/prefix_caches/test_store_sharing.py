"""Several stores on one directory, as replicas sharing a volume: creates, replaces and deletes made by one
are seen by the others, resident copies of an old version are dropped, concurrent replaces leave one whole
version, and hit counts add up instead of overwriting each other."""

from __future__ import annotations

import multiprocessing
import time
from pathlib import Path

import pytest

from adapters.mlx_lm.blas import load_optimised_blas

load_optimised_blas()

import mlx.core as mx  # noqa: E402

from prefix_caches import PrefixCacheExists, PrefixCacheNotFound, PrefixCacheStore, PrefixCacheUnusable, kv  # noqa: E402
from prefix_caches.names import cache_paths  # noqa: E402
from prefix_caches.store import file_sha256  # noqa: E402
from tests.prefix_caches.test_store import kv_cache, manifest  # noqa: E402


def test_a_cache_created_replaced_and_deleted_by_one_store_is_seen_by_another(tmp_path: Path) -> None:
    a, b = PrefixCacheStore(tmp_path), PrefixCacheStore(tmp_path)
    a.scan()
    b.scan()
    first = a.save(manifest("shared", 8), kv.exact(kv_cache(8)))
    assert first.version == 1
    with pytest.raises(PrefixCacheNotFound):
        b.get("t", "shared")  # not synced yet
    assert b.sync() == 1
    seen = b.get("t", "shared")
    assert (seen.version, seen.file_sha256) == (1, first.file_sha256)
    loaded, resident = b.arrays(seen)
    assert not resident and b.is_resident(seen)
    assert kv.arrays_sha256(loaded) == a.resident_sha256("t", "shared")

    second = a.save(manifest("shared", 12), kv.exact(kv_cache(12)))
    assert second.version == 2 and second.file_sha256 != first.file_sha256
    assert b.sync() == 1
    newer = b.get("t", "shared")
    assert (newer.version, newer.num_tokens) == (2, 12)
    assert b.resident_sha256("t", "shared") is None  # the old version's resident copy was dropped
    reloaded, resident = b.arrays(newer)
    assert not resident and reloaded[0].offset == 12
    assert b.sync() == 0  # nothing changed since

    a.delete("t", "shared")
    assert b.sync() == 1
    with pytest.raises(PrefixCacheNotFound):
        b.get("t", "shared")
    assert b.resident_sha256("t", "shared") is None


def test_a_reader_holding_an_old_manifest_never_gets_the_new_file(tmp_path: Path) -> None:
    a, b = PrefixCacheStore(tmp_path), PrefixCacheStore(tmp_path)
    a.save(manifest("x", 8), kv.exact(kv_cache(8)))
    b.sync()
    old = b.get("t", "x")
    a.save(manifest("x", 16), kv.exact(kv_cache(16)))
    with pytest.raises(PrefixCacheUnusable, match="replaced on disk by version 2"):
        b.arrays(old)
    b.sync()
    cache, _ = b.arrays(b.get("t", "x"))
    assert cache[0].offset == 16


def test_a_delete_through_one_store_of_a_cache_it_has_not_synced_yet(tmp_path: Path) -> None:
    a, b = PrefixCacheStore(tmp_path), PrefixCacheStore(tmp_path)
    a.save(manifest("y", 8), kv.exact(kv_cache(8)))
    b.delete("t", "y")  # the disk decides, not b's index
    assert not any(p.exists() for p in cache_paths(tmp_path, "t", "y"))
    with pytest.raises(PrefixCacheNotFound):
        b.delete("t", "y")
    a.sync()
    with pytest.raises(PrefixCacheNotFound):
        a.get("t", "y")


def test_a_create_refuses_a_name_another_store_took_before_it_synced(tmp_path: Path) -> None:
    a, b = PrefixCacheStore(tmp_path), PrefixCacheStore(tmp_path)
    a.save(manifest("taken", 8), kv.exact(kv_cache(8)))
    with pytest.raises(PrefixCacheExists):
        b.check_new("t", "taken", replace=False)
    b.check_new("t", "taken", replace=True)  # a replace may go ahead


def test_watch_sees_another_stores_writes_within_its_interval(tmp_path: Path) -> None:
    a, b = PrefixCacheStore(tmp_path), PrefixCacheStore(tmp_path)
    b.watch(0.2)
    try:
        saved = a.save(manifest("w", 8), kv.exact(kv_cache(8)))
        started = time.monotonic()
        while True:
            try:
                seen = b.get("t", "w")
                break
            except PrefixCacheNotFound:
                assert time.monotonic() - started < 2.0, "not seen within 10 intervals"
                time.sleep(0.02)
        waited = time.monotonic() - started
        assert seen.file_sha256 == saved.file_sha256
        assert waited < 0.6, f"seen after {waited:.2f} s with a 0.2 s interval"
    finally:
        b.close()


def test_hits_counted_by_two_stores_add_up_on_disk(tmp_path: Path) -> None:
    a, b = PrefixCacheStore(tmp_path), PrefixCacheStore(tmp_path)
    a.save(manifest("h", 8), kv.exact(kv_cache(8)))
    b.sync()
    for _ in range(2):
        a.record_hit("t", "h")
    for _ in range(3):
        b.record_hit("t", "h")
    a.flush()
    b.flush()
    fresh = PrefixCacheStore(tmp_path)
    fresh.scan()
    assert fresh.get("t", "h").hits == 5
    a.sync()
    assert a.get("t", "h").hits == 5


def _replace_many(root: str, tokens: int, rounds: int) -> None:
    store = PrefixCacheStore(Path(root))
    mx.random.seed(tokens)
    for _ in range(rounds):
        store.save(manifest("race", tokens), kv.exact(kv_cache(tokens)))


def test_two_processes_replacing_one_cache_at_once_leave_one_whole_version(tmp_path: Path) -> None:
    rounds = 6
    spawn = multiprocessing.get_context("spawn")
    workers = [spawn.Process(target=_replace_many, args=(str(tmp_path), n, rounds)) for n in (8, 24)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(120)
        assert w.exitcode == 0
    store = PrefixCacheStore(tmp_path)
    store.scan()
    final = store.get("t", "race")
    assert final.version == 2 * rounds  # every replace built on the one before: none lost
    arrays_path, _ = cache_paths(tmp_path, "t", "race")
    assert file_sha256(arrays_path) == final.file_sha256
    cache, _ = store.arrays(final)
    assert {c.offset for c in cache} == {final.num_tokens} and final.num_tokens in (8, 24)
    assert not [p for p in tmp_path.rglob("*") if ".tmp" in p.name]


def test_a_replica_starting_while_another_saves_leaves_that_save_alone(tmp_path: Path) -> None:
    """Start-up recovery sweeps a crashed save's files, but not those of a save another replica is making
    (it holds the cache's save lock); once that save is over, or was a crash, they are swept."""
    from prefix_caches.sharing import save_lock

    a = PrefixCacheStore(tmp_path)
    a.scan()
    a.save(manifest("other", 8), kv.exact(kv_cache(8)))
    arrays_path, _ = cache_paths(tmp_path, "t", "busy")
    folder = arrays_path.parent
    temp = folder / ".busy.4242.7.tmp.safetensors"  # a save still writing
    pending = folder / f".busy.pending-{'0' * 64}.safetensors"  # a save staged, about to commit
    for path in (temp, pending):
        path.write_bytes(b"partial")
    with save_lock(tmp_path, "t", "busy"):  # the other replica, mid-save
        PrefixCacheStore(tmp_path).scan()
        assert temp.exists() and pending.exists()
    PrefixCacheStore(tmp_path).scan()  # nobody saves "busy" now: these are a crash's leftovers
    assert not temp.exists() and not pending.exists()
    b = PrefixCacheStore(tmp_path)
    b.scan()
    assert b.get("t", "other").version == 1


def test_two_replicas_creating_one_name_at_once_keep_the_first(tmp_path: Path) -> None:
    """Both passed their own check before either committed: the second create (not a replace) is refused
    at its commit, the first version stays whole, and the refused save leaves no file behind."""
    a, b = PrefixCacheStore(tmp_path), PrefixCacheStore(tmp_path)
    a.scan()
    b.scan()
    first = a.save(manifest("dup", 8), kv.exact(kv_cache(8)), replace=False)
    with pytest.raises(PrefixCacheExists):
        b.save(manifest("dup", 12), kv.exact(kv_cache(12)), replace=False)
    b.sync()
    kept = b.get("t", "dup")
    assert (kept.version, kept.num_tokens, kept.file_sha256) == (1, 8, first.file_sha256)
    folder = cache_paths(tmp_path, "t", "dup")[0].parent
    assert sorted(p.name for p in folder.iterdir()) == ["dup.json", "dup.safetensors"]
    assert b.save(manifest("dup", 12), kv.exact(kv_cache(12))).version == 2  # a replace still works
