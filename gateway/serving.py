"""Running a planned request on the engine: its events, merged over prompts, as a response or chunks."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

import msgspec

from adapters.base import Engine, EngineEvent, Failed, Plan
from gateway.encoding import ChunkEncoder, ResponseEncoder
from gateway.errors import ServerError
from gateway.planning import PlannedRequest
from gateway.schemas.openai import ChatCompletion, CompletionResponse

__all__ = ["collect", "stream_chunks"]

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
        try:
            async for event in engine.submit(plan):
                await merged.put((i, event))
        finally:
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


def _failure(event: Failed, planned: PlannedRequest) -> ServerError:
    logger.error("[%s] engine failure: %s", planned.id, event.error)
    return ServerError(f"The engine failed on this request: {event.error}")


async def collect(engine: Engine, planned: PlannedRequest, fingerprint: str) -> ChatCompletion | CompletionResponse:
    encoder = ResponseEncoder(planned, fingerprint)
    async for index, event in _events(engine, planned.plans):
        if isinstance(event, Failed):
            raise _failure(event, planned)
        encoder.feed(index, event)
    return encoder.build()


async def stream_chunks(engine: Engine, planned: PlannedRequest, fingerprint: str) -> AsyncIterator[msgspec.Struct]:
    encoder = ChunkEncoder(planned, fingerprint)
    for chunk in encoder.opening():
        yield chunk
    events = _events(engine, planned.plans)
    try:
        async for index, event in events:
            if isinstance(event, Failed):
                raise _failure(event, planned)
            for chunk in encoder.feed(index, event):
                yield chunk
    finally:
        await events.aclose()  # type: ignore[attr-defined]
    if planned.include_usage:
        yield encoder.usage()
