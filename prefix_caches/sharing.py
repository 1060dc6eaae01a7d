"""What lets several gateway processes share one store directory: per-cache file locks and manifests read
back from disk.

Replicas agree through the directory only (no protocol of our own): a writer takes the cache's lock for
the two renames that commit a version (KV file, then manifest), so a reader holding the lock never sees a
manifest beside another version's file, and two replicas replacing one cache leave one whole version.
``flock`` works across processes on one machine and, on Linux, over NFSv4 (as POSIX record locks).

No in-process state: each lock is taken on a file descriptor opened for that call, and ``flock`` locks
belong to the open file, so two threads of one process exclude each other exactly as two processes do.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

import msgspec

from prefix_caches.errors import PrefixCacheUnusable
from prefix_caches.manifest import Manifest
from prefix_caches.names import cache_paths, validate_name

__all__ = [
    "FileIdentity",
    "cache_lock",
    "file_identity",
    "idle_cache",
    "manifest_files",
    "read_manifest",
    "save_lock",
]

# (size, mtime in ns, inode): changes whenever a manifest is replaced by a rename or rewritten.
FileIdentity = tuple[int, int, int]


def file_identity(path: Path) -> FileIdentity | None:
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    return stat.st_size, stat.st_mtime_ns, stat.st_ino


@contextlib.contextmanager
def _held(root: Path, kind: str, tenant: str, name: str, shared: bool) -> Iterator[None]:
    _, manifest_path = cache_paths(root, tenant, name)
    manifest_path.parent.mkdir(parents=True, exist_ok=True)
    fd = _lock_fd(root, kind, manifest_path.parent.name, name)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def cache_lock(root: Path, tenant: str, name: str, shared: bool = False) -> contextlib.AbstractContextManager[None]:
    """Hold the cache's lock file (``.locks/<tenant folder>.<name>`` under the root) for the block.

    Lock files live apart from the caches (nothing that lists or sweeps a tenant's folder meets them) and
    are never deleted: removing one while another process waits on it would let two holders in.
    """
    return _held(root, "", tenant, name, shared)


def save_lock(root: Path, tenant: str, name: str) -> contextlib.AbstractContextManager[None]:
    """Held by a process for the whole of a save of the cache (its temporary and pending files included), so
    that another replica's start-up recovery leaves that save's files alone (:func:`idle_cache`). Readers
    never take it: a long write does not hold them up."""
    return _held(root, "save", tenant, name, shared=False)


def _lock_fd(root: Path, kind: str, folder: str, name: str) -> int:
    locks = root / ".locks" / kind if kind else root / ".locks"
    locks.mkdir(parents=True, exist_ok=True)
    return os.open(locks / f"{folder}.{name}", os.O_RDWR | os.O_CREAT, 0o644)


@contextlib.contextmanager
def idle_cache(root: Path, folder: str, name: str) -> Iterator[bool]:
    """Whether no process is saving or committing the cache ``name`` of tenant folder ``folder`` (both its
    locks taken without waiting); while True, nobody else can start to."""
    fds = [_lock_fd(root, "save", folder, name), _lock_fd(root, "", folder, name)]
    try:
        for fd in fds:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield False
                return
        yield True
    finally:
        for fd in fds:
            os.close(fd)


def manifest_files(root: Path) -> list[Path]:
    return [p for p in sorted(root.glob("tenant-*/*.json")) if not p.name.startswith(".")]


def read_manifest(root: Path, path: Path) -> Manifest:
    """Decode the manifest at ``path`` and check it lies where its tenant and name put it.

    Raises:
        FileNotFoundError: it was deleted meanwhile.
        PrefixCacheUnusable, msgspec.DecodeError, InvalidCacheName: it cannot be used.
    """
    manifest = msgspec.json.decode(path.read_bytes(), type=Manifest)
    validate_name(manifest.name)
    _, expected = cache_paths(root, manifest.tenant, manifest.name)
    if expected != path:
        raise PrefixCacheUnusable("manifest is not where its tenant and name put it")
    return manifest


def read_current(root: Path, tenant: str, name: str) -> Manifest | None:
    """The cache's manifest on disk now (None: there is none, or it cannot be read)."""
    _, path = cache_paths(root, tenant, name)
    try:
        return read_manifest(root, path)
    except Exception:  # absent or unreadable: either way not a version to build on
        return None
