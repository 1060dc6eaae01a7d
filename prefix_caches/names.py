"""Cache and tenant names, and the paths they map to: nothing a client sends can leave the store.

Pure functions, no state: any thread may call them.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from prefix_caches.errors import InvalidCacheName

__all__ = ["NAME_PATTERN", "cache_paths", "tenant_dir", "validate_name"]

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
_NAME = re.compile(NAME_PATTERN)


def validate_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name) or name.endswith((".tmp", ".json")):
        raise InvalidCacheName(
            f"Invalid prefix cache name {name!r}: use 1-128 letters, digits, '.', '_' or '-', starting with a "
            "letter or digit"
        )
    return name


def tenant_dir(root: Path, tenant: str) -> Path:
    """Tenants are arbitrary strings from the config; their directory names are digests of them."""
    return root / f"tenant-{hashlib.sha256(tenant.encode()).hexdigest()[:24]}"


def cache_paths(root: Path, tenant: str, name: str) -> tuple[Path, Path]:
    """The (arrays, manifest) paths of a cache, checked to resolve inside the store."""
    validate_name(name)
    folder = tenant_dir(root, tenant)
    arrays, manifest = folder / f"{name}.safetensors", folder / f"{name}.json"
    resolved_root = root.resolve()
    for path in (arrays, manifest):
        if resolved_root not in path.resolve().parents:  # e.g. a symlinked tenant folder
            raise InvalidCacheName(f"Prefix cache path for {name!r} escapes the store")
    return arrays, manifest
