"""The shared admission on its own (no server): two front ends' :class:`SharedAdmission` against one
:class:`Coordinator` over real ZMQ sockets, in one event loop. The counts, refusals and the queue are the
coordinator's one :class:`Admission`'s, whichever front end asks."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from gateway.config import TenantLimits
from gateway.errors import RateLimited, TenantRateLimited
from gateway.tenancy.admission import Admission
from gateway.tenancy.coordinator import Coordinator, SharedAdmission

LIMITS = {"alpha": TenantLimits(requests_per_minute=2, tokens_per_minute=100)}


def _limits(tenant: str) -> TenantLimits:
    return LIMITS.get(tenant, TenantLimits())


@asynccontextmanager
async def _two_fronts(folder: Path) -> AsyncIterator[tuple[Admission, SharedAdmission, SharedAdmission]]:
    admission = Admission(max_running=1, max_queued=1, max_queued_tokens=100, queue_timeout=10, limits_of=_limits)
    address = f"ipc://{folder}/admission"
    serving = asyncio.create_task(Coordinator(admission, address).serve())
    fronts = SharedAdmission(address, _limits, 10), SharedAdmission(address, _limits, 10)
    try:
        yield admission, *fronts
    finally:
        for front in fronts:
            front.close()
        serving.cancel()
        await asyncio.gather(serving, return_exceptions=True)


async def _until(check: Callable[[], bool]) -> None:
    async with asyncio.timeout(5):
        while not check():
            await asyncio.sleep(0.01)


def test_places_and_the_queue_are_counted_once_for_both_front_ends(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with _two_fronts(tmp_path) as (admission, one, two):
            release = asyncio.Event()

            async def hold(front: SharedAdmission) -> None:
                async with front.slot(10, "beta", 20) as ticket:
                    await release.wait()
                    ticket.used = 15

            holder = asyncio.create_task(hold(one))
            await _until(lambda: admission.running == 1)
            queued = asyncio.create_task(hold(two))
            await _until(lambda: admission.queued == 1)
            with pytest.raises(RateLimited, match="at capacity"):  # the other front end: the same one place
                async with two.slot(1, "beta"):
                    pass
            await two.refresh()
            assert two.stats() == {"running": 1, "queued": 1, "queued_tokens": 10}
            assert two.tenant_use("beta")["requests_in_progress"] == 2
            queued.cancel()  # its client left while queued: the coordinator's queue lets it go
            await _until(lambda: admission.queued == 0)
            release.set()
            await holder
            await _until(lambda: admission.running == 0 and not admission.tenant_requests)

    asyncio.run(scenario())


def test_a_tenants_windows_are_shared_and_settled_with_the_tokens_used(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with _two_fronts(tmp_path) as (admission, one, two):
            async with one.slot(5, "alpha", 60) as ticket:
                ticket.used = 7
            await one.rate_headers("alpha")  # after its Leave on the same connection: the spend is settled
            headers = await two.rate_headers("alpha")  # the other front end sees it
            assert set(headers) == set(admission.rates.headers("alpha"))
            assert (headers["x-ratelimit-remaining-requests"], headers["x-ratelimit-remaining-tokens"]) == ("1", "93")
            async with two.slot(5, "alpha", 60):
                pass
            with pytest.raises(TenantRateLimited, match="requests per minute") as refused:
                async with one.slot(5, "alpha", 10):
                    pass
            assert refused.value.type == "requests" and refused.value.retry_after > 0
            assert await one.rate_headers("beta") == {}  # no window: no headers (and no round trip)
            await one.refresh()
            assert one.tenant_use("alpha")["requests_last_minute"] == 2
            assert one.tenant_use("nobody") == admission.tenant_use("nobody")

    asyncio.run(scenario())
