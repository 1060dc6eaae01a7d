"""Backpressure: at most ``max_running`` requests in the engine, a bounded queue behind them (by count
and by prompt tokens), and a queue timeout. Past any limit a request gets 429 with ``Retry-After``,
never a hang or a 5xx.

Each tenant has its own limits beside the server's (``gateway.config.TenantLimits``): requests and prompt
tokens in the server at once, and requests and tokens per minute (``gateway.tenancy.rate_limits``). A tenant past
its own limits gets 429 while other tenants are still admitted.

The queue is fair between tenants: a freed place goes to the waiting request whose tenant holds the fewest
running places, then to the tenant served longest ago, then first come first served; so one tenant's burst
queued ahead of another's request does not delay it by more than the places already running.

Owned by the event loop's thread: every method runs there, and none awaits while it changes state. With
several API servers (``--api-servers``) one :class:`Admission` runs in the supervising process
(``gateway.tenancy.coordinator``) and each front end reaches it through the same :class:`Places` interface.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Protocol

from gateway.config import Config, TenantLimits
from gateway.errors import RateLimited, TenantRateLimited
from gateway.tenancy.rate_limits import Rates, Reservation

__all__ = ["Admission", "Places", "Ticket"]


@dataclass(eq=False)
class _Waiter:
    """A queued request; its future is set when a place is given to it."""

    tenant: str
    order: int
    granted: asyncio.Future[None] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


@dataclass
class Ticket:
    """An admitted request; ``used`` (prompt + completion tokens) settles its tenant's token window."""

    reservation: Reservation | None
    used: int = 0


class Places(Protocol):
    """What the HTTP side asks of admission: this process's :class:`Admission`, or one shared by every front end
    (``gateway.tenancy.coordinator.SharedAdmission``)."""

    def slot(
        self, tokens: int, tenant: str | None = None, reserve: int = 0
    ) -> contextlib.AbstractAsyncContextManager[Ticket]:
        """Hold one running place for the body of the ``async with`` (see :meth:`Admission.slot`)."""
        ...

    async def refresh(self) -> None:
        """Bring what :meth:`stats` and :meth:`tenant_use` say up to date."""
        ...

    def stats(self) -> dict[str, int]:
        """Running and queued requests, and the queued prompt tokens."""
        ...

    def tenant_use(self, tenant: str) -> dict[str, int]:
        """What ``tenant`` holds now (see :meth:`Admission.tenant_use`)."""
        ...

    async def rate_headers(self, tenant: str) -> dict[str, str]:
        """The ``x-ratelimit-*`` headers of ``tenant``'s windows as they stand now."""
        ...


