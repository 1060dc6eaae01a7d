"""Serving a planned request on the engine, the one way every generating route does it (chat, completions,
Responses, the seed API's aliases): :class:`Serving` holds its admission slot and its run from submission to
the last event; :class:`Running` merges its prompts' events; :func:`collect` and :func:`stream_chunks` encode
them as one response or as chunks."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from functools import partial
from types import TracebackType

import msgspec
from litestar.datastructures import State

from adapters.base import Engine, EngineEvent, Failed, Plan, Started, TokenEvent
from gateway.encoding import ChunkEncoder, ResponseEncoder
from gateway.errors import APIError, EngineFailed, failure
from gateway.metrics import GenerationObserver, Metrics
from gateway.planning import PlannedRequest
from gateway.request_context import arrival
from gateway.request_context import planned as planned_at
from gateway.schemas.openai import ChatCompletion, CompletionResponse
from gateway.tenancy.admission import Places

__all__ = ["Running", "Serving", "collect", "count_planned_misses", "prefix_header", "serve", "stream_chunks"]

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
    """The whole answer, once every prompt's events have come."""
    encoder = ResponseEncoder(running.planned, fingerprint)
    async for index, event in running:
        encoder.feed(index, event)  # type: ignore[arg-type]
    return encoder.build()


async def stream_chunks(running: Running, fingerprint: str) -> AsyncIterator[msgspec.Struct]:
    """The answer as chunks, as the events come (the usage chunk last, when the request asked for it)."""
    planned = running.planned
    encoder = ChunkEncoder(planned, fingerprint)
    for chunk in encoder.opening():
        yield chunk
    async for index, event in running:
        for chunk in encoder.feed(index, event):  # type: ignore[arg-type]
            yield chunk
    if planned.include_usage:
        yield encoder.usage()


def _prompt_tokens(planned: PlannedRequest) -> int:
    return sum(len(p.prompt_tokens) for p in planned.plans)


def _most_tokens(planned: PlannedRequest) -> int:
    """Prompt and completion tokens the request may use at most (what its tenant's window reserves)."""
    return sum(len(p.prompt_tokens) + p.sampling.max_tokens * p.sampling.n for p in planned.plans)


class Serving:
    """One planned request's life on the engine, as an async context manager.

    Entering takes an admission slot (a 429 is raised there, before any byte is sent), counts the prompts
    planned without the cache they named, and submits the plans (:attr:`running`). Leaving closes the engine's
    events (which cancels whatever still runs), settles the tenant's tokens on what the run used and gives the
    slot back, however the body ends: an answer, an error, or a client that left (a cancellation).

    A streamed answer outlives the handler that returns it: :meth:`chunks` hands the run over to the stream,
    which leaves it when its chunks end, fail or are cancelled; :meth:`close` (the SSE response's ``on_close``)
    leaves it however the response ends, also when its body never started. Leaving twice does nothing.
    """

    def __init__(
        self,
        engine: Engine,
        admission: Places,
        planned: PlannedRequest,
        observer: Callable[[], GenerationObserver] | None = None,
    ) -> None:
        """``observer`` makes the run's metrics observer; it is called once the request holds its place (the
        observer takes that moment as the end of the request's time in the queue)."""
        self.planned = planned
        self._engine = engine
        self._admission = admission
        self._observer = observer
        # Unwound last-in first-out: the run's events closed, its tokens settled, then the slot given back.
        self._stack = contextlib.AsyncExitStack()
        self._handed_over = False
        self._running: Running | None = None

    @property
    def running(self) -> Running:
        """The submitted request's events (once entered)."""
        assert self._running is not None, "Serving is used as `async with`"
        return self._running

    async def __aenter__(self) -> Serving:
        planned = self.planned
        slot = self._admission.slot(_prompt_tokens(planned), planned.plans[0].tenant, _most_tokens(planned))
        ticket = await self._stack.enter_async_context(slot)
        try:
            count_planned_misses(planned, self._engine)
            running = Running(self._engine, planned, self._observer() if self._observer else None)

            def settle() -> None:
                ticket.used = running.used_tokens

            self._stack.callback(settle)
            self._stack.push_async_callback(running.aclose)
            self._running = running
        except BaseException:
            await self._stack.aclose()
            raise
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._handed_over and exc is None:
            return  # the stream leaves it
        await self._stack.__aexit__(exc_type, exc, tb)

    async def close(self) -> None:
        """Leave the run now (idempotent)."""
        await self._stack.aclose()

    async def collect(self, fingerprint: str) -> ChatCompletion | CompletionResponse:
        """The whole answer (:func:`collect`)."""
        return await collect(self.running, fingerprint)

    def chunks(self, fingerprint: str) -> AsyncIterator[msgspec.Struct]:
        """The answer's chunks (:func:`stream_chunks`); the run is left as soon as they end (before whatever the
        caller sends after them), fail, or are cancelled, rather than when the ``async with`` ends."""
        self._handed_over = True
        return self._leaving(stream_chunks(self.running, fingerprint))

    async def _leaving(self, chunks: AsyncIterator[msgspec.Struct]) -> AsyncIterator[msgspec.Struct]:
        try:
            async for chunk in chunks:
                yield chunk
        finally:
            await self.close()


def serve(state: State, planned: PlannedRequest) -> Serving:
    """:class:`Serving` with the app's engine, admission and metrics (its observer times the request's phases)."""
    metrics: Metrics = state.metrics
    arrived, planned_by = arrival(), planned_at()
    observer = partial(metrics.observer, planned.model, planned.plans[0].tenant, arrived, planned_by)
    return Serving(state.engine, state.admission, planned, observer)


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
