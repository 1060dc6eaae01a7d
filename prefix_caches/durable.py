"""How a cache's two files reach the disk so that a crash at any instant leaves the old or the new
version, never a mix, and how the store cleans up after one at start-up.

A cache is a KV file (``name.safetensors``) and a manifest (``name.json``) that names the KV file's
sha256. Two renames cannot be one atomic step, so a save is staged:

1. the KV file is written to a temporary file, fsynced, hashed and renamed to
   ``.name.pending-<sha256>.safetensors`` (complete, but not yet the cache's);
2. the manifest naming that sha256 replaces the old one atomically: this is the commit;
3. the pending file is renamed over ``name.safetensors``.

After a crash, :func:`recover` finishes step 3 for a pending file whose sha256 the manifest names (it
was committed) and deletes any other pending file (it was not), every temporary file, and every KV file
without a manifest (a delete removes the manifest first). Nothing is hashed at start-up: the pending
file's name carries its digest.

No state of its own: its functions do disk I/O, called with at most the store's ``_write_lock`` held
(never its ``_lock``); the per-cache file locks of ``prefix_caches.sharing`` order them
against other threads and processes.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import re
import threading
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path

import msgspec

from prefix_caches.errors import PrefixCacheStorageFull

__all__ = ["atomic_write", "commit_pending", "file_sha256", "fsync_dir", "recover", "stage_arrays"]

logger = logging.getLogger(__name__)

_TEMP = re.compile(r"^\.(?P<name>.+)\.\d+\.\d+\.tmp(\.safetensors)?$")
_PENDING = re.compile(r"^\.(?P<name>.+)\.pending-(?P<sha>[0-9a-f]{64})\.safetensors$")
_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT}


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _no_room_left(folder: Path) -> bool:
    """Whether the file system holding ``folder`` is out of space (checked while the failed write's
    temporary file still holds what it got: a write that ran out of room leaves none)."""
    st = os.statvfs(folder)
    return st.f_bavail * st.f_frsize < max(st.f_frsize, 4096) * 2


def _write_temp(folder: Path, stem: str, write: Callable[[Path], None], suffix: str) -> Path:
    """``write`` into a new temporary file in ``folder``, fsynced. A write that fails for want of space
    (an ``OSError`` ENOSPC/EDQUOT, or mlx's ``RuntimeError`` "Unable to write" on a full disk) raises
    :class:`PrefixCacheStorageFull`; whatever failed, the temporary file is gone."""
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{stem}.{os.getpid()}.{threading.get_ident()}.tmp{suffix}"
    try:
        write(tmp)
        with tmp.open("rb+") as fh:
            os.fsync(fh.fileno())
    except Exception as exc:
        full = (isinstance(exc, OSError) and exc.errno in _FULL_ERRNOS) or _no_room_left(folder)
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        if full:
            raise PrefixCacheStorageFull(f"the prefix-cache disk is full ({type(exc).__name__}: {exc})") from exc
        raise
    return tmp


def atomic_write(path: Path, write: Callable[[Path], None], suffix: str = "") -> None:
    """Write ``path`` through a temporary file in its folder: fsync, ``os.replace``, fsync the folder."""
    tmp = _write_temp(path.parent, path.stem, write, suffix)
    try:
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def stage_arrays(arrays_path: Path, write: Callable[[Path], None]) -> tuple[Path, str, int]:
    """Steps 1 of a save: the new KV file, complete and fsynced, under its pending name.

    Returns:
        The pending file, its sha256 and its size in bytes.
    """
    tmp = _write_temp(arrays_path.parent, arrays_path.stem, write, ".safetensors")
    try:
        sha = file_sha256(tmp)
        size = tmp.stat().st_size
        pending = arrays_path.parent / f".{arrays_path.stem}.pending-{sha}.safetensors"
        os.replace(tmp, pending)
        fsync_dir(arrays_path.parent)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    return pending, sha, size


def commit_pending(pending: Path, arrays_path: Path) -> None:
    """Step 3 of a save, once the manifest naming the pending file is on disk."""
    os.replace(pending, arrays_path)
    fsync_dir(arrays_path.parent)


def _manifest_sha(path: Path) -> str | None:
    try:
        return msgspec.json.decode(path.read_bytes()).get("file_sha256")
    except (OSError, msgspec.DecodeError, AttributeError):
        return None


def recover(folder: Path, idle: Callable[[str], AbstractContextManager[bool]] | None = None) -> list[str]:
    """Finish or undo whatever a crash interrupted in one tenant's folder. Returns what it did, one line each,
    for the log.

    ``idle(name)`` says whether no process is saving the cache ``name`` now (and keeps it so while held):
    replicas share the folder, and one that starts while another saves must leave that save's files alone.
    Without it, the caller promises that no save runs.
    """
    done: list[str] = []

    def touch(name: str) -> AbstractContextManager[bool]:
        return idle(name) if idle is not None else contextlib.nullcontext(True)

    for path in sorted(folder.iterdir()):
        if not path.is_file() or path.is_symlink():
            continue
        pending = _PENDING.match(path.name)
        temp = _TEMP.match(path.name)
        if not pending and not temp:
            continue
        name = (pending or temp)["name"]  # type: ignore[index]
        with touch(name) as free:
            if not free or not path.exists():
                continue
            if pending:
                manifest = folder / f"{name}.json"
                if _manifest_sha(manifest) == pending["sha"]:
                    os.replace(path, folder / f"{name}.safetensors")
                    done.append(f"{path.name}: committed before the crash, moved into place")
                else:
                    path.unlink()
                    done.append(f"{path.name}: not committed before the crash, removed")
            else:
                path.unlink()
                done.append(f"{path.name}: temporary file removed")
    for path in sorted(folder.glob("*.safetensors")):
        if path.name.startswith("."):
            continue
        with touch(path.stem) as free:
            if free and path.exists() and not (folder / f"{path.stem}.json").exists():
                path.unlink()
                done.append(f"{path.name}: KV file without a manifest (an interrupted delete) removed")
    if done:
        fsync_dir(folder)
    return done
