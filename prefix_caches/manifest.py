"""The manifest we keep beside each cache file: what it was built from and for, and how it is used.

A ``Manifest`` is a plain (mutable) Struct: the engine fills one in for a save. Once the store holds it,
nobody changes it: the store counts a hit or a sync on a copy (``msgspec.structs.replace``) that replaces
it, so any thread may keep and read a manifest it was handed.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

__all__ = ["FORMAT_VERSION", "Manifest"]

FORMAT_VERSION = 1


class Manifest(msgspec.Struct, kw_only=True):
    format: int = FORMAT_VERSION
    # Counts the versions written under this name (1 for the first); replicas compare it to what they hold.
    version: int = 1
    name: str
    tenant: str
    model: str
    # An adapter's model_fingerprint covers its base model's and its files (adapter_fingerprint: their digest).
    model_fingerprint: str
    adapter_fingerprint: str = ""
    tokenizer_fingerprint: str
    chat_template_fingerprint: str
    mlx_version: str
    mlx_lm_version: str
    source: Literal["prompt", "messages"]
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    tokens: list[int]
    tokens_sha256: str
    kv_bits: int | None = None
    kv_group_size: int = 64
    dtype: str = ""
    size_bytes: int = 0
    file_sha256: str = ""
    created_at: float = 0.0
    last_used_at: float | None = None
    hits: int = 0
    build_seconds: float = 0.0

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)
