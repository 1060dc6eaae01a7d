"""The admission queue on its own (no server): places, the fair order between tenants, timeouts and
clients that leave while queued."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from gateway.errors import RateLimited
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
