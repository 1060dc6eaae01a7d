"""A tenant's storage quotas as the store applies them: caches, bytes on disk, bytes resident."""

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
