"""A prototype (not wired into the engine): KV for a decode batch in preallocated slots.

mlx-lm's ``BatchKVCache`` keeps the batch left-padded and, when a sequence leaves, ``filter`` copies every
layer's keys and values without that row (about 1 ms per layer on an H200, 8B shape). Here each layer
holds ``slots`` rows of ``capacity`` positions allocated once; a sequence owns a slot and its own offset
(positions differ per row: RoPE takes the per-row offsets as an array, as it does for BatchKVCache).
A departure only marks its slot free (no copy); an arrival copies its own prefilled cache into a free slot
(one slice per layer). The decode step runs every slot, free ones masked out, so the batch's shape stays
fixed while sequences come and go (no new kernels per shape); attention covers positions up to the
longest live sequence, with one mask built per step from the offsets.

Decode only (one token per row per step); prefill stays on each sequence's own plain cache.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx

__all__ = ["SlotBatch", "SlotKVCache"]


class SlotKVCache:
    """One layer's slots. The model calls ``offset``, ``make_mask`` and ``update_and_fetch``."""

    def __init__(self, batch: SlotBatch, keys: mx.array, values: mx.array) -> None:
        self._batch = batch
        self.keys = keys  # (slots, kv heads, capacity, head dim)
        self.values = values

    @property
    def offset(self) -> mx.array:
        return self._batch.positions

    def make_mask(self, n: int, **_: Any) -> mx.array:
        return self._batch.mask

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        # Each row writes its one new position at its own offset: a scatter along the sequence axis.
        at = self._batch.positions[:, None, None, None]
        self.keys = mx.put_along_axis(self.keys, at, keys, axis=2)
        self.values = mx.put_along_axis(self.values, at, values, axis=2)
        end = self._batch.window
        return self.keys[..., :end, :], self.values[..., :end, :]


class SlotBatch:
    """``slots`` sequences' KV for every layer of one model, and their offsets."""

    def __init__(self, layers: int, slots: int, capacity: int, kv_heads: int, head_dim: int, dtype: mx.Dtype) -> None:
        self.slots, self.capacity = slots, capacity
        shape = (slots, kv_heads, capacity, head_dim)
        self.layers = [SlotKVCache(self, mx.zeros(shape, dtype), mx.zeros(shape, dtype)) for _ in range(layers)]
        self.lengths = [0] * slots  # tokens in each slot's KV (0: free)
        self.live = [False] * slots
        self.positions = mx.zeros((slots,), mx.int32)
        self.mask = mx.zeros((slots, 1, 1, 1), mx.bool_)
        self.window = 1

    def free_slots(self) -> list[int]:
        return [i for i, live in enumerate(self.live) if not live]

    def admit(self, slot: int, cache: list[Any]) -> None:
        """Copy one sequence's prefilled plain KV (mlx-lm ``KVCache`` per layer) into ``slot``."""
        n = int(cache[0].offset)
        if n + 1 > self.capacity:
            raise ValueError(f"a {n}-token cache does not fit a slot of {self.capacity}")
        for layer, c in zip(self.layers, cache, strict=True):
            layer.keys[slot : slot + 1, :, :n, :] = c.keys[..., :n, :]
            layer.values[slot : slot + 1, :, :n, :] = c.values[..., :n, :]
        self.lengths[slot], self.live[slot] = n, True

    def release(self, slot: int) -> None:
        """The sequence in ``slot`` left: nothing is copied; its positions are masked from now on."""
        self.lengths[slot], self.live[slot] = 0, False

    def prepare_step(self) -> None:
        """Offsets, window and mask for the next decode step (one token per slot), built once."""
        self.positions = mx.array(self.lengths, dtype=mx.int32)
        self.window = max(self.lengths) + 1
        if self.window > self.capacity:
            raise ValueError("a slot is full")
        cols = mx.arange(self.window)[None]
        live = mx.array(self.live)[:, None]
        # A row sees its own positions up to and including the one written this step; a free row sees only
        # its position 0 (so its softmax stays finite), and its output is ignored.
        mask = (cols <= self.positions[:, None]) & (live | (cols == 0))
        self.mask = mask[:, None, None, :]

    def advance(self) -> None:
        """After a decode step: every live slot holds one more token."""
        self.lengths = [n + 1 if live else 0 for n, live in zip(self.lengths, self.live, strict=True)]
