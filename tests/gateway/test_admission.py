"""The admission queue on its own (no server): places, the order of the queue (fair between tenants, first
come first served within one), its bounds, timeouts, tenants' own limits and windows, and clients that leave
while queued."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from gateway.config import TenantLimits
from gateway.errors import RateLimited, TenantRateLimited
from gateway.tenancy.admission import Admission


async def _hold(admission: Admission, tenant: str, order: list[str], release: asyncio.Event) -> None:
    async with admission.slot(1, tenant):
        order.append(tenant)
        await release.wait()


def test_a_freed_place_goes_to_the_tenant_holding_fewest_then_served_longest_ago() -> None:
    """One place: tenant a holds it with three more queued, then b queues one. Each release goes to b
    first (a was served last), then back to a's queue in order."""

    async def scenario() -> list[str]:
        admission = Admission(max_running=1, max_queued=10, max_queued_tokens=100, queue_timeout=10)
        order: list[str] = []
        releases = [asyncio.Event() for _ in range(5)]
        tasks = []
        for i, tenant in enumerate(["a", "a", "a", "a", "b"]):
            tasks.append(asyncio.create_task(_hold(admission, tenant, order, releases[i])))
            await asyncio.sleep(0)
        assert order == ["a"] and admission.queued == 4
        for i in [0, 4, 1, 2, 3]:  # release whoever holds the place, in the order it was given
            releases[i].set()
            await asyncio.sleep(0.01)
        await asyncio.gather(*tasks)
        assert admission.running == 0 and admission.queued == 0
        return order

    assert asyncio.run(scenario()) == ["a", "b", "a", "a", "a"]


def test_a_queued_client_that_leaves_gives_nothing_away_and_takes_nothing() -> None:
    async def scenario() -> None:
        admission = Admission(max_running=1, max_queued=10, max_queued_tokens=100, queue_timeout=10)
        order: list[str] = []
        first, second, third = asyncio.Event(), asyncio.Event(), asyncio.Event()
        holder = asyncio.create_task(_hold(admission, "a", order, first))
        await asyncio.sleep(0)
        leaver = asyncio.create_task(_hold(admission, "b", order, second))
        waiter = asyncio.create_task(_hold(admission, "c", order, third))
        await asyncio.sleep(0)
        leaver.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await leaver
        first.set()
        await asyncio.sleep(0.01)
        assert order == ["a", "c"] and admission.running == 1 and admission.queued == 0
        third.set()
        await asyncio.gather(holder, waiter)
        assert admission.running == 0

    asyncio.run(scenario())


def test_a_request_queued_past_its_timeout_is_a_429() -> None:
    async def scenario() -> None:
        admission = Admission(max_running=1, max_queued=10, max_queued_tokens=100, queue_timeout=0.05)
        release = asyncio.Event()
        holder = asyncio.create_task(_hold(admission, "a", [], release))
        await asyncio.sleep(0)
        with pytest.raises(RateLimited):
            async with admission.slot(1, "b"):
                pass
        assert admission.queued == 0 and admission.running == 1
        release.set()
        await holder
        assert admission.running == 0

    asyncio.run(scenario())


def _limited(**limits: int) -> Admission:
    """Two places, a queue of four; tenant ``t`` has ``limits``, every other tenant none."""
    own = TenantLimits(**limits)
    return Admission(
        max_running=2,
        max_queued=4,
        max_queued_tokens=100,
        queue_timeout=10,
        limits_of=lambda tenant: own if tenant == "t" else TenantLimits(),
    )


def test_one_tenants_queue_is_first_come_first_served() -> None:
    async def scenario() -> list[str]:
        admission = Admission(max_running=1, max_queued=10, max_queued_tokens=100, queue_timeout=10)
        order: list[str] = []
        names = ["first", "second", "third", "fourth"]
        releases = {name: asyncio.Event() for name in names}

        async def hold(name: str) -> None:
            async with admission.slot(1, "a"):
                order.append(name)
                await releases[name].wait()

        tasks = []
        for name in names:
            tasks.append(asyncio.create_task(hold(name)))
            await asyncio.sleep(0)
        assert admission.stats() == {"running": 1, "queued": 3, "queued_tokens": 3}
        for name in names:
            releases[name].set()
            await asyncio.sleep(0.01)
        await asyncio.gather(*tasks)
        assert admission.stats() == {"running": 0, "queued": 0, "queued_tokens": 0}
        return order

    assert asyncio.run(scenario()) == ["first", "second", "third", "fourth"]


def test_a_full_queue_refuses_at_once_by_count_and_by_prompt_tokens() -> None:
    async def scenario() -> None:
        admission = Admission(max_running=1, max_queued=2, max_queued_tokens=10, queue_timeout=10)
        release = asyncio.Event()
        holder = asyncio.create_task(_hold(admission, "a", [], release))
        await asyncio.sleep(0)
        queued = asyncio.create_task(_hold(admission, "a", [], release))
        await asyncio.sleep(0)
        # 1 queued token + 10 more passes max_queued_tokens, though a place in the queue is free.
        with pytest.raises(RateLimited) as by_tokens:
            async with admission.slot(10, "b"):
                pass
        assert by_tokens.value.status_code == 429 and by_tokens.value.type == "rate_limit_error"
        assert by_tokens.value.code == "rate_limit_exceeded" and by_tokens.value.headers() == {"retry-after": "1"}
        assert by_tokens.value.message == "The server is at capacity (1 running, 1 queued); retry shortly"
        second = asyncio.create_task(_hold(admission, "a", [], release))
        await asyncio.sleep(0)
        with pytest.raises(RateLimited, match=r"\(1 running, 2 queued\)"):  # by count
            async with admission.slot(1, "b"):
                pass
        # Refused requests hold nothing: neither a place nor their tenant's counts.
        assert admission.stats() == {"running": 1, "queued": 2, "queued_tokens": 2}
        assert admission.tenant_use("b")["requests_in_progress"] == 0
        release.set()
        await asyncio.gather(holder, queued, second)
        assert admission.stats() == {"running": 0, "queued": 0, "queued_tokens": 0}

    asyncio.run(scenario())


