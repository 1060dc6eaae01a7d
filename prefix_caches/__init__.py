"""Named, persistent prefix caches: the KV state of a prompt prefix, built once, kept on disk and in
memory under a byte budget, and handed to each request as its own copy.

Which thread owns what (the engine thread holds the KV; other threads read snapshots or state under the
store's lock) is set out in ``prefix_caches.store``'s docstring.
"""

from prefix_caches.errors import (
    InvalidCacheName,
    InvalidKVSettings,
    PrefixCacheError,
    PrefixCacheExists,
    PrefixCacheNotFound,
    PrefixCacheQuotaExceeded,
    PrefixCacheStorageFull,
    PrefixCacheUnusable,
)
from prefix_caches.manifest import Manifest
from prefix_caches.names import validate_name
from prefix_caches.quotas import NO_QUOTA, StorageQuota
from prefix_caches.store import PrefixCacheStore

__all__ = [
    "InvalidCacheName",
    "InvalidKVSettings",
    "Manifest",
    "PrefixCacheError",
    "PrefixCacheExists",
    "PrefixCacheNotFound",
    "PrefixCacheQuotaExceeded",
    "PrefixCacheStorageFull",
    "PrefixCacheStore",
    "PrefixCacheUnusable",
    "NO_QUOTA",
    "StorageQuota",
    "validate_name",
]
