"""Admission into the real Batcher on the real tiny model: it always makes progress.

``n`` above ``max_running`` joins in parts; a tenant below its fair share that waits for slots gets them by
preempting a tenant above its share, and the preempted sequences resume with the same greedy tokens; the
KV budget holds arrivals back until they fit, and the slots never outgrow it.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from adapters.mlx_lm.blas import load_optimised_blas

load_optimised_blas()  # before mlx is imported below

import mlx.core as mx  # noqa: E402

from adapters.base import SamplingParams  # noqa: E402
from adapters.mlx_lm.batching import Batcher  # noqa: E402
from adapters.mlx_lm.models import LoadedModel, ModelSpec, load_model  # noqa: E402
from adapters.mlx_lm.slot_kv import capacity_for  # noqa: E402
from tests.adapters.test_batch_masks import alone, assert_same_greedy, drive, prompt  # noqa: E402


@pytest.fixture(scope="module")
def loaded(models_dir: Path) -> LoadedModel:
    return load_model(ModelSpec("tiny", "tiny", models_dir=str(models_dir)))


def _greedy(loaded: LoadedModel, max_tokens: int) -> SamplingParams:
    # A logit bias against EOS: every sequence runs to its max_tokens.
    eos = tuple((t, -100.0) for t in loaded.tokenizer.eos_token_ids)
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, logprobs=True, top_logprobs=4, logit_bias=eos)


def test_n_above_max_running_runs_in_parts(loaded: LoadedModel) -> None:
    """n = 10 through four slots: every choice completes (the engine once spun forever here), never more
    than four decode at once, and each is the request's greedy decode."""
    tokens = prompt(loaded, "many choices")
    p = SamplingParams(**{**_greedy(loaded, 6).__dict__, "n": 10})
    batcher = Batcher(loaded, max_running=4)
    uids = batcher.insert(tokens, loaded.make_cache(), p, tokens)
    results: dict[int, Any] = {}
    finished: dict[int, str] = {}
    for steps, _ in enumerate(drive(batcher, results, finished)):
        assert batcher.running <= 4
        assert steps < 200, "the batch made no progress"
    assert set(finished) == set(uids) and set(finished.values()) == {"length"}
    ref = alone(loaded, tokens, _greedy(loaded, 6))
    for uid in uids:
        assert_same_greedy(ref, results[uid])


def test_a_prefix_cache_is_copied_for_each_part(loaded: LoadedModel) -> None:
    """Parts continuing a prefilled cache each get their own copy: every part's answer is the same."""
    tokens = prompt(loaded, "a shared beginning and then the question")
    cache = loaded.make_cache()
    head = tokens[:-3]
    loaded.model(mx.array(head)[None], cache=cache)
    p = SamplingParams(**{**_greedy(loaded, 5).__dict__, "n": 6})
    batcher = Batcher(loaded, max_running=2)
    uids = batcher.insert(tokens[len(head) :], cache, p, tokens)
    results: dict[int, Any] = {}
    finished: dict[int, str] = {}
    for _ in drive(batcher, results, finished):
        pass
    ref = alone(loaded, tokens, _greedy(loaded, 5))
    for uid in uids:
        assert_same_greedy(ref, results[uid])