def test_the_timeout_429_says_how_long_it_waited_and_gives_back_the_tenants_counts() -> None:
    async def scenario() -> None:
        admission = Admission(max_running=1, max_queued=10, max_queued_tokens=100, queue_timeout=0.05)
        release = asyncio.Event()
        holder = asyncio.create_task(_hold(admission, "a", [], release))
        await asyncio.sleep(0)
        with pytest.raises(RateLimited) as raised:
            async with admission.slot(7, "b", reserve=20):
                pass
        assert raised.value.message == "Waited 0.05s in the queue without a free place; retry shortly"
        assert raised.value.headers() == {"retry-after": "1"}  # never less than a second
        assert admission.tenant_use("b") == {
            "requests_in_progress": 0,
            "queued_tokens": 0,
            "requests_last_minute": 0,  # refused by the server's limits: its window counts nothing
            "tokens_last_minute": 0,
        }
        release.set()
        await holder

    asyncio.run(scenario())


def test_a_tenant_past_its_concurrency_is_refused_while_others_are_admitted() -> None:
    """Its requests in the server count queued ones too; another tenant's request still queues for a place."""

    async def scenario() -> None:
        admission = _limited(max_concurrent_requests=2)
        release = asyncio.Event()
        running = asyncio.create_task(_hold(admission, "t", [], release))
        await asyncio.sleep(0)
        other = asyncio.create_task(_hold(admission, "u", [], release))
        await asyncio.sleep(0)
        queued = asyncio.create_task(_hold(admission, "t", [], release))
        await asyncio.sleep(0)
        assert admission.stats()["queued"] == 1
        with pytest.raises(TenantRateLimited) as raised:
            async with admission.slot(1, "t"):
                pass
        error = raised.value
        assert (error.status_code, error.type, error.code) == (429, "requests", "rate_limit_exceeded")
        assert error.message == "Tenant 't' has 2 requests in progress, its limit (2); retry when one ends"
        assert error.headers() == {"retry-after": "1", "x-should-retry": "true"}
        order: list[str] = []
        another = asyncio.create_task(_hold(admission, "v", order, release))  # queued, not refused
        await asyncio.sleep(0)
        assert admission.stats()["queued"] == 2 and not another.done()
        assert admission.tenant_use("t")["requests_in_progress"] == 2
        release.set()
        await asyncio.gather(running, other, queued, another)
        assert order == ["v"]
        assert admission.tenant_use("t")["requests_in_progress"] == 0

    asyncio.run(scenario())


def test_a_tenant_past_its_prompt_tokens_in_the_server_is_refused() -> None:
    async def scenario() -> None:
        admission = _limited(max_queued_tokens=10)
        async with admission.slot(6, "t"):
            assert admission.tenant_use("t")["queued_tokens"] == 6
            with pytest.raises(TenantRateLimited) as raised:
                async with admission.slot(5, "t"):
                    pass
            assert raised.value.type == "tokens"
            assert raised.value.message == (
                "Tenant 't' has 6 prompt tokens in progress; 5 more would pass its limit (10)"
            )
            async with admission.slot(4, "t"):  # exactly the limit
                assert admission.tenant_use("t")["queued_tokens"] == 10
        assert admission.tenant_use("t")["queued_tokens"] == 0

    asyncio.run(scenario())


def test_a_tenants_token_window_reserves_the_most_and_settles_on_what_was_used() -> None:
    async def scenario() -> None:
        admission = _limited(tokens_per_minute=100)
        async with admission.slot(10, "t", reserve=60) as ticket:
            assert admission.tenant_use("t")["tokens_last_minute"] == 60
            with pytest.raises(TenantRateLimited) as raised:  # 60 reserved + 50 > 100
                async with admission.slot(10, "t", reserve=50):
                    pass
            assert raised.value.type == "tokens" and raised.value.retry_after > 0
            ticket.used = 25
        assert admission.tenant_use("t") == {
            "requests_in_progress": 0,
            "queued_tokens": 0,
            "requests_last_minute": 1,  # the refused request counts for nothing
            "tokens_last_minute": 25,
        }
        async with admission.slot(10, "t", reserve=50):  # fits now that the first one settled
            pass

    asyncio.run(scenario())


def test_a_client_cancelled_as_it_is_given_a_place_passes_the_place_on() -> None:
    async def scenario() -> None:
        admission = Admission(max_running=1, max_queued=10, max_queued_tokens=100, queue_timeout=10)
        order: list[str] = []
        release = asyncio.Event()
        release.set()
        holder = admission.slot(1, "a")
        await holder.__aenter__()
        leaver = asyncio.create_task(_hold(admission, "b", order, release))
        waiter = asyncio.create_task(_hold(admission, "c", order, release))
        await asyncio.sleep(0)
        assert admission.queued == 2
        await holder.__aexit__(None, None, None)  # b is given the place; its task has not run yet
        leaver.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await leaver
        await waiter
        assert order == ["c"]
        assert admission.stats() == {"running": 0, "queued": 0, "queued_tokens": 0}
        assert admission.tenant_use("b")["requests_in_progress"] == 0

    asyncio.run(scenario())