class Admission:
    def __init__(
        self,
        max_running: int,
        max_queued: int,
        max_queued_tokens: int,
        queue_timeout: float,
        limits_of: Callable[[str], TenantLimits] = lambda _: TenantLimits(),
    ) -> None:
        self.max_running = max_running
        self.max_queued = max_queued
        self.max_queued_tokens = max_queued_tokens
        self.queue_timeout = queue_timeout
        self.running = 0
        self.queued = 0
        self.queued_tokens = 0
        self._waiters: list[_Waiter] = []
        self._orders = itertools.count()
        # Per tenant (None's requests count as ""): running places held, and when it was last given one.
        self._holding: Counter[str] = Counter()
        self._served: dict[str, int] = {}
        self.limits_of = limits_of
        self.rates = Rates(limits_of)
        # Per tenant: requests in the server (running or queued) and their prompt tokens.
        self.tenant_requests: Counter[str] = Counter()
        self.tenant_tokens: Counter[str] = Counter()

    @classmethod
    def of(cls, config: Config) -> Admission:
        """The server's admission, as ``config`` sets its limits."""
        return cls(
            config.max_running, config.max_queued, config.max_queued_tokens, config.queue_timeout_seconds, config.limits
        )

    @contextlib.asynccontextmanager
    async def slot(self, tokens: int, tenant: str | None = None, reserve: int = 0) -> AsyncIterator[Ticket]:
        """Hold one running place for the body of the ``async with``.

        Args:
            tokens: the request's prompt tokens.
            tenant: whose request it is (None: only the server's limits apply).
            reserve: the tokens it may use at most (prompt + max_tokens of every choice), counted against
                the tenant's tokens per minute until the ticket's ``used`` settles it.
        """
        ticket = Ticket(None)
        if tenant is not None:
            self._enter_tenant(tenant, tokens)
        try:
            if tenant is not None:
                ticket.reservation = self.rates.reserve(tenant, reserve)
            await self._enter(tokens, tenant or "")
        except BaseException:
            if ticket.reservation is not None:
                self.rates.cancel(ticket.reservation)
            self._leave_tenant(tenant, tokens)
            raise
        try:
            yield ticket
        finally:
            if ticket.reservation is not None:
                self.rates.settle(ticket.reservation, ticket.used)
            self._leave_tenant(tenant, tokens)
            self._release(tenant or "")

    def _enter_tenant(self, tenant: str, tokens: int) -> None:
        limits = self.limits_of(tenant)
        requests, queued = self.tenant_requests[tenant], self.tenant_tokens[tenant]
        if limits.max_concurrent_requests is not None and requests >= limits.max_concurrent_requests:
            raise TenantRateLimited(
                f"Tenant '{tenant}' has {requests} requests in progress, its limit "
                f"({limits.max_concurrent_requests}); retry when one ends",
                "requests",
                retry_after=1,
            )
        if limits.max_queued_tokens is not None and queued + tokens > limits.max_queued_tokens:
            raise TenantRateLimited(
                f"Tenant '{tenant}' has {queued} prompt tokens in progress; {tokens} more would pass its limit "
                f"({limits.max_queued_tokens})",
                "tokens",
                retry_after=1,
            )
        self.tenant_requests[tenant] += 1
        self.tenant_tokens[tenant] += tokens

    def _leave_tenant(self, tenant: str | None, tokens: int) -> None:
        if tenant is None:
            return
        self.tenant_requests[tenant] -= 1
        self.tenant_tokens[tenant] -= tokens
        if self.tenant_requests[tenant] <= 0:
            del self.tenant_requests[tenant], self.tenant_tokens[tenant]

    async def _enter(self, tokens: int, tenant: str) -> None:
        if self.running < self.max_running and not self._waiters:
            self._take(tenant)
            return
        if self.queued >= self.max_queued or self.queued_tokens + tokens > self.max_queued_tokens:
            raise RateLimited(
                f"The server is at capacity ({self.running} running, {self.queued} queued); retry shortly",
                retry_after=1,
            )
        waiter = _Waiter(tenant, next(self._orders))
        self._waiters.append(waiter)
        self.queued += 1
        self.queued_tokens += tokens
        try:
            async with asyncio.timeout(self.queue_timeout):
                await asyncio.shield(waiter.granted)
        except TimeoutError:
            if waiter.granted.done():  # given a place as the time ran out: keep it
                return
            raise RateLimited(
                f"Waited {self.queue_timeout:g}s in the queue without a free place; retry shortly",
                retry_after=self.queue_timeout,
            ) from None
        except asyncio.CancelledError:
            if waiter.granted.done():  # its client left just as it was given a place: pass it on
                self._release(tenant)
            raise
        finally:
            if waiter in self._waiters:
                self._waiters.remove(waiter)
            self.queued -= 1
            self.queued_tokens -= tokens

    def _take(self, tenant: str) -> None:
        self.running += 1
        self._holding[tenant] += 1
        self._served[tenant] = next(self._orders)

    def _release(self, tenant: str) -> None:
        """A running place is free: give it (and any other free one) to the fairest waiter."""
        self.running -= 1
        self._holding[tenant] -= 1
        if self._holding[tenant] <= 0:
            del self._holding[tenant]
        while self._waiters and self.running < self.max_running:
            waiter = min(
                self._waiters, key=lambda w: (self._holding[w.tenant], self._served.get(w.tenant, -1), w.order)
            )
            self._waiters.remove(waiter)
            self._take(waiter.tenant)
            waiter.granted.set_result(None)

    async def refresh(self) -> None:
        """Nothing to fetch: this object is the count."""

    def stats(self) -> dict[str, int]:
        return {"running": self.running, "queued": self.queued, "queued_tokens": self.queued_tokens}

    async def rate_headers(self, tenant: str) -> dict[str, str]:
        return self.rates.headers(tenant)

    def tenant_use(self, tenant: str) -> dict[str, int]:
        """What ``tenant`` holds now: requests in progress, their prompt tokens, the last minute's spend."""
        return {
            "requests_in_progress": self.tenant_requests.get(tenant, 0),
            "queued_tokens": self.tenant_tokens.get(tenant, 0),
            **self.rates.usage(tenant),
        }
