"""The stored responses' KV (adapters/mlx_lm/response_kv.py): chains share their ancestors' positions, views
are a request's own, budgets and the time to live evict, and a deleted parent stays while a child uses it."""

from __future__ import annotations

from typing import Any

import pytest

from adapters.mlx_lm.blas import load_optimised_blas

load_optimised_blas()  # before mlx is imported below

import mlx.core as mx  # noqa: E402
from mlx_lm.models.cache import KVCache  # noqa: E402

from adapters.mlx_lm.response_kv import ResponseKV  # noqa: E402

LAYERS, HEADS, DIM = 2, 2, 4
PER_TOKEN = LAYERS * 2 * HEADS * DIM * 4  # float32 bytes a position takes


def sequence(n: int, padded: int = 0) -> list[Any]:
    """A cache whose position p holds the value p in every layer (plus unused padding past its offset)."""
    cache = []
    for layer in range(LAYERS):
        c = KVCache()
        values = mx.broadcast_to(mx.arange(n + padded, dtype=mx.float32)[:, None], (n + padded, DIM))
        c.keys = mx.broadcast_to(values[None, None], (1, HEADS, n + padded, DIM)) + layer
        c.values = c.keys * 2
        c.offset = n
        cache.append(c)
    return cache


def positions(cache: list[Any]) -> list[int]:
    return [int(x) for x in cache[0].keys[0, 0, :, 0].tolist()]


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def store(budget: int = 1 << 30, tenant: int | None = None, ttl: float = 0.0, clock: Clock | None = None) -> ResponseKV:
    return ResponseKV(budget, lambda _: tenant, ttl, clock or Clock())


def test_a_chain_holds_one_copy_of_its_longest_sequence() -> None:
    kv = store()
    assert kv.keep("m", "t", "r1", sequence(10, padded=6))
    for turn in range(2, 11):
        assert kv.keep("m", "t", f"r{turn}", sequence(10 * turn), parent_id=f"r{turn - 1}", reused=10 * (turn - 1))
    usage = kv.usage()
    assert usage.responses == 10 and usage.segments == 10
    assert usage.bytes == 100 * PER_TOKEN  # not 10+20+...+100 positions
    got = kv.view("m", "t", "r10", 99)
    assert got is not None
    cache, n = got
    assert n == 99 and positions(cache) == list(range(99))
    assert [float(c.keys[0, 0, 5, 0]) for c in cache] == [5.0, 6.0]  # each layer its own


def test_a_view_is_the_requests_own() -> None:
    kv = store()
    kv.keep("m", "t", "r1", sequence(8))
    cache, _ = kv.view("m", "t", "r1", 8) or ([], 0)
    cache[0].update_and_fetch(mx.zeros((1, HEADS, 1, DIM)), mx.zeros((1, HEADS, 1, DIM)))
    cache[0].keys[..., 0, :] = 100.0
    again, _ = kv.view("m", "t", "r1", 8) or ([], 0)
    assert positions(again) == list(range(8))


def test_other_tenants_and_models_miss() -> None:
    kv = store()
    kv.keep("m", "alpha", "r1", sequence(8))
    assert kv.view("m", "beta", "r1", 8) is None
    assert kv.view("other", "alpha", "r1", 8) is None
    assert kv.view("m", "alpha", "r1", 8) is not None
    assert (kv.usage().hits, kv.usage().misses) == (1, 2)


def test_a_deleted_parent_stays_while_its_child_uses_it() -> None:
    kv = store()
    kv.keep("m", "t", "r1", sequence(10))
    kv.keep("m", "t", "r2", sequence(20), parent_id="r1", reused=10)
    assert kv.forget("t", "r1")
    assert kv.view("m", "t", "r1", 10) is None
    assert kv.usage().bytes == 20 * PER_TOKEN and kv.usage().segments == 2
    cache, n = kv.view("m", "t", "r2", 20) or ([], 0)
    assert positions(cache) == list(range(20))
    assert kv.forget("t", "r2")
    assert kv.usage().bytes == 0 and kv.usage().segments == 0


def test_partial_reuse_shares_only_what_came_from_the_chain() -> None:
    kv = store()
    kv.keep("m", "t", "r1", sequence(10))
    kv.keep("m", "t", "r2", sequence(20), parent_id="r1", reused=10)
    # The third turn's prompt parted from r2's sequence at position 15: it shares r1's 10, copies the rest.
    kv.keep("m", "t", "r3", sequence(30), parent_id="r2", reused=15)
    assert kv.usage().bytes == (10 + 10 + 20) * PER_TOKEN
    cache, _ = kv.view("m", "t", "r3", 30) or ([], 0)
    assert positions(cache) == list(range(30))


def test_least_recently_used_goes_first_under_the_budget() -> None:
    clock = Clock()
    kv = store(budget=25 * PER_TOKEN, clock=clock)
    kv.keep("m", "t", "a", sequence(10))
    clock.now = 1
    kv.keep("m", "t", "b", sequence(10))
    clock.now = 2
    assert kv.view("m", "t", "a", 5) is not None  # a is now the most recently used
    clock.now = 3
    kv.keep("m", "t", "c", sequence(10))
    assert kv.view("m", "t", "b", 5) is None
    assert kv.view("m", "t", "a", 5) is not None and kv.view("m", "t", "c", 5) is not None
    assert kv.usage().evictions == 1 and kv.usage().bytes == 20 * PER_TOKEN


def test_a_tenant_over_its_budget_evicts_its_own() -> None:
    kv = ResponseKV(100 * PER_TOKEN, lambda t: 15 * PER_TOKEN if t == "small" else None, 0.0, Clock())
    kv.keep("m", "big", "x", sequence(40))
    kv.keep("m", "small", "a", sequence(10))
    kv.keep("m", "small", "b", sequence(10))
    assert kv.view("m", "small", "a", 5) is None and kv.view("m", "small", "b", 5) is not None
    assert kv.view("m", "big", "x", 5) is not None
    assert not kv.keep("m", "small", "huge", sequence(16))  # larger than its whole budget: not kept
    assert kv.usage().tenant_bytes == {"big": 40 * PER_TOKEN, "small": 10 * PER_TOKEN}


def test_the_time_to_live_counts_from_last_use() -> None:
    clock = Clock()
    kv = store(ttl=60, clock=clock)
    kv.keep("m", "t", "a", sequence(4))
    kv.keep("m", "t", "b", sequence(4))
    clock.now = 50
    assert kv.view("m", "t", "a", 4) is not None
    clock.now = 100
    kv.expire()
    assert kv.view("m", "t", "b", 4) is None and kv.view("m", "t", "a", 4) is not None
    clock.now = 200
    kv.expire()
    assert kv.usage().responses == 0 and kv.usage().bytes == 0


@pytest.mark.parametrize("budget", [0, 3 * PER_TOKEN])
def test_nothing_is_kept_when_it_cannot_fit(budget: int) -> None:
    kv = store(budget=budget)
    assert not kv.keep("m", "t", "a", sequence(4))
    assert kv.usage().bytes == 0