def test_a_waiting_tenant_preempts_one_above_its_share(loaded: LoadedModel) -> None:
    """Tenant a fills all four slots with long sequences; tenant b's request then joins within two steps
    (a's latest sequences are preempted down to its fair share of two), and every sequence, preempted ones
    included, is still its greedy decode alone."""
    batcher = Batcher(loaded, max_running=4)
    noisy = [prompt(loaded, f"noisy request {i}") for i in range(4)]
    long = _greedy(loaded, 40)
    a_uids = [batcher.insert(t, loaded.make_cache(), long, t, tenant="a")[0] for t in noisy]
    results: dict[int, Any] = {}
    finished: dict[int, str] = {}
    steps = drive(batcher, results, finished)
    for _ in range(6):
        next(steps)
    assert batcher.running == 4 and batcher.held() == {"a": 4}
    polite = prompt(loaded, "a short polite question")
    short = _greedy(loaded, 5)
    (b_uid,) = batcher.insert(polite, loaded.make_cache(), short, polite, tenant="b")
    waited = 0
    while b_uid not in results:
        next(steps)
        waited += 1
    assert waited <= 2, f"tenant b waited {waited} steps for a slot"
    assert batcher.preempted >= 1
    for _ in steps:
        pass
    assert set(finished) == {*a_uids, b_uid}
    assert_same_greedy(alone(loaded, polite, short), results[b_uid])
    for uid, t in zip(a_uids, noisy, strict=True):
        assert len(results[uid]) == 40
        assert_same_greedy(alone(loaded, t, long), results[uid])
    state = batcher.state()
    assert not state.slot_rows and not state.waiting  # idle: nothing parked or left behind


def test_the_kv_budget_holds_arrivals_back(loaded: LoadedModel) -> None:
    """A budget with room for two sequences' slots: four requests go through two at a time, the slots never
    outgrow the budget, and every answer is complete."""
    p = _greedy(loaded, 20)
    per_row = capacity_for(len(prompt(loaded, "question 0")) + p.max_tokens + 1) * loaded.kv_bytes_per_token
    assert loaded.kv_bytes_per_token > 0
    batcher = Batcher(loaded, max_running=8, kv_budget=2 * per_row)
    requests = [prompt(loaded, f"question {i}") for i in range(4)]
    uids = [batcher.insert(t, loaded.make_cache(), p, t)[0] for t in requests]
    results: dict[int, Any] = {}
    finished: dict[int, str] = {}
    most = 0
    for _ in drive(batcher, results, finished):
        most = max(most, batcher.running)
        state = batcher.state()
        assert state.slot_rows * state.slot_capacity * loaded.kv_bytes_per_token <= 2 * per_row
    assert most == 2
    for uid, t in zip(uids, requests, strict=True):
        assert_same_greedy(alone(loaded, t, p), results[uid])


def test_the_sequential_path_waits_for_kv_room(models_dir: Path) -> None:
    """Strict mode decodes each request on its own caches: with a budget for one request's KV at a time, a
    second request starts only after the first has finished, and both complete."""
    from adapters.base import Finished, Plan, TokenEvent
    from adapters.mlx_lm.engine import MlxEngine

    budget = 600 * 1024  # tiny: 1 KiB a position; 300 + 3 positions round up to 512
    engine = MlxEngine(
        [ModelSpec("tiny", "tiny", models_dir=str(models_dir), isolation_mode="strict", max_running_kv_bytes=budget)]
    )
    engine.start()
    try:
        while engine.health()["models"]["tiny"]["state"] == "loading":
            time.sleep(0.05)
        eos = tuple((t, -100.0) for t in engine.loaded("tiny").tokenizer.eos_token_ids)
        params = SamplingParams(max_tokens=300, temperature=0.0, logit_bias=eos)
        timeline: list[tuple[str, str]] = []

        async def one(rid: str) -> None:
            async for event in engine.submit(Plan(rid, "tiny", "default", (10, 11, 12), params)):
                if isinstance(event, TokenEvent):
                    timeline.append((rid, "token"))
                elif isinstance(event, Finished):
                    timeline.append((rid, "finished"))

        async def both() -> None:
            await asyncio.gather(one("a"), one("b"))

        asyncio.run(both())
    finally:
        engine.stop()
    first_done = next(i for i, (_, kind) in enumerate(timeline) if kind == "finished")
    first = timeline[first_done][0]
    assert all(rid == first for rid, _ in timeline[:first_done]), "the two requests' KV was held at once"
    assert sum(kind == "finished" for _, kind in timeline) == 2
