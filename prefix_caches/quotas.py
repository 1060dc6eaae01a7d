"""A tenant's storage quotas as the store applies them: caches, bytes on disk, bytes resident.

``StorageQuota`` is frozen. A ``QuotaOf`` is called from any thread, by the engine's LRU and under the
store's ``_lock``: it must answer from memory, without blocking or calling back into the store.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["NO_QUOTA", "QuotaOf", "StorageQuota"]


@dataclass(frozen=True)
class StorageQuota:
    """None is unlimited."""

    max_caches: int | None = None
    max_disk_bytes: int | None = None
    max_memory_bytes: int | None = None


NO_QUOTA = StorageQuota()

# tenant -> its quota (the gateway's config decides; the store only applies it).
QuotaOf = Callable[[str], StorageQuota]
