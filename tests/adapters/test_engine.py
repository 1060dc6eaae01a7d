"""The mlx-lm engine in process, on the real tiny model."""

from __future__ import annotations

import asyncio
import platform
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from adapters.mlx_lm.blas import load_optimised_blas

load_optimised_blas()  # before mlx is imported below

from adapters.base import Failed, Finished, Plan, SamplingParams  # noqa: E402
from adapters.mlx_lm.engine import MlxEngine  # noqa: E402
from adapters.mlx_lm.models import ModelSpec  # noqa: E402


@pytest.fixture(scope="module")
def engine(models_dir: Path) -> Iterator[MlxEngine]:
    eng = MlxEngine(
        [
            ModelSpec("tiny", "tiny", models_dir=str(models_dir), isolation_mode="strict"),
            ModelSpec("tiny-batched", "tiny", models_dir=str(models_dir), isolation_mode="balanced"),
        ]
    )
    eng.start()
    while any(m["state"] == "loading" for m in eng.health()["models"].values()):
        import time

        time.sleep(0.05)
    yield eng
    eng.stop()


def run(engine: MlxEngine, plan: Plan) -> list[object]:
    async def go() -> list[object]:
        return [e async for e in engine.submit(plan)]

    return asyncio.run(go())


def plan(rid: str, tokens: tuple[int, ...] = (10, 11, 12), model: str = "tiny", **kw: object) -> Plan:
    return Plan(rid, model, "default", tokens, SamplingParams(**{"max_tokens": 5, "temperature": 0, **kw}))  # type: ignore[arg-type]


def test_a_failing_request_fails_alone(engine: MlxEngine, monkeypatch: pytest.MonkeyPatch) -> None:
    def faulty(plan: Plan) -> None:
        if plan.request_id == "boom":
            raise RuntimeError("injected fault")

    monkeypatch.setattr(engine, "fault_hook", faulty)
    before = engine.health()["requests"]["failed"]
    events = run(engine, plan("boom"))
    assert isinstance(events[-1], Failed) and "injected fault" in str(events[-1].error)
    ok = run(engine, plan("fine"))
    assert isinstance(ok[-1], Finished) and ok[-1].completion_tokens == 5
    health = engine.health()
    assert health["engine_alive"] and health["requests"]["failed"] == before + 1


def test_prefill_in_chunks_gives_the_same_tokens(engine: MlxEngine, monkeypatch: pytest.MonkeyPatch) -> None:
    tokens = tuple(range(100, 1100))
    whole = run(engine, plan("a", tokens))
    loaded = engine.loaded("tiny")
    monkeypatch.setattr(loaded, "spec", ModelSpec(**{**loaded.spec.__dict__, "prefill_step_size": 64}))
    chunked = run(engine, plan("b", tokens))
    ids = lambda evs: [e.token_ids for e in evs if hasattr(e, "token_ids")]  # noqa: E731
    assert ids(whole) == ids(chunked)


def test_a_failing_batch_fails_its_requests_only(engine: MlxEngine, monkeypatch: pytest.MonkeyPatch) -> None:
    from adapters.mlx_lm.batching import Batcher

    original = Batcher.step
    calls = {"n": 0}

    def faulty(self, *args):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("injected batch fault")
        return original(self, *args)

    monkeypatch.setattr(Batcher, "step", faulty)
    events = run(engine, plan("boom", model="tiny-batched"))
    assert isinstance(events[-1], Failed) and "injected batch fault" in str(events[-1].error)
    ok = run(engine, plan("fine", model="tiny-batched"))
    assert isinstance(ok[-1], Finished) and ok[-1].completion_tokens == 5
    assert engine.health()["engine_alive"]


def test_batched_and_sequential_agree(engine: MlxEngine) -> None:
    tokens = tuple(range(200, 260))
    ids = lambda evs: [e.token_ids for e in evs if hasattr(e, "token_ids")]  # noqa: E731
    assert ids(run(engine, plan("s", tokens, max_tokens=12))) == ids(
        run(engine, plan("b", tokens, model="tiny-batched", max_tokens=12))
    )


@pytest.mark.skipif(platform.system() != "Linux" or platform.machine() != "x86_64", reason="MKL ships for x86_64")
def test_cpu_extra_brings_a_fast_blas() -> None:
    info = load_optimised_blas()
    assert info.name == "mkl" and info.fast, info
    # And mlx picks it up in a fresh process: MKL is mapped there, and float32 matmul runs well above the
    # reference BLAS's ~6 GFLOP/s. (The bound is loose on purpose: on a loaded 2-core machine MKL measured
    # 15-65 GFLOP/s; a timed threshold near its quiet speed failed under load.)
    code = (
        "from adapters.mlx_lm.blas import load_optimised_blas; load_optimised_blas();"
        "import mlx.core as mx, time; mx.set_default_device(mx.cpu);"
        "a=mx.random.normal((1024,1024)); mx.eval(a@a); t=time.perf_counter();"
        "[mx.eval(a@a) for _ in range(5)]; g=2*1024**3*5/(time.perf_counter()-t)/1e9;"
        "print(g, 'libmkl_rt' in open('/proc/self/maps').read())"
    )
    out = subprocess.check_output([sys.executable, "-c", code], cwd=Path(__file__).parents[2]).split()
    gflops, mapped = float(out[0]), out[1] == b"True"
    assert mapped, "MKL is not loaded in the process that runs mlx"
    assert gflops > 12, f"{gflops:.1f} GFLOP/s: the optimised BLAS is not in use"


@pytest.mark.parametrize(
    "kw",
    [
        {"max_tokens": 1},
        {"max_tokens": 12, "frequency_penalty": 1.5, "presence_penalty": 0.5},
        {"max_tokens": 12, "logit_bias": ((7, 5.0), (9, -100.0))},
    ],
    ids=["one-token", "penalties", "logit-bias"],
)
def test_batched_first_token_path_agrees_with_sequential(engine: MlxEngine, kw: dict[str, Any]) -> None:
    """A lone arrival is prefilled in one pass before it joins the batch; penalties, bias and lengths hold."""
    tokens = tuple(range(300, 340))
    ids = lambda evs: [t for e in evs if hasattr(e, "token_ids") for t in e.token_ids]  # noqa: E731
    strict = ids(run(engine, plan("s", tokens, **kw)))
    batched = ids(run(engine, plan("b", tokens, model="tiny-batched", **kw)))
    assert batched == strict and len(strict) == kw["max_tokens"]


def test_prompts_longer_than_a_chunk_still_batch_correctly(engine: MlxEngine, monkeypatch: pytest.MonkeyPatch) -> None:
    tokens = tuple(range(400, 700))
    ids = lambda evs: [t for e in evs if hasattr(e, "token_ids") for t in e.token_ids]  # noqa: E731
    whole = ids(run(engine, plan("a", tokens, model="tiny-batched", max_tokens=8)))
    loaded = engine.loaded("tiny-batched")
    monkeypatch.setattr(loaded, "spec", ModelSpec(**{**loaded.spec.__dict__, "prefill_step_size": 64}))
    chunked = ids(run(engine, plan("b", tokens, model="tiny-batched", max_tokens=8)))
    assert chunked == whole
