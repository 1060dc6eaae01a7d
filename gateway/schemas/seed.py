"""The seed API's shapes, kept as aliases over the OpenAI and admin code."""

from __future__ import annotations

from typing import Annotated

import msgspec

from gateway.schemas.openai import CacheName, MaxTokens, StopList, Temperature, Usage

__all__ = ["SeedCreate", "SeedGenerate", "SeedGenerateWithPrefix", "SeedGenerated"]


NonEmpty = Annotated[str, msgspec.Meta(min_length=1)]


class SeedCreate(msgspec.Struct, kw_only=True):
    model: str
    cache_name: CacheName
    prefix_prompt: NonEmpty


class SeedGenerate(msgspec.Struct, kw_only=True):
    prompt: NonEmpty
    model: str
    max_tokens: MaxTokens | None = None
    temperature: Temperature | None = None
    stop_strings: StopList | None = None


class SeedGenerateWithPrefix(SeedGenerate, kw_only=True):
    cache_name: CacheName


class SeedGenerated(msgspec.Struct, kw_only=True):
    id: str
    model: str
    text: str
    finish_reason: str | None
    usage: Usage
    cache_name: str | None = None
