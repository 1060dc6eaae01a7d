"""The manifest a new prefix cache gets, and the KV a finished request leaves for one."""

from __future__ import annotations

import importlib.metadata
import time
from typing import Any

from adapters.mlx_lm.models import LoadedModel
from prefix_caches import kv
from prefix_caches.errors import PrefixCacheUnusable
from prefix_caches.manifest import Manifest
from prefix_caches.store import tokens_sha256

__all__ = ["exact_prefix", "library_version", "new_manifest"]


def library_version(dist: str) -> str:
    return importlib.metadata.version(dist)


def exact_prefix(cache: list[Any], n: int) -> list[Any] | None:
    """A finished request's KV of its first ``n`` tokens, as a cache of its own; None if it holds fewer
    tokens or layers a prefix cache cannot hold."""
    try:
        return kv.exact(kv.view(cache, n)) if min(c.offset for c in cache) >= n else None
    except PrefixCacheUnusable:
        return None


def new_manifest(
    loaded: LoadedModel,
    tenant: str,
    name: str,
    source: str,
    tokens: list[int],
    prompt: str | None,
    messages: list[dict[str, Any]] | None,
    kv_bits: int | None,
    kv_group_size: int,
) -> Manifest:
    """The manifest of a cache about to be built for ``loaded``."""

    return Manifest(
        name=name,
        tenant=tenant,
        model=loaded.spec.name,
        model_fingerprint=loaded.fingerprint,
        adapter_fingerprint=loaded.adapter_digest,
        tokenizer_fingerprint=loaded.tokenizer_fingerprint,
        chat_template_fingerprint=loaded.chat_template_fingerprint,
        mlx_version=library_version("mlx"),
        mlx_lm_version=library_version("mlx-lm"),
        source=source,  # type: ignore[arg-type]
        prompt=prompt,
        messages=messages,
        tokens=list(tokens),
        tokens_sha256=tokens_sha256(list(tokens)),
        kv_bits=kv_bits,
        kv_group_size=kv_group_size,
        dtype=loaded.dtype,
        created_at=time.time(),
    )
