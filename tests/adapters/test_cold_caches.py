"""Cold named caches: loaded from their file, or recomputed when loading was measured to cost more.

The real engine and store on the tiny model. The measured rates are set by hand where the test needs
loading to look dear: on this CPU a load is always far cheaper than a prefill, so the recompute path
would otherwise never run here.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from adapters.mlx_lm.blas import load_optimised_blas

load_optimised_blas()  # before mlx is imported below

from adapters.base import (  # noqa: E402
    Finished,
    Plan,
    PrefixBuild,
    PrefixBuilt,
    PrefixUse,
    SamplingParams,
    Started,
)
from adapters.mlx_lm.engine import MlxEngine  # noqa: E402
from adapters.mlx_lm.models import ModelSpec  # noqa: E402
from prefix_caches.store import PrefixCacheStore  # noqa: E402
from tests.greedy import assert_same_greedy, greedy_of  # noqa: E402

PREFIX = tuple(range(300, 900))  # two build chunks of up to 512 tokens: the first one is timed
SUFFIX = (40, 41, 42, 43, 44, 45, 46, 47)


@pytest.fixture(scope="module")
def engine(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlxEngine]:
    store = PrefixCacheStore(tmp_path_factory.mktemp("caches"))
    store.scan()
    eng = MlxEngine(
        [
            ModelSpec("strict", "tiny", models_dir=str(models_dir), isolation_mode="strict"),
            ModelSpec("balanced", "tiny", models_dir=str(models_dir), isolation_mode="balanced"),
        ],
        store,
    )
    eng.start()
    import time

    while any(m["state"] == "loading" for m in eng.health()["models"].values()):
        time.sleep(0.05)
    for model in ("strict", "balanced"):
        job = PrefixBuild("b-" + model, model, "default", "sys-" + model, PREFIX, "prompt", prompt="x")

        async def build(job: PrefixBuild = job) -> list[object]:
            return [e async for e in eng.build_prefix(job)]

        assert isinstance(asyncio.run(build())[-1], PrefixBuilt)
    yield eng
    eng.stop()


def on_engine(engine: MlxEngine, fn: Callable[[], Any]) -> Any:
    return engine.call(fn).result(timeout=600)


def ask(engine: MlxEngine, model: str) -> tuple[Started, list[tuple[str, float, list[tuple[str, float]]]], Finished]:
    params = SamplingParams(max_tokens=12, temperature=0, logprobs=True, top_logprobs=5)
    plan = Plan("r", model, "default", PREFIX + SUFFIX, params, PrefixUse("default", "sys-" + model, len(PREFIX)))

    async def go() -> list[object]:
        return [e async for e in engine.submit(plan)]

    events = asyncio.run(go())
    started = next(e for e in events if isinstance(e, Started))
    greedy = greedy_of(events)
    finished = events[-1]
    assert isinstance(finished, Finished), events[-1]
    return started, greedy, finished


@pytest.mark.parametrize("model", ["strict", "balanced"])
def test_cold_cache_is_loaded_or_recomputed_by_measured_cost(engine: MlxEngine, model: str) -> None:
    store = engine.prefix_store
    assert store is not None
    name = "sys-" + model
    manifest = store.get("default", name)
    before = store.usage()[(model, "default")]
    hot, hot_tokens, hot_done = ask(engine, model)
    assert hot.prefix_hit and hot.prefix_resident and hot_done.cached_tokens == len(PREFIX)

    # Cold, with loading measured cheap (as it is on this machine): the file is read.
    on_engine(engine, lambda: store.evict("default", name))
    assert engine.prefixes.prefill_seconds_per_token(model) is not None  # timed while building
    cold, cold_tokens, _ = ask(engine, model)
    assert cold.prefix_hit and not cold.prefix_resident
    assert store.estimated_load_seconds(manifest) is not None
    assert_same_greedy(hot_tokens, cold_tokens)

    # Cold, with loading measured dearer than the prefill it replaces: the request recomputes the prefix...
    on_engine(engine, lambda: store.evict("default", name))
    slow = store.load_rate.seconds_per_unit
    store.load_rate.seconds_per_unit = 1.0  # a second per byte
    try:
        again, again_tokens, again_done = ask(engine, model)
    finally:
        store.load_rate.seconds_per_unit = slow
    assert not again.prefix_hit and again_done.cached_tokens == 0
    assert again.prefix_miss_reason is not None and again.prefix_miss_reason.startswith("recomputed")
    assert_same_greedy(hot_tokens, again_tokens)
    # ... and the prefix KV it computed is resident again: the next request is a hot hit on it.
    assert on_engine(engine, lambda: store.is_resident(manifest))
    after, after_tokens, after_done = ask(engine, model)
    assert after.prefix_hit and after.prefix_resident and after_done.cached_tokens == len(PREFIX)
    assert_same_greedy(hot_tokens, after_tokens)
    # What /health and /metrics count: three hits, one of them read from the file, one recompute (a miss).
    use = store.usage()[(model, "default")]
    counted = (use.hits - before.hits, use.loads - before.loads, use.misses - before.misses)
    assert counted == (3, 1, 1) and use.recomputes - before.recomputes == 1
    # Decode steps timed on the path the mode takes: strict decodes each request alone.
    path = "sequential" if model == "strict" else "batch"
    assert engine.stats.step_times()[(model, path)].count >= 4
    # The file on disk is untouched by any of it.
    assert asyncio.run(engine.verify_prefix("default", name))["ok"]
