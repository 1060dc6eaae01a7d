"""KV for a decode batch in slots: a departure frees a slot, an arrival copies its own KV into one.

mlx-lm's ``BatchKVCache`` keeps the batch left-padded: an arrival ``extend``s every layer (a copy of the whole
batch's KV), a departure ``filter``s every layer (another), and both read the padding back to the host once
per layer. On an H200, 8B shape, one departure and one arrival every step at batch 128 cost 69 ms a step
against 21 ms here and 12 ms for the plain loop without churn (``bench.slot_kv``).

Here each layer holds ``rows`` slots of ``capacity`` positions. A sequence owns a slot and its own length;
RoPE takes the per-row offsets as an array (as it does for ``BatchKVCache``). The decode step runs every
slot, free ones included (their output is ignored), so the batch's shape only changes when it grows: rows
double when an arrival finds no free slot (up to ``max_rows``), capacity grows by ``CAPACITY_STEP`` when the
longest sequence reaches it. Attention covers positions up to the longest live sequence, with one mask
built per step from the lengths; when every slot is live and all lengths are equal no mask is needed, and
the backend's fused decode kernel runs (on CUDA an array mask costs 2-8x the fused kernel: see
``bench/RESULTS.md``).

Decode only (one token per row per step); prefill runs on each arrival's own plain cache.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
from mlx_lm.models.cache import KVCache

from adapters.base import KV_STEP

__all__ = ["CAPACITY_STEP", "SlotBatch", "SlotKVCache", "capacity_for"]

# Positions added to every slot when the longest sequence outgrows the batch (the step the KV budget counts in).
CAPACITY_STEP = KV_STEP


def capacity_for(tokens: int) -> int:
    """Room for ``tokens`` positions, in whole steps of ``CAPACITY_STEP``."""
    return -(-tokens // CAPACITY_STEP) * CAPACITY_STEP


class SlotKVCache:
    """One layer's slots. The model calls ``offset``, ``make_mask`` and ``update_and_fetch``."""

    def __init__(self, batch: SlotBatch, keys: mx.array, values: mx.array) -> None:
        self._batch = batch
        self.keys = keys  # (rows, kv heads, capacity, head dim)
        self.values = values

    @property
    def offset(self) -> mx.array:
        return self._batch.positions

    def make_mask(self, n: int, **_: Any) -> mx.array | None:
        return self._batch.mask

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        # Each row writes its one new position at its own offset: a scatter along the sequence axis.
        at = self._batch.positions[:, None, None, None]
        self.keys = mx.put_along_axis(self.keys, at, keys, axis=2)
        self.values = mx.put_along_axis(self.values, at, values, axis=2)
        end = self._batch.window
        return self.keys[..., :end, :], self.values[..., :end, :]


class SlotBatch:
    """The slots of every layer of one model, and each slot's length (0: free)."""

    def __init__(self, layers: int, rows: int, capacity: int, kv_heads: int, head_dim: int, dtype: mx.Dtype) -> None:
        self.rows, self.capacity = rows, capacity
        shape = (rows, kv_heads, capacity, head_dim)
        self.layers = [SlotKVCache(self, mx.zeros(shape, dtype), mx.zeros(shape, dtype)) for _ in range(layers)]
        self.lengths = [0] * rows  # tokens in each slot's KV
        self.live = [False] * rows
        self.positions = mx.zeros((rows,), mx.int32)
        self.mask: mx.array | None = None
        self.window = 1

    @classmethod
    def like(cls, cache: list[Any], rows: int, tokens: int) -> SlotBatch:
        """Empty slots shaped after one sequence's prefilled plain cache, each with room for ``tokens``."""
        keys = cache[0].keys
        _, kv_heads, _, head_dim = keys.shape
        return cls(len(cache), rows, capacity_for(tokens), kv_heads, head_dim, keys.dtype)

    def free_slot(self) -> int | None:
        """The lowest free slot, or None."""
        for i, live in enumerate(self.live):
            if not live:
                return i
        return None

    def grow_rows(self, rows: int) -> None:
        """``rows`` slots from now on (more than now); the new ones are free."""
        extra = rows - self.rows
        for layer in self.layers:
            for name in ("keys", "values"):
                old = getattr(layer, name)
                setattr(layer, name, mx.concatenate([old, mx.zeros((extra, *old.shape[1:]), old.dtype)], axis=0))
        self.lengths += [0] * extra
        self.live += [False] * extra
        self.rows = rows

    def _fit(self, tokens: int) -> None:
        """Capacity for ``tokens`` positions in a slot."""
        if tokens <= self.capacity:
            return
        capacity = capacity_for(tokens)
        for layer in self.layers:
            for name in ("keys", "values"):
                old = getattr(layer, name)
                pad = mx.zeros((*old.shape[:2], capacity - self.capacity, old.shape[3]), old.dtype)
                setattr(layer, name, mx.concatenate([old, pad], axis=2))
        self.capacity = capacity

    def admit(self, slot: int, cache: list[Any], row: int = 0, length: int | None = None) -> None:
        """Copy one sequence's KV (row ``row`` of a plain ``KVCache`` per layer, ``length`` positions, by
        default the cache's offset) into ``slot``."""
        n = int(cache[0].offset) if length is None else length
        self._fit(n + 1)
        for layer, c in zip(self.layers, cache, strict=True):
            layer.keys[slot, :, :n, :] = c.keys[row, :, :n, :]
            layer.values[slot, :, :n, :] = c.values[row, :, :n, :]
        self.lengths[slot], self.live[slot] = n, True

    def extract(self, slot: int) -> list[Any]:
        """A copy of ``slot``'s KV as plain caches (a finished sequence's, kept for reuse)."""
        n = self.lengths[slot]
        out = []
        for layer in self.layers:
            c = KVCache()
            c.keys = mx.array(layer.keys[slot : slot + 1, :, :n, :])
            c.values = mx.array(layer.values[slot : slot + 1, :, :n, :])
            c.offset = n
            out.append(c)
        return out

    def release(self, slot: int) -> None:
        """The sequence in ``slot`` left: nothing is copied; its positions are masked from now on."""
        self.lengths[slot], self.live[slot] = 0, False

    def prepare_step(self) -> None:
        """Offsets, window and mask for the next decode step (one token per slot), built once for every
        layer. A row sees its own positions up to and including the one written this step; a free row sees
        only its position 0 (so that its softmax stays finite), and its output is ignored."""
        self._fit(max(self.lengths) + 1)
        self.positions = mx.array(self.lengths, dtype=mx.int32)
        self.window = max(self.lengths) + 1
        if all(self.live) and len(set(self.lengths)) == 1:
            self.mask = None
            return
        cols = mx.arange(self.window)[None]
        live = mx.array(self.live)[:, None]
        mask = (cols <= self.positions[:, None]) & (live | (cols == 0))
        self.mask = mask[:, None, None, :]

    def advance(self) -> None:
        """After a decode step: every live slot holds one more token."""
        self.lengths = [n + 1 if live else 0 for n, live in zip(self.lengths, self.live, strict=True)]
