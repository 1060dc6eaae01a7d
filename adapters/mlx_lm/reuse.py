"""Automatic prefix reuse for ``performance`` mode, strictly within one tenant and model.

A finished request leaves the KV of its prompt; a later request of the same tenant whose tokens start
the same way starts from (its own view of) that KV. Never across tenants, never for requests that name
a prefix cache, and only the prompt's KV is kept (nothing a request generated).

Owned by the engine thread (it adds, finds and counts); other threads see only the engine's snapshot."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from adapters.base import common_prefix

__all__ = ["TenantReuse"]


class TenantReuse:
    def __init__(self, per_tenant: int = 8, min_tokens: int = 32) -> None:
        self.per_tenant = per_tenant
        self.min_tokens = min_tokens
        self._entries: dict[tuple[str, str], OrderedDict[tuple[int, ...], list[Any]]] = {}
        self.hits = 0

    def add(self, model: str, tenant: str, tokens: tuple[int, ...], cache: list[Any]) -> None:
        entries = self._entries.setdefault((model, tenant), OrderedDict())
        entries[tokens] = cache
        entries.move_to_end(tokens)
        while len(entries) > self.per_tenant:
            entries.popitem(last=False)

    def find(self, model: str, tenant: str, tokens: tuple[int, ...]) -> tuple[list[Any], int] | None:
        """The stored KV sharing the longest prefix with ``tokens`` (at least ``min_tokens``)."""
        best: tuple[list[Any], int] | None = None
        for stored, cache in (self._entries.get((model, tenant)) or {}).items():
            n = common_prefix(stored, tokens)
            if n >= self.min_tokens and (best is None or n > best[1]):
                best = (cache, n)
        if best is not None:
            self.hits += 1
        return best

    def forget_model(self, model: str) -> None:
        """Drop every prompt kept for ``model`` (an adapter unloaded)."""
        for key in [k for k in self._entries if k[0] == model]:
            del self._entries[key]

    def entry_count(self) -> int:
        """Prompts kept (engine thread: the snapshot publishes it)."""
        return sum(len(e) for e in self._entries.values())
