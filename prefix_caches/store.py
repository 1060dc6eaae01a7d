"""The persistent store: one safetensors file and one manifest per cache, under a tenant's folder.

KV arrays are loaded, kept (LRU under a byte budget) and saved on the engine thread only. Every write is
atomic: a temporary file in the same folder, fsync, ``os.replace``, fsync of the folder; a save's two files
are staged so that a crash leaves the old or the new version (``prefix_caches.durable``).

Threads. Three kinds call a store at once: the engine thread (``save``, ``arrays``, ``keep_recomputed``,
``evict``, ``resident_sha256``, ``estimated_load_seconds``, ``flush``, ``record_hit``); the gateway's event
loop and worker threads (``get``, ``status``, ``list``, ``all``, ``is_resident``, ``usage``, ``stats``,
``record_miss``, and ``check_new`` and ``delete``, which read the disk); the sync thread of ``watch``
(``sync``). Who owns each piece of ``PrefixCacheStore``'s state, and how the others read it:

- ``root``, ``memory_budget``, ``quota_of``: fixed at construction; read directly.
- ``_manifests``, ``_status``, ``_dirty``, ``_hit_delta``, ``_use``, ``_drop``, ``_seen``: guarded by
  ``_lock``, read and written under it by any thread. A manifest or status in the index is never changed in
  place (a hit or a sync replaces it), so what ``get``/``list``/``all``/``status`` return is a snapshot; a
  manifest handed to ``save`` becomes the index's and must not be changed after. ``usage`` copies counters.
- ``_resident`` (the KV arrays), ``_verified``, ``load_rate``, ``hash_rate``: the engine thread's alone.
  It publishes what others need as immutable figures, replaced under ``_lock`` whenever they change:
  ``_resident_view`` (key -> bytes, file sha256) and ``_load_per_second``.
- ``_unreadable``: the running ``sync``'s, under ``_sync_lock`` (two syncs never interleave).

Lock order: ``_sync_lock`` or ``_write_lock``, then a cache's file lock (``prefix_caches.sharing``), then
``_lock``. ``_lock`` is held for dict operations only: never around disk I/O, hashing or MLX work.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from types import MappingProxyType
from typing import Any

import msgspec

from prefix_caches.costs import Rate
from prefix_caches.durable import atomic_write, commit_pending, file_sha256, fsync_dir, recover, stage_arrays
from prefix_caches.errors import (
    PrefixCacheExists,
    PrefixCacheNotFound,
    PrefixCacheQuotaExceeded,
    PrefixCacheStorageFull,
    PrefixCacheUnusable,
)
from prefix_caches.manifest import FORMAT_VERSION, Manifest
from prefix_caches.names import cache_paths, validate_name
from prefix_caches.quotas import NO_QUOTA, QuotaOf
from prefix_caches.sharing import (
    FileIdentity,
    cache_lock,
    file_identity,
    idle_cache,
    manifest_files,
    read_current,
    read_manifest,
    save_lock,
)

__all__ = ["CacheStatus", "CacheUsage", "PrefixCacheStore", "file_sha256", "tokens_sha256"]

logger = logging.getLogger(__name__)

Key = tuple[str, str]  # (tenant, name)
# A manifest file as last read or written here: its cache and its identity (None: deleted by this process).
Seen = tuple[Key, FileIdentity | None]


def tokens_sha256(tokens: list[int]) -> str:
    return hashlib.sha256(msgspec.json.encode(tokens)).hexdigest()


def _write_bytes(path: Path, data: bytes) -> None:
    path.write_bytes(data)


@dataclass(frozen=True)
class CacheStatus:
    state: str = "ready"  # ready | stale | invalid | building
    reason: str | None = None


@dataclass
class CacheUsage:
    """What one (model, tenant)'s prefix caches hold and how requests used them."""

    count: int = 0
    bytes_on_disk: int = 0
    bytes_in_memory: int = 0
    resident: int = 0
    hits: int = 0
    misses: int = 0  # recomputes included
    loads: int = 0  # KV files read from disk (a hit on a cache that was not resident)
    recomputes: int = 0  # cold caches recomputed because reading them was measured dearer


