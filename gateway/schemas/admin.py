"""Admin API shapes for named prefix caches. Unknown fields are refused (a typo must not pass)."""

from __future__ import annotations

from typing import Any, Literal

import msgspec

from gateway.schemas.openai import ChatMessage

__all__ = ["CreatePrefixCache", "DeletedPrefixCache", "PrefixCacheList", "PrefixCacheOut"]


class CreatePrefixCache(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    name: str
    model: str
    # One of: a prompt (text or token ids, the prefix of completions) or messages (a conversation prefix
    # for chat, rendered with the model's template without a generation prompt).
    prompt: str | list[int] | None = None
    messages: list[ChatMessage] | None = None
    kv_bits: Literal[4, 8] | None = None
    kv_group_size: Literal[32, 64, 128] = 64
    replace: bool = False
    # Only with the admin key: build the cache for this tenant.
    tenant: str | None = None


class PrefixCacheOut(msgspec.Struct, kw_only=True):
    id: str
    object: str = "prefix_cache"
    model: str
    status: str
    status_reason: str | None
    source: str
    num_tokens: int
    tokens_sha256: str
    kv_bits: int | None
    kv_group_size: int
    dtype: str
    size_bytes: int
    created_at: float
    last_used_at: float | None
    hits: int
    build_seconds: float
    model_fingerprint: str
    mlx_version: str
    mlx_lm_version: str
    integrity: dict[str, Any] | None = None


class PrefixCacheList(msgspec.Struct, kw_only=True):
    object: str = "list"
    data: list[PrefixCacheOut]


class DeletedPrefixCache(msgspec.Struct, kw_only=True):
    id: str
    object: str = "prefix_cache.deleted"
    deleted: bool = True
