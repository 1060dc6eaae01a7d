"""The store from the threads that use it at once: the engine keeps, loads, saves and evicts KV; HTTP worker
threads read usage, stats and listings and delete caches; the replicas' sync thread re-reads the directory."""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from adapters.mlx_lm.blas import load_optimised_blas

load_optimised_blas()

from prefix_caches import Manifest, PrefixCacheNotFound, PrefixCacheStore, PrefixCacheUnusable, kv  # noqa: E402
from prefix_caches import store as store_module  # noqa: E402
from tests.prefix_caches.test_store import kv_cache, manifest  # noqa: E402

SECONDS = 2.5
BUDGET_CACHES = 12


@contextlib.contextmanager
def switching_often() -> Iterator[None]:
    """Threads take turns every 10 µs instead of every 5 ms: more of their interleavings are tried."""
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    try:
        yield
    finally:
        sys.setswitchinterval(interval)


def until(stop: threading.Event, errors: list[BaseException], step: Callable[[], object]) -> Callable[[], None]:
    def loop() -> None:
        try:
            while not stop.is_set():
                step()
        except BaseException as exc:  # reported by the test, not lost in a thread
            errors.append(exc)
            stop.set()

    return loop


def test_other_threads_read_the_store_while_the_engine_and_sync_change_it(tmp_path: Path) -> None:
    """No reader raises or sees a half-made change (a cache kept before the LRU made room for it).

    When readers copied the engine's live LRU, this failed in most runs with 13 caches resident under a
    budget of 12; "changed size during iteration" itself was never provoked (the copy is one C call).
    """
    one = kv.cache_nbytes(kv.exact(kv_cache(4)))
    budget = BUDGET_CACHES * one
    store = PrefixCacheStore(tmp_path, memory_budget_bytes=budget)
    names = [f"c{i}" for i in range(2 * BUDGET_CACHES)]
    caches = {name: kv.exact(kv_cache(4)) for name in names}
    for name in names:
        store.save(manifest(name, 4), caches[name])
    turns = iter(range(1 << 62))

    def engine() -> None:
        i = next(turns)
        name = names[i % len(names)]
        m = store.get("t", name)
        if i % 3 == 0:
            store.evict("t", name)
            store.arrays(m)  # read back from disk, kept again
        else:
            store.keep_recomputed(m, caches[name])
        if i % 100 == 0:  # the disk's turn: a few manifests written (each save or flush waits for fsyncs)
            store.record_hit("t", name)
            store.flush()
            store.save(manifest(f"scratch{i}", 4), caches[name])

    def worker() -> None:
        for m in store.list("t"):
            if m.name.startswith("scratch"):
                with contextlib.suppress(PrefixCacheNotFound):
                    store.delete("t", m.name)
        time.sleep(0.01)

    def reader() -> None:
        stats = store.stats()
        # What the engine publishes is whole: never a cache kept before the LRU made room for it.
        assert stats["bytes_in_memory"] <= budget and stats["resident"] <= BUDGET_CACHES, stats
        assert stats["count"] >= len(names)
        assert sum(u.resident for u in store.usage().values()) <= BUDGET_CACHES
        assert len(store.list("t")) >= len(names) and len(store.all()) >= len(names)
        store.is_resident(store.get("t", "c0"))
        assert store.status("t", "c1").state == "ready"

    stop, errors = threading.Event(), []
    threads = [threading.Thread(target=until(stop, errors, store.sync), name="sync")]
    threads += [threading.Thread(target=until(stop, errors, worker), name="worker")]
    threads += [threading.Thread(target=until(stop, errors, reader), name=f"reader{i}") for i in range(2)]
    with switching_often():
        for t in threads:
            t.start()
        try:
            deadline = time.monotonic() + SECONDS
            while time.monotonic() < deadline and not stop.is_set():
                with contextlib.suppress(PrefixCacheUnusable):  # a scratch cache deleted meanwhile
                    engine()
        finally:
            stop.set()
            for t in threads:
                t.join()
    assert not errors, errors
    assert next(turns) > 50  # the engine did turn meanwhile


@pytest.fixture
def sync_paused(monkeypatch: pytest.MonkeyPatch) -> tuple[threading.Event, threading.Event]:
    """(read, go): a sync stops right after reading a manifest (``read`` is set) until ``go`` is set."""
    read, go = threading.Event(), threading.Event()
    real = store_module.read_manifest

    def paused(root: Path, path: Path) -> Manifest:
        manifest = real(root, path)
        read.set()
        assert go.wait(10)
        return manifest

    monkeypatch.setattr(store_module, "read_manifest", paused)
    return read, go


def sync_around(
    store: PrefixCacheStore, paused: tuple[threading.Event, threading.Event], meanwhile: Callable[[], object]
) -> None:
    """Run ``store.sync()`` on its own thread, and ``meanwhile`` between its read of a manifest and the rest."""
    read, go = paused
    syncing = threading.Thread(target=store.sync, name="sync")
    syncing.start()
    try:
        assert read.wait(10)
        meanwhile()
    finally:
        go.set()
        syncing.join()


@pytest.mark.parametrize("synced_before", [False, True])
def test_a_sync_that_read_a_manifest_before_a_delete_here_does_not_bring_it_back(
    tmp_path: Path, sync_paused: tuple[threading.Event, threading.Event], synced_before: bool
) -> None:
    a, b = PrefixCacheStore(tmp_path), PrefixCacheStore(tmp_path)
    a.save(manifest("x", 4), kv.exact(kv_cache(4)))
    if synced_before:
        go = sync_paused[1]
        go.set()
        b.sync()
        go.clear()
        a.record_hit("t", "x")
        a.flush()  # the manifest file changes: b's next sync reads it again
    sync_around(b, sync_paused, lambda: b.delete("t", "x"))
    with pytest.raises(PrefixCacheNotFound):
        b.get("t", "x")
    assert b.list("t") == [] and b.usage() == {}


def test_a_sync_that_read_an_older_version_than_a_save_here_keeps_the_save(
    tmp_path: Path, sync_paused: tuple[threading.Event, threading.Event]
) -> None:
    a, b = PrefixCacheStore(tmp_path), PrefixCacheStore(tmp_path)
    a.save(manifest("x", 4), kv.exact(kv_cache(4)))
    saved: list[Manifest] = []
    sync_around(b, sync_paused, lambda: saved.append(b.save(manifest("x", 6), kv.exact(kv_cache(6)))))
    current = b.get("t", "x")
    assert current.version == 2 and current.file_sha256 == saved[0].file_sha256
    assert b.is_resident(current)
