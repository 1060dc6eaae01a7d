"""What an engine shows of itself: an immutable snapshot, published by the engine's own thread.

The engine thread owns every live object (requests, batches, slots, models, automatic-reuse entries); after
each turn of its loop it builds an :class:`EngineSnapshot` from them and publishes it by swapping one
reference. ``/health``, ``/metrics`` and ``/admin/tenants`` read only the latest snapshot (and the
lock-guarded counters of :class:`adapters.stats.EngineStats`), never the live objects, so a scrape under
load cannot see a dictionary change size mid-iteration. Nothing here imports mlx.
"""

from __future__ import annotations

from typing import Any

import msgspec

from adapters.stats import EngineStats

__all__ = ["EngineSnapshot", "MemoryUse", "ModelHealth", "ResponseKVUsage", "ReuseUse", "health_report"]


class ModelHealth(msgspec.Struct, kw_only=True, frozen=True):
    """One configured model: ``loading`` (``stage`` says what it does), ``ready`` or ``failed`` (``error``)."""

    state: str
    error: str | None = None
    stage: str | None = None
    load_seconds: float | None = None
    dtype: str | None = None
    weights: str | None = None
    isolation_mode: str = "balanced"


class MemoryUse(msgspec.Struct, kw_only=True, frozen=True):
    """MLX's memory, in bytes, as last read on the engine thread."""

    active_memory: int = 0
    peak_memory: int = 0
    cache_memory: int = 0


class ReuseUse(msgspec.Struct, kw_only=True, frozen=True):
    """Automatic prefix reuse (performance mode): prompts kept, and requests started from one."""

    entries: int = 0
    hits: int = 0


class ResponseKVUsage(msgspec.Struct, kw_only=True, frozen=True):
    """Stored responses' KV: responses whose KV is held, segments held (a deleted or evicted response's stays
    while a continuation uses it), their bytes in all and per tenant, and continuations served or not."""

    responses: int = 0
    segments: int = 0
    bytes: int = 0
    tenant_bytes: dict[str, int] = {}
    hits: int = 0
    misses: int = 0
    evictions: int = 0


class EngineSnapshot(msgspec.Struct, kw_only=True, frozen=True):
    """The engine's state at the end of one turn of its loop. Built anew each time: never changed after."""

    device: str = "unknown"
    # Requests in the engine (prefilling, decoding or waiting for a slot), and their sequences.
    active_requests: int = 0
    batched_sequences: int = 0
    # Sequences in a batch waiting for a slot or KV room (new, or preempted for another tenant's share).
    waiting_sequences: int = 0
    preempted_sequences: int = 0  # since start
    automatic_reuse: ReuseUse = ReuseUse()
    response_kv: ResponseKVUsage = ResponseKVUsage()
    memory: MemoryUse = MemoryUse()
    models: tuple[tuple[str, ModelHealth], ...] = ()


def health_report(
    alive: bool, error: str | None, snap: EngineSnapshot, stats: EngineStats, cache_stats: dict[str, int] | None
) -> dict[str, Any]:
    """What ``/health`` shows of an engine: its latest snapshot, with the counters' totals."""
    return {
        "engine_alive": alive,
        "engine_error": error,
        "device": snap.device,
        "active_requests": snap.active_requests,
        "batched_sequences": snap.batched_sequences,
        "waiting_sequences": snap.waiting_sequences,
        "preempted_sequences": snap.preempted_sequences,
        "batch_steps": stats.batch_totals(),
        "automatic_reuse": msgspec.structs.asdict(snap.automatic_reuse),
        # Totals only: which tenants hold what is the admin's (/admin/tenants), not every caller's.
        "response_kv": {k: v for k, v in msgspec.structs.asdict(snap.response_kv).items() if k != "tenant_bytes"},
        "requests": stats.request_totals(),
        "models": {name: msgspec.structs.asdict(m) for name, m in snap.models},
        "memory": msgspec.structs.asdict(snap.memory),
        "prefix_caches": cache_stats,
    }
