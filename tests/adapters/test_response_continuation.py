"""A stored response's KV continued by the engine (``Plan.response_kv``), on the real tiny model in both paths
(strict: one sequence per forward pass; balanced: the continuous batch): the continuation starts from the kept
sequence, gives the greedy answer a full prefill of the same ids gives, and a chain shares its segments."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from adapters.mlx_lm.blas import load_optimised_blas

load_optimised_blas()  # before mlx is imported below

from adapters.base import Finished, Plan, ResponseKVUse, SamplingParams, Started, TokenEvent  # noqa: E402
from adapters.mlx_lm.engine import MlxEngine  # noqa: E402
from adapters.mlx_lm.models import ModelSpec  # noqa: E402
from tests.greedy import Greedy, assert_same_greedy, greedy_of  # noqa: E402


@pytest.fixture(scope="module")
def engine(models_dir: Path) -> Iterator[MlxEngine]:
    eng = MlxEngine(
        [
            ModelSpec("strict", "tiny", models_dir=str(models_dir), isolation_mode="strict"),
            ModelSpec("balanced", "tiny", models_dir=str(models_dir), isolation_mode="balanced"),
        ]
    )
    eng.start()
    import time

    while any(m["state"] == "loading" for m in eng.health()["models"].values()):
        time.sleep(0.05)
    yield eng
    eng.stop()


def ask(
    engine: MlxEngine, model: str, tokens: tuple[int, ...], use: ResponseKVUse | None, tenant: str = "default"
) -> tuple[Started, list[int], Greedy, Finished]:
    params = SamplingParams(max_tokens=10, temperature=0, logprobs=True, top_logprobs=5)
    plan = Plan("r", model, tenant, tokens, params, response_kv=use)

    async def go() -> list[object]:
        return [e async for e in engine.submit(plan)]

    events = asyncio.run(go())
    started = next(e for e in events if isinstance(e, Started))
    ids = [t for e in events if isinstance(e, TokenEvent) and e.choice == 0 for t in e.token_ids]
    greedy = greedy_of(events)
    finished = events[-1]
    assert isinstance(finished, Finished), events[-1]
    return started, ids, greedy, finished


@pytest.mark.parametrize("model", ["strict", "balanced"])
def test_a_continuation_starts_from_the_kept_sequence(engine: MlxEngine, model: str) -> None:
    first = tuple(range(300, 700))
    _, out, _, _ = ask(engine, model, first, ResponseKVUse(keep_as=f"a-{model}"))
    sequence = first + tuple(out)
    prompt = sequence + tuple(range(40, 60))  # the stored ids, then the new turn
    reuse = len(sequence)

    started, _, kv_greedy, done = ask(engine, model, prompt, ResponseKVUse(parent=f"a-{model}", reuse=reuse))
    # Positions are kept for the tokens fed back: the last one written is, where the batch's pipelined step
    # already ran it; either way they are the sequence's first positions.
    assert started.prefix_hit and started.cached_tokens in (len(sequence) - 1, len(sequence))
    assert done.cached_tokens == started.cached_tokens
    _, _, full_greedy, full = ask(engine, model, prompt, None)
    assert full.cached_tokens == 0
    assert_same_greedy(full_greedy, kv_greedy)

    # Another tenant's request naming the same id finds nothing: it prefills in full, to the same answer.
    other, _, other_greedy, _ = ask(engine, model, prompt, ResponseKVUse(parent=f"a-{model}", reuse=reuse), "beta")
    assert not other.prefix_hit and other.cached_tokens == 0
    assert_same_greedy(full_greedy, other_greedy)


def test_a_chain_shares_its_segments_and_forgetting_frees_them(engine: MlxEngine) -> None:
    before = engine.snapshot().response_kv.bytes
    tokens: tuple[int, ...] = tuple(range(100, 300))
    parent = None
    for turn in range(5):
        rid = f"chain-{turn}"
        use = ResponseKVUse(parent=parent, reuse=len(tokens) - 20 if parent else 0, keep_as=rid)
        _, out, _, _ = ask(engine, "balanced", tokens, use)
        tokens = tokens + tuple(out) + tuple(range(1000 + turn * 20, 1020 + turn * 20))
        parent = rid
    engine.call(lambda: None).result()  # a turn has passed: the snapshot is current
    usage = engine.snapshot().response_kv
    held = usage.bytes - before
    longest = len(tokens) - 20  # the last prompt and its output
    _, out1, _, _ = ask(engine, "balanced", tuple(range(100, 300)), ResponseKVUse(keep_as="single"))
    engine.call(lambda: None).result()
    single = engine.snapshot().response_kv.bytes - usage.bytes
    per_position = single / (200 + len(out1))
    assert longest - 1 <= held / per_position <= longest  # one copy of the chain, not five
    for turn in range(5):
        engine.forget_response("default", f"chain-{turn}")
    engine.forget_response("default", "single")
    engine.call(lambda: None).result()
    assert engine.snapshot().response_kv.bytes == before
