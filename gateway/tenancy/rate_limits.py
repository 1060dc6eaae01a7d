"""Per-tenant rates: requests and tokens (prompt + completion) per minute, as sliding 60-second windows.

A request reserves its prompt plus its ``max_tokens`` (every choice) when admitted, and settles to the
tokens it really used when it ends, so a window holds what was actually spent once requests finish. The
``x-ratelimit-*`` headers report a tenant's windows as OpenAI's do: limit, remaining, and the time until
the window is empty again (``reset``, written ``1m2s``, ``3s``, ``20ms``).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from litestar.types import ASGIApp, Message, Receive, Scope, Send

from gateway.config import TenantLimits
from gateway.errors import TenantRateLimited

__all__ = ["RateLimitHeaders", "Rates", "Reservation", "Window", "duration", "set_tenant"]

WINDOW_SECONDS = 60.0


@dataclass
class _Entry:
    at: float
    amount: int


@dataclass
class Window:
    """What was spent in the last minute, entry by entry (oldest first)."""

    entries: deque[_Entry] = field(default_factory=deque)

    def _expire(self, now: float) -> None:
        while self.entries and self.entries[0].at <= now - WINDOW_SECONDS:
            self.entries.popleft()

    def used(self, now: float) -> int:
        self._expire(now)
        return sum(e.amount for e in self.entries)

    def wait(self, limit: int, amount: int, now: float) -> float:
        """Seconds until ``amount`` more fits under ``limit`` (0: now; inf: never, it alone is larger)."""
        if amount > limit:
            return float("inf")
        over = self.used(now) + amount - limit
        for entry in self.entries:
            if over <= 0:
                break
            over -= entry.amount
            if over <= 0:
                return entry.at + WINDOW_SECONDS - now
        return 0.0

    def add(self, amount: int, now: float) -> _Entry:
        entry = _Entry(now, amount)
        self.entries.append(entry)
        return entry

    def reset(self, now: float) -> float:
        self._expire(now)
        return max(0.0, self.entries[-1].at + WINDOW_SECONDS - now) if self.entries else 0.0


@dataclass
class Reservation:
    """One admitted request's share of its tenant's windows; :meth:`Rates.settle` corrects it."""

    tenant: str
    request: _Entry
    tokens: _Entry


def duration(seconds: float) -> str:
    """OpenAI's way of writing a reset time: ``6m0s``, ``1s``, ``20ms``."""
    if seconds < 1:
        return f"{round(seconds * 1000)}ms"
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes}m{rest}s" if minutes else f"{rest}s"


class Rates:
    """Every tenant's two windows, from the limits ``limits_of`` gives (None: no window, no headers)."""

    def __init__(self, limits_of: Callable[[str], TenantLimits], clock: Callable[[], float] = time.monotonic) -> None:
        self.limits_of = limits_of
        self.clock = clock
        self._requests: dict[str, Window] = {}
        self._tokens: dict[str, Window] = {}

    def reserve(self, tenant: str, tokens: int) -> Reservation:
        """Count one request of ``tokens`` (prompt + max_tokens) against the tenant's windows.

        Raises:
            TenantRateLimited: it does not fit; ``Retry-After`` says when it would.
        """
        limits, now = self.limits_of(tenant), self.clock()
        requests = self._requests.setdefault(tenant, Window())
        spent = self._tokens.setdefault(tenant, Window())
        if limits.requests_per_minute is not None:
            wait = requests.wait(limits.requests_per_minute, 1, now)
            if wait > 0:
                raise TenantRateLimited(
                    f"Rate limit reached for tenant '{tenant}' on requests per minute: limit "
                    f"{limits.requests_per_minute}, used {requests.used(now)}",
                    "requests",
                    wait,
                )
        if limits.tokens_per_minute is not None:
            wait = spent.wait(limits.tokens_per_minute, tokens, now)
            if wait == float("inf"):
                raise TenantRateLimited(
                    f"This request may use {tokens} tokens (prompt + max_tokens), more than tenant '{tenant}' may "
                    f"use in a minute ({limits.tokens_per_minute}); lower max_tokens",
                    "tokens",
                    WINDOW_SECONDS,
                )
            if wait > 0:
                raise TenantRateLimited(
                    f"Rate limit reached for tenant '{tenant}' on tokens per minute: limit "
                    f"{limits.tokens_per_minute}, used {spent.used(now)}, requested {tokens}",
                    "tokens",
                    wait,
                )
        return Reservation(tenant, requests.add(1, now), spent.add(tokens, now))

    def settle(self, reservation: Reservation, used: int) -> None:
        """The request ended having used ``used`` tokens (prompt + completion)."""
        reservation.tokens.amount = used

    def cancel(self, reservation: Reservation) -> None:
        """The request was refused after all (the server's own limits): it counts for nothing."""
        reservation.request.amount = reservation.tokens.amount = 0

    def headers(self, tenant: str) -> dict[str, str]:
        """The ``x-ratelimit-*`` headers of ``tenant``'s limits (none for an unlimited window)."""
        limits, now = self.limits_of(tenant), self.clock()
        out: dict[str, str] = {}
        for kind, limit, window in (
            ("requests", limits.requests_per_minute, self._requests.get(tenant, Window())),
            ("tokens", limits.tokens_per_minute, self._tokens.get(tenant, Window())),
        ):
            if limit is None:
                continue
            out[f"x-ratelimit-limit-{kind}"] = str(limit)
            out[f"x-ratelimit-remaining-{kind}"] = str(max(0, limit - window.used(now)))
            out[f"x-ratelimit-reset-{kind}"] = duration(window.reset(now))
        return out

    def tenants(self) -> set[str]:
        """Every tenant with a window (spent something since it was first seen)."""
        return set(self._requests) | set(self._tokens)

    def usage(self, tenant: str) -> dict[str, int]:
        now = self.clock()
        return {
            "requests_last_minute": self._requests.get(tenant, Window()).used(now),
            "tokens_last_minute": self._tokens.get(tenant, Window()).used(now),
        }


_TENANT = "mlx_gateway_tenant"


def set_tenant(scope: Scope, tenant: str) -> None:
    """Mark the request as ``tenant``'s (authenticated): its response will carry the tenant's headers."""
    scope.setdefault("state", {})[_TENANT] = tenant  # type: ignore[typeddict-item]


class RateLimitHeaders:
    """ASGI middleware around the app: every response of an authenticated request (errors and streams too)
    gets its tenant's ``x-ratelimit-*`` headers, as they stand when the response starts (``headers_of``: from
    this process's :class:`Rates`, or from the coordinator's with several API servers)."""

    def __init__(self, app: ASGIApp, headers_of: Callable[[str], Awaitable[dict[str, str]]]) -> None:
        self.app = app
        self.headers_of = headers_of

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_limits(message: Message) -> None:
            tenant = scope.get("state", {}).get(_TENANT)
            if message["type"] == "http.response.start" and tenant is not None:
                extra = [(k.encode(), v.encode()) for k, v in (await self.headers_of(tenant)).items()]
                message = {**message, "headers": [*message.get("headers", ()), *extra]}  # type: ignore[typeddict-item]
            await send(message)

        await self.app(scope, receive, send_with_limits)
