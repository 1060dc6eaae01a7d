"""The store's errors; the gateway maps them to OpenAI-shaped responses."""

from __future__ import annotations

__all__ = [
    "InvalidKVSettings",
    "InvalidCacheName",
    "PrefixCacheError",
    "PrefixCacheExists",
    "PrefixCacheNotFound",
    "PrefixCacheQuotaExceeded",
    "PrefixCacheStorageFull",
    "PrefixCacheUnusable",
]


class PrefixCacheError(Exception):
    pass


class InvalidCacheName(PrefixCacheError):
    pass


class PrefixCacheNotFound(PrefixCacheError):
    def __init__(self, name: str) -> None:
        super().__init__(f"The prefix cache '{name}' does not exist")
        self.name = name


class PrefixCacheExists(PrefixCacheError):
    def __init__(self, name: str) -> None:
        super().__init__(f"The prefix cache '{name}' already exists (send \"replace\": true to rebuild it)")
        self.name = name


class InvalidKVSettings(PrefixCacheError):
    """The requested KV quantisation does not fit the model."""


class PrefixCacheUnusable(PrefixCacheError):
    """A stored file is corrupt or was written for another model or library version."""


class PrefixCacheQuotaExceeded(PrefixCacheError):
    """A tenant's storage quota refuses a cache; ``quota`` names it (``prefix_cache_count_quota``, ...)."""

    def __init__(self, quota: str, message: str) -> None:
        super().__init__(message)
        self.quota = quota


class PrefixCacheStorageFull(PrefixCacheError):
    """The disk under the store ran out of space during a save; nothing of the new version was kept."""
