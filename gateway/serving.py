"""Running a planned request on the engine: its events, merged over prompts, as a response or chunks."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

import msgspec

from adapters.base import Engine, EngineEvent, Failed, Plan, Started, TokenEvent
from gateway.encoding import ChunkEncoder, ResponseEncoder
from gateway.errors import APIError, EngineFailed, failure
from gateway.metrics import GenerationObserver
from gateway.planning import PlannedRequest
from gateway.schemas.openai import ChatCompletion, CompletionResponse

__all__ = ["Running", "collect", "count_planned_misses", "prefix_header", "stream_chunks"]

logger = logging.getLogger(__name__)


async def _events(engine: Engine, plans: tuple[Plan, ...]) -> AsyncIterator[tuple[int, EngineEvent]]:
    """Each plan's events tagged with its index; several plans run concurrently and interleave."""
    if len(plans) == 1:
        stream = engine.submit(plans[0])
        try:
            async for event in stream:
                yield 0, event
        finally:
            await stream.aclose()  # type: ignore[attr-defined]
        return
    merged: asyncio.Queue[tuple[int, EngineEvent] | None] = asyncio.Queue()

    async def pump(i: int, plan: Plan) -> None:
        stream = engine.submit(plan)
        try:
            async for event in stream:
                await merged.put((i, event))
        finally:
            await stream.aclose()  # type: ignore[attr-defined]
            await merged.put(None)

    tasks = [asyncio.create_task(pump(i, p)) for i, p in enumerate(plans)]
    try:
        remaining = len(tasks)
        while remaining:
            item = await merged.get()
            if item is None:
                remaining -= 1
            else:
                yield item
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task


def _failure(event: Failed, planned: PlannedRequest) -> APIError:
    logger.error("[%s] engine failure: %s", planned.id, event.error)
    return failure(event.error, EngineFailed)


class Running:
    """A submitted request's events; ``started()`` waits until the engine admitted every prompt. The
    observer (metrics) sees each event as it arrives, also those held while waiting."""

    def __init__(self, engine: Engine, planned: PlannedRequest, observer: GenerationObserver | None = None) -> None:
        self.planned = planned
        self._events = _events(engine, planned.plans)
        self._observer = observer
        self._held: list[tuple[int, EngineEvent]] = []
        self.started: list[Started] = []
        # Completion tokens seen so far (a tenant's tokens per minute settle on them).
        self.completion_tokens = 0
        # The ids the first prompt's first choice wrote (a stored response keeps them).
        self.output_ids: list[int] = []

    @property
    def used_tokens(self) -> int:
        """Prompt and completion tokens this request has cost so far."""
        return sum(len(p.prompt_tokens) for p in self.planned.plans) + self.completion_tokens

    def _observe(self, index: int, event: EngineEvent) -> None:
        if self._observer is not None:
            self._observer.event(index, event)
        if isinstance(event, TokenEvent):
            self.completion_tokens += len(event.token_ids)
            if index == 0 and event.choice == 0:
                self.output_ids.extend(event.token_ids)

    async def wait_started(self) -> list[Started]:
        while len(self.started) < len(self.planned.plans):
            try:
                index, event = await anext(self._events)
            except StopAsyncIteration:
                break
            self._observe(index, event)
            if isinstance(event, Failed):
                await self.aclose()
                raise _failure(event, self.planned)
            if isinstance(event, Started):
                self.started.append(event)
            else:
                self._held.append((index, event))
        return self.started

    async def __aiter__(self) -> AsyncIterator[tuple[int, EngineEvent]]:
        held, self._held = self._held, []
        for item in held:
            yield item
        async for index, event in self._events:
            self._observe(index, event)
            if isinstance(event, Failed):
                raise _failure(event, self.planned)
            if isinstance(event, Started):
                self.started.append(event)
                continue
            yield index, event

    async def aclose(self) -> None:
        await self._events.aclose()  # type: ignore[attr-defined]


async def collect(running: Running, fingerprint: str) -> ChatCompletion | CompletionResponse:
    encoder = ResponseEncoder(running.planned, fingerprint)
    try:
        async for index, event in running:
            encoder.feed(index, event)  # type: ignore[arg-type]
    finally:
        await running.aclose()
    return encoder.build()


async def stream_chunks(running: Running, fingerprint: str) -> AsyncIterator[msgspec.Struct]:
    planned = running.planned
    encoder = ChunkEncoder(planned, fingerprint)
    for chunk in encoder.opening():
        yield chunk
    try:
        async for index, event in running:
            for chunk in encoder.feed(index, event):  # type: ignore[arg-type]
                yield chunk
    finally:
        await running.aclose()
    if planned.include_usage:
        yield encoder.usage()


def count_planned_misses(planned: PlannedRequest, engine: Engine) -> None:
    """Prompts that named a cache and were planned without it (a mismatch recomputed, a stale cache): the
    engine never sees the cache, so its miss counter (``/health``, ``/metrics``) is told here."""
    if planned.prefix_name is None:
        return
    for plan in planned.plans:
        if plan.prefix is None:
            engine.record_miss(plan.model, plan.tenant)


def prefix_header(planned: PlannedRequest, started: list[Started]) -> str | None:
    """The ``x-prefix-cache`` header: name, how the request met the cache (``form=resent`` or
    ``form=prepended``), hit, cached tokens, load time (or why it missed)."""
    if planned.prefix_name is None:
        return None
    parts = [f"name={planned.prefix_name}"]
    if planned.prefix_form is not None:
        parts.append(f"form={planned.prefix_form}")
    first = started[0] if started else None
    if first is not None and first.prefix_hit:
        parts += [
            "hit=true",
            f"cached_tokens={first.cached_tokens}",
            f"load_ms={first.prefix_load_ms:.2f}",
            f"resident={'true' if first.prefix_resident else 'false'}",
        ]
    else:
        reason = planned.prefix_miss_reason or (first.prefix_miss_reason if first else None) or "unknown"
        parts += ["hit=false", "cached_tokens=0", f"reason={reason}"]
    return "; ".join(parts)
