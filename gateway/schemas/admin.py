"""Admin API shapes for named prefix caches. Unknown fields are refused (a typo must not pass)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec

from gateway.config import TenantLimits
from gateway.limits import MAX_MESSAGES
from gateway.schemas.openai import CacheName, ChatMessage, TokenId

__all__ = [
    "CreatePrefixCache",
    "DeletedPrefixCache",
    "PrefixCacheList",
    "PrefixCacheOut",
    "PrefixCacheProgress",
    "TenantList",
    "TenantOut",
    "TenantUse",
    "WarmedPrefixCache",
]


class CreatePrefixCache(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Exactly one of ``prompt`` (text or token ids: the prefix of completions) and ``messages`` (a
    conversation prefix for chat, rendered with the model's template without a generation prompt)."""

    name: CacheName
    model: str
    prompt: Annotated[str, msgspec.Meta(min_length=1)] | Annotated[list[TokenId], msgspec.Meta(min_length=1)] | None = (
        None
    )
    messages: Annotated[list[ChatMessage], msgspec.Meta(min_length=1, max_length=MAX_MESSAGES)] | None = None
    kv_bits: Literal[4, 8] | None = None
    kv_group_size: Literal[32, 64, 128] = 64
    replace: bool = False
    # Only with the admin key: build the cache for this tenant.
    tenant: str | None = None
    # True: answer 200 with server-sent events: PrefixCacheProgress after each prefilled chunk, then the
    # PrefixCacheOut, then [DONE]. Closing the stream cancels the build.
    stream: bool = False


class PrefixCacheOut(msgspec.Struct, kw_only=True):
    id: str
    object: str = "prefix_cache"
    model: str
    status: str
    status_reason: str | None
    source: str
    num_tokens: int
    tokens_sha256: str
    # Counts the versions written under this name (replaced caches count up); replicas agree on it.
    version: int
    kv_bits: int | None
    kv_group_size: int
    dtype: str
    size_bytes: int
    created_at: float
    last_used_at: float | None
    hits: int
    build_seconds: float
    model_fingerprint: str
    adapter_fingerprint: str | None = None  # built under an adapter: its files' digest
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


class PrefixCacheProgress(msgspec.Struct, kw_only=True):
    """One event of a streamed build: ``done`` of ``total`` prefix tokens are prefilled."""

    id: str
    object: str = "prefix_cache.progress"
    done: int
    total: int


class WarmedPrefixCache(msgspec.Struct, kw_only=True):
    """A cache's KV loaded into resident memory, where requests naming it find it without reading its file."""

    id: str
    object: str = "prefix_cache.warmed"
    # Whether it was already in memory (then nothing was read).
    was_resident: bool
    load_ms: float
    bytes_in_memory: int


class TenantUse(msgspec.Struct, kw_only=True):
    """What a tenant holds now, each figure beside the quota of the same name in ``limits``."""

    prefix_caches: int
    prefix_cache_disk_bytes: int
    prefix_cache_memory_bytes: int
    response_kv_bytes: int  # stored responses' KV in the engine's memory (max_response_kv_bytes)
    requests_in_progress: int  # running or queued (max_concurrent_requests)
    queued_tokens: int  # their prompt tokens (max_queued_tokens)
    requests_last_minute: int  # requests_per_minute
    tokens_last_minute: int  # tokens_per_minute: prompt + completion (reserved for requests still running)


class TenantOut(msgspec.Struct, kw_only=True):
    """A tenant's quotas (its own over ``tenant_defaults``; null is unlimited) and its use of them."""

    id: str
    object: Literal["tenant"] = "tenant"
    limits: TenantLimits
    use: TenantUse


class TenantList(msgspec.Struct, kw_only=True):
    object: Literal["list"] = "list"
    data: list[TenantOut]


# An adapter's name: also its record's file name (gateway.adapter_service), so no '/' and a bounded length.
ADAPTER_NAME = r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$"


class RegisterAdapter(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """An ``mlx_lm.lora`` adapter directory (``path``, inside the server's adapters directory) to serve as model
    ``name`` on model ``base`` (optional when one model is served). ``tenant``: the one tenant that may use it
    (a tenant's key registers for itself; an admin request without it: every tenant)."""

    name: Annotated[str, msgspec.Meta(pattern=ADAPTER_NAME)]
    path: Annotated[str, msgspec.Meta(min_length=1, max_length=4096)]
    base: str | None = None
    tenant: Annotated[str, msgspec.Meta(min_length=1, max_length=256)] | None = None


class AdapterOut(msgspec.Struct, kw_only=True):
    id: str
    object: str = "adapter"
    parent: str
    tenant: str | None
    path: str
    fingerprint: str  # the sha256 of its adapter_config.json and adapters.safetensors
    size_bytes: int
    created: int


class AdapterList(msgspec.Struct, kw_only=True):
    object: str = "list"
    data: list[AdapterOut]


class DeletedAdapter(msgspec.Struct, kw_only=True):
    id: str
    object: str = "adapter"
    deleted: bool = True
