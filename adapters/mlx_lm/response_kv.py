"""The KV of stored responses (``/v1/responses`` with ``store``): each response's whole sequence (its prompt and
its output), kept in memory per tenant so that a continuation (``previous_response_id``) prefills only its new
input.

Sharing. A response continued from a stored one holds only the positions its ancestor does not (a *segment*)
and a reference to that ancestor: a 10-turn chain holds one copy of its longest sequence, not ten. A request is
handed its own concatenation of the chain (new arrays: generation never writes into a stored segment, and no
request sees another's), exactly as a named cache hands out views.

Eviction. Least recently used first, under the engine-wide byte budget and each tenant's, and after
``ttl_seconds`` unused; ``forget`` is the API's DELETE. An evicted or deleted response whose segment a
descendant still uses stays in memory, unlisted, until the last descendant goes; its bytes keep counting
against its tenant, so a budget is what memory really holds. A miss is never an error: the continuation
prefills the stored token ids, which gives the same answer.

Only plain KV layers are kept (a quantised or rotating cache is not: such a response is continued by prefill).

Owned by the engine thread (it keeps, hands out, forgets and evicts); other threads see the engine's snapshot.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
from mlx_lm.models.cache import KVCache

from adapters.snapshot import ResponseKVUsage

__all__ = ["ResponseKV"]

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class _Node:
    key: tuple[str, str]  # (tenant, response id)
    model: str
    parent: _Node | None
    start: int  # the first position this node's segment holds
    end: int  # one past its last
    layers: list[tuple[mx.array, mx.array]]  # per layer: keys, values of positions [start, end)
    nbytes: int
    used_at: float
    children: int = 0
    listed: bool = True

    def chain(self) -> list[_Node]:
        """Root first."""
        nodes: list[_Node] = []
        node: _Node | None = self
        while node is not None:
            nodes.append(node)
            node = node.parent
        nodes.reverse()
        return nodes


class ResponseKV:
    def __init__(
        self,
        budget_bytes: int,
        tenant_budget: Callable[[str], int | None],
        ttl_seconds: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.budget_bytes = budget_bytes
        self._tenant_budget = tenant_budget
        self.ttl_seconds = ttl_seconds
        self._clock = clock
        self._listed: OrderedDict[tuple[str, str], _Node] = OrderedDict()  # least recently used first
        self._bytes = 0
        self._tenant_bytes: dict[str, int] = {}
        self._segments = 0
        self.hits = self.misses = self.evictions = 0

    # ---- continuing ------------------------------------------------------------------------------

    def view(self, model: str, tenant: str, response_id: str, n: int) -> tuple[list[Any], int] | None:
        """A request's own cache over (at most) the first ``n`` positions of the response's sequence, and how
        many positions it holds; None when the response's KV is not here (never kept, evicted, expired, another
        tenant's or another model's)."""
        self.expire()
        node = self._listed.get((tenant, response_id))
        if node is None or node.model != model or n <= 0:
            self.misses += 1
            return None
        node.used_at = self._clock()
        self._listed.move_to_end(node.key)
        n = min(n, node.end)
        parts: list[list[tuple[mx.array, mx.array]]] = []
        for segment in node.chain():
            if segment.start >= n:
                break
            take = min(segment.end, n) - segment.start
            parts.append([(k[..., :take, :], v[..., :take, :]) for k, v in segment.layers])
        cache = []
        for layer in zip(*parts, strict=True):
            c = KVCache()
            c.keys = mx.concatenate([k for k, _ in layer], axis=2)
            c.values = mx.concatenate([v for _, v in layer], axis=2)
            c.offset = n
            cache.append(c)
        mx.eval([a for c in cache for a in (c.keys, c.values)])
        self.hits += 1
        return cache, n

    # ---- keeping ---------------------------------------------------------------------------------

    def keep(
        self,
        model: str,
        tenant: str,
        response_id: str,
        cache: list[Any] | None,
        parent_id: str | None = None,
        reused: int = 0,
    ) -> bool:
        """Keep a finished request's KV as ``response_id``'s. ``reused``: how many leading positions came from
        ``parent_id``'s KV (those stay shared with the deepest ancestor that holds them, not copied). Whether
        it was kept (a budget too small for it, or layers other than plain KV, keep nothing)."""
        if not cache or any(type(c) is not KVCache for c in cache) or self.budget_bytes <= 0:
            return False
        end = min(c.offset for c in cache)
        if end <= 0:
            return False
        self.expire()
        ancestor = self._ancestor(model, tenant, parent_id, reused)
        start = ancestor.end if ancestor is not None else 0
        # Contiguous copies: a slice would keep the request's whole (larger, padded) buffer alive.
        layers = [(mx.contiguous(c.keys[..., start:end, :]), mx.contiguous(c.values[..., start:end, :])) for c in cache]
        mx.eval([a for pair in layers for a in pair])
        nbytes = sum(k.nbytes + v.nbytes for k, v in layers)
        limit = self._limit(tenant)
        if nbytes > limit:
            logger.info("response %s: its KV (%d bytes) exceeds the budget (%d): not kept", response_id, nbytes, limit)
            return False
        key = (tenant, response_id)
        if key in self._listed:
            self._unlist(self._listed[key])
        node = _Node(key, model, ancestor, start, end, layers, nbytes, self._clock())
        if ancestor is not None:
            ancestor.children += 1
        self._listed[key] = node
        self._add_bytes(tenant, nbytes)
        self._segments += 1
        self._fit(tenant, protect=node)
        return key in self._listed

    def _ancestor(self, model: str, tenant: str, parent_id: str | None, reused: int) -> _Node | None:
        """The deepest node of the parent's chain whose positions all came from it (so they need no copy)."""
        if parent_id is None or reused <= 0:
            return None
        parent = self._listed.get((tenant, parent_id))
        if parent is None or parent.model != model:
            return None
        best = None
        for node in parent.chain():
            if node.end <= reused:
                best = node
        return best

    # ---- forgetting ------------------------------------------------------------------------------

    def forget(self, tenant: str, response_id: str) -> bool:
        """Drop a response's KV (DELETE); whether it was here."""
        node = self._listed.get((tenant, response_id))
        if node is None:
            return False
        self._unlist(node)
        return True

    def forget_model(self, model: str) -> int:
        """Drop every response's KV computed by ``model`` (an adapter unloaded); how many."""
        nodes = [n for n in self._listed.values() if n.model == model]
        for node in nodes:
            self._unlist(node)
        return len(nodes)

    def expire(self) -> None:
        if self.ttl_seconds <= 0:
            return
        horizon = self._clock() - self.ttl_seconds
        while self._listed:
            node = next(iter(self._listed.values()))
            if node.used_at > horizon:
                break
            self._unlist(node)
            self.evictions += 1

    def _limit(self, tenant: str) -> int:
        own = self._tenant_budget(tenant)
        return self.budget_bytes if own is None else min(own, self.budget_bytes)

    def _fit(self, tenant: str, protect: _Node) -> None:
        """Evict least recently used responses until the tenant's bytes and the total fit their budgets. The
        tenant over its own budget loses its own responses only."""
        limit = self._limit(tenant)
        for key in list(self._listed):
            if self._tenant_bytes.get(tenant, 0) <= limit:
                break
            node = self._listed[key]
            if key[0] == tenant and node is not protect:
                self._unlist(node)
                self.evictions += 1
        for key in list(self._listed):
            if self._bytes <= self.budget_bytes:
                break
            node = self._listed[key]
            if node is not protect:
                self._unlist(node)
                self.evictions += 1
        if self._bytes > self.budget_bytes or self._tenant_bytes.get(tenant, 0) > limit:
            self._unlist(protect)  # what is left is held for descendants: the newest does not fit after all

    def _unlist(self, node: _Node) -> None:
        self._listed.pop(node.key, None)
        node.listed = False
        self._release(node)

    def _release(self, node: _Node) -> None:
        """Free unlisted segments no descendant uses, walking up the chain."""
        current: _Node | None = node
        while current is not None and not current.listed and current.children == 0:
            self._add_bytes(current.key[0], -current.nbytes)
            self._segments -= 1
            current.layers = []
            parent, current.parent = current.parent, None
            if parent is not None:
                parent.children -= 1
            current = parent

    def _add_bytes(self, tenant: str, delta: int) -> None:
        self._bytes += delta
        left = self._tenant_bytes.get(tenant, 0) + delta
        if left:
            self._tenant_bytes[tenant] = left
        else:
            self._tenant_bytes.pop(tenant, None)

    def usage(self) -> ResponseKVUsage:
        return ResponseKVUsage(
            responses=len(self._listed),
            segments=self._segments,
            bytes=self._bytes,
            tenant_bytes=dict(self._tenant_bytes),
            hits=self.hits,
            misses=self.misses,
            evictions=self.evictions,
        )
