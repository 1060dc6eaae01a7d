"""Model directories that appear whole or not at all (built presets, converted GGUF files)."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["building"]


@contextmanager
def building(final: Path) -> Iterator[Path]:
    """Yield a temporary directory beside ``final`` to fill; on success its files are fsynced and it
    becomes ``final`` in one rename (a concurrent build that finished first wins), on failure it is removed."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        yield tmp
        for file in tmp.iterdir():
            with file.open("rb") as fh:
                os.fsync(fh.fileno())
        try:
            os.replace(tmp, final)
        except OSError:  # another process finished the same build first
            if not (final / "config.json").exists():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
        dir_fd = os.open(final.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
