"""``Serving``, the one lifecycle of a generating request, with a FAKE engine (this file only): the slot is taken
on entry and given back, with the tenant's tokens settled, however the request ends (an answer, a failure, a
stream run to its end or closed early, a client that left while the request waited)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any, cast

import pytest

from adapters.base import (
    ChoiceFinished,
    Engine,
    EngineError,
    EngineEvent,
    Failed,
    Finished,
    Plan,
    SamplingParams,
    Started,
    TokenEvent,
)
from gateway.config import TenantLimits
from gateway.errors import EngineFailed, RateLimited
from gateway.planning import PlannedRequest
from gateway.serving import Serving
from gateway.tenancy.admission import Admission


class FakeEngine:
    """Scripted events per prompt; counts misses and how many event streams are open."""

    def __init__(self, events: list[EngineEvent], hold: asyncio.Event | None = None) -> None:
        self.events = events
        self.hold = hold
        self.open = 0
        self.misses: list[tuple[str, str]] = []

    async def submit(self, plan: Plan) -> AsyncIterator[EngineEvent]:
        self.open += 1
        try:
            for event in self.events:
                yield event
                if self.hold is not None:
                    await self.hold.wait()
        finally:
            self.open -= 1

    def record_miss(self, model: str, tenant: str) -> None:
        self.misses.append((model, tenant))


TOKENS: list[EngineEvent] = [
    Started(cached_tokens=0),
    TokenEvent(choice=0, text="a", token_ids=(1,)),
    TokenEvent(choice=0, text="b", token_ids=(2,)),
    ChoiceFinished(choice=0, reason="length"),
    Finished(prompt_tokens=3, completion_tokens=2),
]


def _planned(*, stream: bool = False, prefix_name: str | None = None) -> PlannedRequest:
    """A one-prompt completion; ``prefix_name``: it named that cache and was planned without it (a miss)."""
    plan = Plan(
        request_id="r",
        model="fake",
        tenant="t",
        prompt_tokens=(1, 2, 3),
        sampling=SamplingParams(max_tokens=10),
    )
    return PlannedRequest(
        kind="completion",
        id="cmpl-1",
        created=0,
        model="fake",
        plans=(plan,),
        n=1,
        stream=stream,
        include_usage=False,
        logprobs=False,
        top_logprobs=0,
        prefix_name=prefix_name,
    )


def _admission(max_running: int = 1) -> Admission:
    return Admission(max_running, 4, 100, 10, lambda _: TenantLimits(tokens_per_minute=1000))


def _serving(engine: FakeEngine, admission: Admission, planned: PlannedRequest) -> Serving:
    return Serving(cast(Engine, engine), admission, planned)


def _free(admission: Admission, engine: FakeEngine) -> None:
    assert admission.stats() == {"running": 0, "queued": 0, "queued_tokens": 0}
    assert admission.tenant_use("t")["requests_in_progress"] == 0
    assert engine.open == 0


def test_a_whole_answer_holds_the_slot_while_it_runs_and_settles_the_tokens_it_used() -> None:
    async def scenario() -> None:
        engine, admission = FakeEngine(TOKENS), _admission()
        async with _serving(engine, admission, _planned()) as run:
            assert admission.stats()["running"] == 1
            assert admission.tenant_use("t")["tokens_last_minute"] == 13  # prompt + max_tokens reserved
            body = await run.collect("fp")
        assert cast(Any, body).choices[0].text == "ab"
        _free(admission, engine)
        assert admission.tenant_use("t")["tokens_last_minute"] == 5  # 3 prompt + 2 completion
        assert engine.misses == []

    asyncio.run(scenario())


def test_a_stream_leaves_the_run_when_its_chunks_end_not_when_the_handler_returns() -> None:
    async def scenario() -> None:
        engine, admission = FakeEngine(TOKENS), _admission()
        async with _serving(engine, admission, _planned(stream=True)) as run:
            chunks = run.chunks("fp")
        assert admission.stats()["running"] == 1  # handed over to the stream
        texts = [cast(Any, c).choices[0].text async for c in chunks]
        assert texts == ["a", "b", ""]
        _free(admission, engine)
        assert admission.tenant_use("t")["tokens_last_minute"] == 5
        await run.close()  # the response's on_close after the stream: nothing left to do
        _free(admission, engine)

    asyncio.run(scenario())


def test_a_stream_closed_early_cancels_the_run_and_gives_the_slot_back() -> None:
    """The client left mid-stream: sse-starlette cancels the stream, then ``on_close`` runs."""

    async def scenario() -> None:
        hold = asyncio.Event()
        engine, admission = FakeEngine(TOKENS, hold), _admission()
        async with _serving(engine, admission, _planned(stream=True)) as run:
            chunks = run.chunks("fp")

        async def read() -> None:
            async for _ in chunks:
                pass

        reader = asyncio.create_task(read())
        await asyncio.sleep(0.01)
        assert engine.open == 1
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reader
        await run.close()
        _free(admission, engine)
        assert admission.tenant_use("t")["tokens_last_minute"] == 3  # settled on its prompt: no token came

    asyncio.run(scenario())


def test_a_failure_while_waiting_for_the_engine_leaves_the_run() -> None:
    async def scenario() -> None:
        engine, admission = FakeEngine([Failed(EngineError("boom"))]), _admission()
        with pytest.raises(EngineFailed, match="The engine failed on this request: boom"):
            async with _serving(engine, admission, _planned(prefix_name="c")) as run:
                await run.running.wait_started()
        _free(admission, engine)
        assert engine.misses == [("fake", "t")]  # named a cache, planned without it

    asyncio.run(scenario())


def test_a_request_refused_a_place_holds_nothing() -> None:
    async def scenario() -> None:
        hold = asyncio.Event()
        engine, admission = FakeEngine(TOKENS, hold), Admission(1, 0, 100, 10)
        async with _serving(engine, admission, _planned()) as first:
            with pytest.raises(RateLimited):
                async with _serving(engine, admission, _planned()):
                    pass
            assert engine.open == 0  # the refused one never submitted
            hold.set()
            await first.collect("fp")
        _free(admission, engine)

    asyncio.run(scenario())


def test_the_metrics_observer_is_made_once_the_request_holds_its_place() -> None:
    """The observer takes the moment it is made as the end of the request's time in the queue."""

    async def scenario() -> None:
        engine, admission = FakeEngine(TOKENS), _admission()
        running_when_made: list[int] = []

        def observer() -> Any:
            running_when_made.append(admission.stats()["running"])
            return None

        async with Serving(cast(Engine, engine), admission, _planned(), observer) as run:
            await run.collect("fp")
        assert running_when_made == [1]

    asyncio.run(scenario())