def _status_on_disk(manifest: Manifest, arrays: Path) -> CacheStatus:
    """A cache's status as its manifest and KV file on disk show it."""
    if manifest.format != FORMAT_VERSION:
        return CacheStatus("stale", f"written in store format {manifest.format}")
    if not arrays.exists():
        return CacheStatus("invalid", "its KV file is missing")
    return CacheStatus()


class PrefixCacheStore:
    def __init__(
        self, root: Path, memory_budget_bytes: int = 2 * 1024**3, quota_of: QuotaOf = lambda _: NO_QUOTA
    ) -> None:
        self.root = root
        self.memory_budget = memory_budget_bytes
        self.quota_of = quota_of
        # Guards the index and counters below (see the module's docstring); held for dict operations only.
        self._lock = threading.Lock()
        # Held around every manifest write and removal (engine thread, flushes, deletes on worker
        # threads), so that a flush of old hit counters cannot land after a save or resurrect a deleted cache.
        self._write_lock = threading.Lock()
        # Held by sync for its whole run (it reads the disk); nothing else takes it.
        self._sync_lock = threading.Lock()

        # Under _lock. Manifests and statuses are replaced, never changed in place.
        self._manifests: dict[Key, Manifest] = {}
        self._status: dict[Key, CacheStatus] = {}
        self._dirty: set[Key] = set()
        self._drop: set[Key] = set()  # resident KV the engine must let go (a newer version, or deleted)
        # (model, tenant) -> hits, misses, loads, recomputes (the other CacheUsage fields stay 0 here).
        self._use: dict[tuple[str, str], CacheUsage] = {}
        # Other processes may share the directory: what each manifest file looked like when last read or
        # written here, and hits counted here since the last flush (added to the disk's count, never written
        # over it).
        self._seen: dict[Path, Seen] = {}
        self._hit_delta: dict[Key, int] = {}

        # Engine thread only: resident KV arrays, least recently used first; files whose checksum was checked.
        self._resident: OrderedDict[Key, tuple[list[Any], int, str]] = OrderedDict()
        self._verified: dict[Key, tuple[tuple[int, int, int], str]] = {}
        # Measured on this machine (engine thread): seconds per byte to read and check a file.
        self.load_rate = Rate()
        self.hash_rate = Rate()
        # What the engine publishes of the above for other threads: immutable, replaced under _lock.
        self._resident_view: Mapping[Key, tuple[int, str]] = MappingProxyType({})  # key -> (bytes, sha256)
        self._load_per_second: float | None = None

        # sync's alone (under _sync_lock): manifest files that could not be read, reported once per version.
        self._unreadable: dict[Path, FileIdentity] = {}
        self._watch_stop = threading.Event()

    # ---- manifests (any thread) ----------------------------------------------------------------

    def scan(self) -> None:
        """Read every manifest on disk (at start-up). Unreadable ones are reported, never used."""
        self.root.mkdir(parents=True, exist_ok=True)
        for folder in sorted(self.root.glob("tenant-*")):
            if folder.is_dir() and not folder.is_symlink():
                for line in recover(folder, lambda name, f=folder.name: idle_cache(self.root, f, name)):
                    logger.warning("prefix cache store %s: %s", folder.name, line)
        found = 0
        for path in sorted(self.root.glob("tenant-*/*.json")):
            if path.name.startswith("."):
                continue
            try:
                manifest = msgspec.json.decode(path.read_bytes(), type=Manifest)
                validate_name(manifest.name)
                arrays, manifest_path = cache_paths(self.root, manifest.tenant, manifest.name)
                if manifest_path != path:
                    raise PrefixCacheUnusable("manifest is not where its tenant and name put it")
            except Exception as exc:
                logger.warning("prefix cache manifest %s is unreadable and ignored: %s", path, exc)
                continue
            key = (manifest.tenant, manifest.name)
            status = _status_on_disk(manifest, arrays)
            with self._lock:
                self._manifests[key] = manifest
                self._status[key] = status
            found += 1
        logger.info("prefix cache store %s: %d caches", self.root, found)

    def sync(self) -> int:
        """Bring the index in line with the directory, which other replicas may write: read manifests that
        are new or changed since last seen, forget deleted ones, and drop resident KV whose file was replaced.

        Returns:
            How many caches were added, changed or removed.
        """
        with self._sync_lock:
            return self._sync()

    def _sync(self) -> int:
        # The disk is read without _lock. A save, flush or delete on another thread meanwhile records in _seen
        # the manifest file it wrote or removed: what this sync read of that file is not adopted (it may be
        # older); the next sync reads the file again if the disk holds another version than that record.
        changed = 0
        on_disk: dict[Path, FileIdentity] = {}
        for path in manifest_files(self.root) if self.root.exists() else []:
            identity = file_identity(path)
            if identity is not None:
                on_disk[path] = identity
        with self._lock:
            seen = dict(self._seen)
        for path, identity in on_disk.items():
            before = seen.get(path)
            if (before is not None and before[1] == identity) or self._unreadable.get(path) == identity:
                continue
            try:
                manifest = read_manifest(self.root, path)
            except FileNotFoundError:
                continue
            except Exception as exc:
                self._unreadable[path] = identity  # reported once per version of the file
                logger.warning("prefix cache manifest %s is unreadable and ignored: %s", path, exc)
                continue
            changed += self._adopt(path, identity, manifest, before)
        for path, before in seen.items():
            if path in on_disk or path.exists():
                continue
            key = before[0]
            with self._lock:
                if self._seen.get(path) != before:
                    continue  # saved or deleted here since the snapshot: that record is newer than this listing
                self._seen.pop(path, None)
                if self._manifests.pop(key, None) is not None:
                    changed += 1
                self._status.pop(key, None)
                self._dirty.discard(key)
                self._hit_delta.pop(key, None)
                self._drop.add(key)
        return changed

    def _adopt(self, path: Path, identity: FileIdentity, manifest: Manifest, before: Seen | None) -> int:
        key = (manifest.tenant, manifest.name)
        arrays, _ = cache_paths(self.root, *key)
        status = _status_on_disk(manifest, arrays)
        with self._lock:
            if self._seen.get(path) != before:
                return 0  # written or deleted by this process since sync's snapshot: newer than this read
            old = self._manifests.get(key)
            self._seen[path] = (key, identity)
            if old is not None and old.file_sha256 == manifest.file_sha256 and old.version == manifest.version:
                # Only the use counters changed (another replica flushed them): keep ours not yet written.
                self._manifests[key] = msgspec.structs.replace(
                    old,
                    hits=manifest.hits + self._hit_delta.get(key, 0),
                    last_used_at=max(old.last_used_at or 0.0, manifest.last_used_at or 0.0) or None,
                )
                return 0
            self._manifests[key] = manifest
            self._status[key] = status
            self._hit_delta.pop(key, None)
            self._dirty.discard(key)
            self._drop.add(key)  # a newer version: the resident copy (if any) is of the old one
        logger.info("prefix cache %s: version %d found on disk", manifest.name, manifest.version)
        return 1

    def watch(self, interval_seconds: float) -> None:
        """Call :meth:`sync` every ``interval_seconds`` on a daemon thread, until :meth:`close`: what another
        replica writes is seen here within that interval (plus one scan of the directory)."""

        def loop() -> None:
            while not self._watch_stop.wait(interval_seconds):
                try:
                    self.sync()
                except Exception:  # a vanished or unreadable directory must not end the watch
                    logger.exception("prefix cache store sync failed")

        threading.Thread(target=loop, name="prefix-cache-sync", daemon=True).start()

    def close(self) -> None:
        self._watch_stop.set()

    def get(self, tenant: str, name: str) -> Manifest:
        validate_name(name)
        with self._lock:
            manifest = self._manifests.get((tenant, name))
        if manifest is None:
            raise PrefixCacheNotFound(name)
        return manifest

    def status(self, tenant: str, name: str) -> CacheStatus:
        with self._lock:
            return self._status.get((tenant, name), CacheStatus("invalid", "unknown"))

    def set_status(self, tenant: str, name: str, state: str, reason: str | None = None) -> None:
        with self._lock:
            if (tenant, name) in self._manifests:
                self._status[(tenant, name)] = CacheStatus(state, reason)

    def list(self, tenant: str) -> list[Manifest]:
        with self._lock:
            return sorted((m for (t, _), m in self._manifests.items() if t == tenant), key=lambda m: m.name)

    def all(self) -> list[Manifest]:
        with self._lock:
            return list(self._manifests.values())

    def check_new(self, tenant: str, name: str, replace: bool) -> None:
        """Refuse a create early (before its prefill) when the name is taken or the tenant's quota is already
        spent; the size it will take is only known when it is saved, where :meth:`save` checks again.

        Reads the disk (another replica may have created the name since the last sync): not on the event loop.
        """
        _, manifest_path = cache_paths(self.root, tenant, name)
        taken = not replace and manifest_path.exists()
        with self._lock:
            if ((tenant, name) in self._manifests or taken) and not replace:
                raise PrefixCacheExists(name)
            self._check_quota(tenant, name, 0)

    def _check_quota(self, tenant: str, name: str, new_bytes: int) -> None:
        """Whether ``tenant`` may hold ``name`` at ``new_bytes`` on disk (a replaced version's bytes count as
        freed). Called with the lock held.

        Raises:
            PrefixCacheQuotaExceeded: the count or the bytes on disk would pass the tenant's quota.
        """
        quota = self.quota_of(tenant)
        if quota.max_caches is None and quota.max_disk_bytes is None:
            return
        mine = [m for (t, n), m in self._manifests.items() if t == tenant and n != name]
        if quota.max_caches is not None and len(mine) + 1 > quota.max_caches:
            raise PrefixCacheQuotaExceeded(
                "prefix_cache_count_quota",
                f"Tenant '{tenant}' may keep {quota.max_caches} prefix caches and has {len(mine)}; delete one "
                "or replace an existing cache",
            )
        used = sum(m.size_bytes for m in mine)
        # The early check (new_bytes 0) refuses only when nothing at all is left.
        limit = quota.max_disk_bytes
        if limit is not None and (used + new_bytes > limit if new_bytes else used >= limit):
            raise PrefixCacheQuotaExceeded(
                "prefix_cache_disk_quota",
                f"Tenant '{tenant}' may keep {limit} bytes of prefix caches on disk and uses "
                f"{used}" + (f"; this cache takes {new_bytes}" if new_bytes else "") + "; delete a cache first",
            )

    def delete(self, tenant: str, name: str) -> Manifest:
        """Remove a cache. Requests already using it keep their own copy and finish normally."""
        arrays, manifest_path = cache_paths(self.root, tenant, name)
        with self._lock:
            known = (tenant, name) in self._manifests
        if not known and not manifest_path.exists():
            raise PrefixCacheNotFound(name)  # before the lock: a name never built leaves nothing on disk
        with self._write_lock, cache_lock(self.root, tenant, name):
            # Another replica may have created it since this one last synced: the disk decides.
            on_disk = read_current(self.root, tenant, name)
            with self._lock:
                manifest = self._manifests.pop((tenant, name), None) or on_disk
                self._status.pop((tenant, name), None)
                self._dirty.discard((tenant, name))
                self._hit_delta.pop((tenant, name), None)
                # Not forgotten but marked deleted: a sync that read this manifest before now must not adopt it.
                self._seen[manifest_path] = ((tenant, name), None)
                self._drop.add((tenant, name))
            if manifest is None or (on_disk is None and not manifest_path.exists()):
                raise PrefixCacheNotFound(name)
            # The manifest goes first: a crash in between leaves a KV file without one, which start-up removes.
            for path in (manifest_path, arrays):
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
            fsync_dir(manifest_path.parent)
        return manifest

    def record_hit(self, tenant: str, name: str) -> None:
        with self._lock:
            manifest = self._manifests.get((tenant, name))
            if manifest is not None:
                self._manifests[(tenant, name)] = msgspec.structs.replace(
                    manifest, hits=manifest.hits + 1, last_used_at=time.time()
                )
                self._dirty.add((tenant, name))
                self._hit_delta[(tenant, name)] = self._hit_delta.get((tenant, name), 0) + 1
            self._usage(manifest.model if manifest else "", tenant).hits += 1

    def record_miss(self, model: str, tenant: str) -> None:
        """A request named a cache of ``tenant`` for ``model`` and computed its prompt without it."""
        with self._lock:
            self._usage(model, tenant).misses += 1

    def record_recompute(self, model: str, tenant: str) -> None:
        """A cold cache was recomputed rather than read (counted as a miss too: the request computed it)."""
        with self._lock:
            use = self._usage(model, tenant)
            use.misses += 1
            use.recomputes += 1

    def _usage(self, model: str, tenant: str) -> CacheUsage:
        """The counters of (model, tenant); called with the lock held."""
        return self._use.setdefault((model, tenant), CacheUsage())

    def flush(self) -> None:
        """Write the manifests whose use counters changed (called periodically and at shutdown)."""
        with self._write_lock:
            with self._lock:
                dirty = [
                    (k, self._manifests[k].file_sha256, self._hit_delta.pop(k, 0))
                    for k in self._dirty
                    if k in self._manifests
                ]
                self._dirty.clear()
            for (tenant, name), sha, delta in dirty:
                with cache_lock(self.root, tenant, name):
                    # Other replicas count hits of the same file: add ours to what the disk holds. A version
                    # replaced or deleted meanwhile keeps the disk's counts (ours were of the old one).
                    on_disk = read_current(self.root, tenant, name)
                    if on_disk is None or on_disk.file_sha256 != sha:
                        continue
                    with self._lock:
                        mine = self._manifests.get((tenant, name))
                        on_disk.hits += delta
                        if mine is not None:
                            on_disk.last_used_at = max(on_disk.last_used_at or 0.0, mine.last_used_at or 0.0) or None
                    try:
                        self._write_manifest(tenant, name, on_disk)
                    except (OSError, PrefixCacheStorageFull) as exc:
                        # Counters only: keep them for the next flush rather than fail the engine's idle turn.
                        logger.warning("prefix cache %s: use counters not written: %s", name, exc)
                        with self._lock:
                            self._dirty.add((tenant, name))
                            self._hit_delta[(tenant, name)] = self._hit_delta.get((tenant, name), 0) + delta
                        continue
                    with self._lock:
                        current = self._manifests.get((tenant, name))
                        if current is not None and current.file_sha256 == sha:
                            self._manifests[(tenant, name)] = msgspec.structs.replace(
                                current, hits=on_disk.hits + self._hit_delta.get((tenant, name), 0)
                            )

    def _write_manifest(self, tenant: str, name: str, manifest: Manifest) -> None:
        _, manifest_path = cache_paths(self.root, tenant, name)
        data = msgspec.json.format(msgspec.json.encode(manifest), indent=2)
        atomic_write(manifest_path, lambda p: _write_bytes(p, data))
        identity = file_identity(manifest_path)
        if identity is not None:  # our own write: nothing for sync to re-read
            with self._lock:
                self._seen[manifest_path] = ((tenant, name), identity)

    def usage(self) -> dict[tuple[str, str], CacheUsage]:
        """Per (model, tenant): caches, bytes on disk and resident, hits, misses, loads, recomputes."""
        with self._lock:
            manifests = dict(self._manifests)
            resident = self._resident_view  # immutable: iterated after the lock
            out = {key: CacheUsage(**{f.name: getattr(u, f.name) for f in fields(u)}) for key, u in self._use.items()}
        for m in manifests.values():
            use = out.setdefault((m.model, m.tenant), CacheUsage())
            use.count += 1
            use.bytes_on_disk += m.size_bytes
        for key, (size, _) in resident.items():
            manifest = manifests.get(key)
            use = out.setdefault((manifest.model if manifest else "", key[0]), CacheUsage())
            use.resident += 1
            use.bytes_in_memory += size
        return out

    def stats(self) -> dict[str, int]:
        """The totals of :meth:`usage` over every model and tenant, and the measured load rate."""
        totals = CacheUsage()
        for use in self.usage().values():
            for f in fields(use):
                setattr(totals, f.name, getattr(totals, f.name) + getattr(use, f.name))
        with self._lock:
            load_per_second = self._load_per_second
        return {
            **{f.name: getattr(totals, f.name) for f in fields(totals)},
            "load_bytes_per_second": round(load_per_second or 0),
        }

    # ---- KV arrays (engine thread only) --------------------------------------------------------

    def save(self, manifest: Manifest, cache: list[Any], replace: bool = True) -> Manifest:
        """Write ``cache`` (already cut to the prefix) and its manifest; keep the arrays resident.

        Until the manifest is written, the old version (or none) stays the cache on disk and in memory.

        Raises:
            PrefixCacheQuotaExceeded: the tenant's quota refuses it; what was stored stays as it was.
            PrefixCacheStorageFull: the disk ran out of space; no file of the new version is left.
            PrefixCacheExists: not ``replace``, and another process committed the name first.
        """
        from prefix_caches import kv

        tenant, name = manifest.tenant, manifest.name
        arrays_path, _ = cache_paths(self.root, tenant, name)
        metadata = {"mlx_gateway_tokens_sha256": manifest.tokens_sha256, "mlx_gateway_name": name}
        # Held for the whole save: a replica starting meanwhile must not sweep this save's files away.
        with save_lock(self.root, tenant, name):
            self._save_staged(manifest, arrays_path, lambda p: kv.save_kv(p, cache, metadata), replace)
        self._keep((tenant, name), cache, manifest.file_sha256)
        return manifest

    def _save_staged(self, manifest: Manifest, arrays_path: Path, write: Callable[[Path], None], replace: bool) -> None:
        tenant, name = manifest.tenant, manifest.name
        pending, manifest.file_sha256, manifest.size_bytes = stage_arrays(arrays_path, write)
        committed = False
        try:
            # Saves run on the engine thread one at a time, so no other create can come between this check
            # and the commit below; deletes (any thread) only free room.
            with self._lock:
                self._check_quota(tenant, name, manifest.size_bytes)
            # The commit under the cache's lock: a concurrent replace (another replica) commits wholly before
            # or after this one, and readers holding the lock never find this manifest beside another
            # version's file.
            with self._write_lock, cache_lock(self.root, tenant, name):
                previous = read_current(self.root, tenant, name)
                if previous is not None and not replace:
                    raise PrefixCacheExists(name)
                manifest.version = (previous.version if previous is not None else 0) + 1
                self._write_manifest(tenant, name, manifest)
                with self._lock:
                    self._hit_delta.pop((tenant, name), None)
                    self._manifests[(tenant, name)] = manifest
                    self._status[(tenant, name)] = CacheStatus()
                    self._drop.discard((tenant, name))
                committed = True
                commit_pending(pending, arrays_path)
        except BaseException:
            if not committed:
                with contextlib.suppress(FileNotFoundError):
                    pending.unlink()
            raise

    def arrays(self, manifest: Manifest) -> tuple[list[Any], bool]:
        """The stored KV of ``manifest`` and whether it was already in memory.

        Raises:
            PrefixCacheUnusable: the file is missing, corrupt, or not the one the manifest describes.
        """

        self._apply_drops()
        key = (manifest.tenant, manifest.name)
        entry = self._resident.get(key)
        if entry is not None and entry[2] == manifest.file_sha256:
            self._resident.move_to_end(key)
            return entry[0], True
        with cache_lock(self.root, *key, shared=True):
            # Under the lock no replica commits a version in between the checks and the read below.
            on_disk = read_current(self.root, *key)
            if on_disk is not None and on_disk.file_sha256 != manifest.file_sha256:
                raise PrefixCacheUnusable(f"replaced on disk by version {on_disk.version} (seen here within a second)")
            return self._read_arrays(key, manifest)

    def _read_arrays(self, key: Key, manifest: Manifest) -> tuple[list[Any], bool]:
        from prefix_caches import kv

        arrays_path, _ = cache_paths(self.root, *key)
        if not arrays_path.exists():
            raise PrefixCacheUnusable("its KV file is missing")
        stat = arrays_path.stat()
        identity = (stat.st_size, stat.st_mtime_ns, stat.st_ino)
        if self._verified.get(key) != (identity, manifest.file_sha256):
            # Checked once per file version: a re-read of an unchanged file skips the hash.
            started = time.perf_counter()
            if file_sha256(arrays_path) != manifest.file_sha256:
                raise PrefixCacheUnusable("its KV file does not match the manifest's checksum (corrupt or replaced)")
            self.hash_rate.add(stat.st_size, time.perf_counter() - started)
            self._verified[key] = (identity, manifest.file_sha256)
        started = time.perf_counter()
        cache, metadata = kv.load_kv(arrays_path)
        self.load_rate.add(stat.st_size, time.perf_counter() - started)
        load_per_second = self.load_rate.per_second()
        with self._lock:
            self._load_per_second = load_per_second
            self._usage(manifest.model, manifest.tenant).loads += 1
        if metadata.get("mlx_gateway_tokens_sha256") != manifest.tokens_sha256:
            raise PrefixCacheUnusable("its KV file was built from other tokens")
        if {c.offset for c in cache} != {manifest.num_tokens}:
            raise PrefixCacheUnusable("its KV file holds another number of tokens")
        self._keep(key, cache, manifest.file_sha256)
        return cache, False

    def resident_files(self) -> list[tuple[str, str, str]]:
        """(tenant, name, file sha256) of each cache whose KV is in memory (any thread: the published view)."""
        with self._lock:
            view, dropped = self._resident_view, set(self._drop)
        return [(t, n, sha) for (t, n), (_, sha) in view.items() if (t, n) not in dropped]

    def statuses(self) -> list[tuple[str, str, CacheStatus]]:
        """Every cache not ``ready`` and why (any thread)."""
        with self._lock:
            return [(t, n, st) for (t, n), st in self._status.items() if st.state != "ready"]

    def is_resident(self, manifest: Manifest) -> bool:
        """Whether ``manifest``'s version is in memory (any thread: reads what the engine published)."""
        key = (manifest.tenant, manifest.name)
        with self._lock:
            entry = self._resident_view.get(key)
            dropped = key in self._drop
        return entry is not None and not dropped and entry[1] == manifest.file_sha256

    def estimated_load_seconds(self, manifest: Manifest) -> float | None:
        """What reading ``manifest``'s file would cost now, from the loads measured so far (None: unknown)."""
        load = self.load_rate.estimate(manifest.size_bytes)
        key = (manifest.tenant, manifest.name)
        verified = self._verified.get(key)
        if load is None or (verified is not None and verified[1] == manifest.file_sha256):
            return load
        check = self.hash_rate.estimate(manifest.size_bytes)
        return None if check is None else load + check

    def keep_recomputed(self, manifest: Manifest, cache: list[Any]) -> None:
        """Keep KV that a request recomputed from the manifest's tokens resident, as if loaded."""
        with self._lock:
            current = self._manifests.get((manifest.tenant, manifest.name))
        if current is not None and current.file_sha256 == manifest.file_sha256:
            self._keep((manifest.tenant, manifest.name), cache, manifest.file_sha256)

    def resident_sha256(self, tenant: str, name: str) -> str | None:
        """A digest of the cache's resident KV (engine thread: it reads the arrays); None if not resident."""
        from prefix_caches import kv

        self._apply_drops()
        entry = self._resident.get((tenant, name))
        return kv.arrays_sha256(entry[0]) if entry else None

    def evict(self, tenant: str, name: str) -> None:
        """Let go of a cache's resident KV: its next use reads its file again (a cold hit). Engine thread.

        The counterpart of :meth:`arrays` keeping a cache resident: what the LRU budget does to the least
        recently used cache, for one named cache (tests make a cache cold with it, through the engine's
        ``call``). Nothing on disk changes; a cache not resident is left as it is.
        """
        if self._resident.pop((tenant, name), None) is not None:
            self._publish_resident()

    def _keep(self, key: Key, cache: list[Any], sha: str) -> None:
        from prefix_caches import kv

        size = kv.cache_nbytes(cache)
        limit = self.quota_of(key[0]).max_memory_bytes
        if limit is not None and size > limit:
            self._resident.pop(key, None)  # alone over its tenant's quota: read from disk each time
            self._publish_resident()
            logger.info("prefix cache %s not kept in memory: %d bytes, tenant quota %d", key[1], size, limit)
            return
        self._resident[key] = (cache, size, sha)
        self._resident.move_to_end(key)
        if limit is not None:
            # The tenant's own least recently used caches make room, never another tenant's.
            while (mine := [k for k in self._resident if k[0] == key[0]]) and sum(
                self._resident[k][1] for k in mine
            ) > limit:
                self._resident.pop(mine[0])
                logger.info("prefix cache %s evicted from memory (tenant quota %d bytes)", mine[0][1], limit)
        while self._resident and sum(r[1] for r in self._resident.values()) > self.memory_budget:
            old, _ = self._resident.popitem(last=False)
            logger.info("prefix cache %s evicted from memory (budget %d bytes)", old[1], self.memory_budget)
        self._publish_resident()

    def _apply_drops(self) -> None:
        with self._lock:
            drops, self._drop = self._drop, set()
        if [key for key in drops if self._resident.pop(key, None) is not None]:
            self._publish_resident()

    def _publish_resident(self) -> None:
        """Replace the view of ``_resident`` other threads read (after every change to it, engine thread)."""
        view = MappingProxyType({key: (size, sha) for key, (_, size, sha) in self._resident.items()})
        with self._lock:
            self._resident_view = view
