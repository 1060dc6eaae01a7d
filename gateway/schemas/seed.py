"""The seed API's shapes, kept as aliases over the OpenAI and admin code."""

from __future__ import annotations

import msgspec

from gateway.schemas.openai import Usage

__all__ = ["SeedCreate", "SeedGenerate", "SeedGenerateWithPrefix", "SeedGenerated"]


class SeedCreate(msgspec.Struct, kw_only=True):
    model: str
    cache_name: str
    prefix_prompt: str


class SeedGenerate(msgspec.Struct, kw_only=True):
    prompt: str
    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    stop_strings: list[str] | None = None


class SeedGenerateWithPrefix(SeedGenerate, kw_only=True):
    cache_name: str


class SeedGenerated(msgspec.Struct, kw_only=True):
    id: str
    model: str
    text: str
    finish_reason: str | None
    usage: Usage
    cache_name: str | None = None
