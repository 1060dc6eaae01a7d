"""Backpressure: at most ``max_running`` requests in the engine, a bounded queue behind them (by count
and by prompt tokens), and a queue timeout. Past any limit a request gets 429 with ``Retry-After``,
never a hang or a 5xx."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from gateway.errors import APIError

__all__ = ["Admission", "RateLimited"]


class RateLimited(APIError):
    status_code = 429
    type = "rate_limit_error"
    code = "rate_limit_exceeded"
    retryable = True

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after

    def headers(self) -> dict[str, str]:
        return {"retry-after": str(max(1, round(self.retry_after)))}


class Admission:
    def __init__(self, max_running: int, max_queued: int, max_queued_tokens: int, queue_timeout: float) -> None:
        self.max_running = max_running
        self.max_queued = max_queued
        self.max_queued_tokens = max_queued_tokens
        self.queue_timeout = queue_timeout
        self.running = 0
        self.queued = 0
        self.queued_tokens = 0
        self._freed = asyncio.Condition()

    @contextlib.asynccontextmanager
    async def slot(self, tokens: int) -> AsyncIterator[None]:
        """Hold one running place for the body of the ``async with``."""
        await self._enter(tokens)
        try:
            yield
        finally:
            async with self._freed:
                self.running -= 1
                self._freed.notify()

    async def _enter(self, tokens: int) -> None:
        async with self._freed:
            if self.running < self.max_running and self.queued == 0:
                self.running += 1
                return
            if self.queued >= self.max_queued or self.queued_tokens + tokens > self.max_queued_tokens:
                raise RateLimited(
                    f"The server is at capacity ({self.running} running, {self.queued} queued); retry shortly",
                    retry_after=1,
                )
            self.queued += 1
            self.queued_tokens += tokens
            try:
                await asyncio.wait_for(
                    self._freed.wait_for(lambda: self.running < self.max_running), timeout=self.queue_timeout
                )
            except TimeoutError:
                raise RateLimited(
                    f"Waited {self.queue_timeout:g}s in the queue without a free place; retry shortly",
                    retry_after=self.queue_timeout,
                ) from None
            finally:
                self.queued -= 1
                self.queued_tokens -= tokens
            self.running += 1

    def stats(self) -> dict[str, int]:
        return {"running": self.running, "queued": self.queued, "queued_tokens": self.queued_tokens}
