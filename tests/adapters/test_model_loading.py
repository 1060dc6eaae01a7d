"""Models load one stage at a time on the engine thread: a ready model serves while another still loads,
and a model that fails does not take the others down."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Generator
from pathlib import Path

import pytest

from adapters.mlx_lm.blas import load_optimised_blas

load_optimised_blas()  # before mlx is imported below

from adapters.base import EngineNotReady, Finished, ModelUnavailable, Plan, SamplingParams  # noqa: E402
from adapters.mlx_lm.engine import MlxEngine  # noqa: E402
from adapters.mlx_lm.models import LoadedModel, ModelSpec, load_steps  # noqa: E402


def _wait(engine: MlxEngine, model: str, state: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while engine.health()["models"][model]["state"] != state:
        assert time.monotonic() < deadline, engine.health()["models"]
        time.sleep(0.02)


def _complete(engine: MlxEngine, model: str) -> Finished:
    async def go() -> list[object]:
        plan = Plan("r", model, "default", (10, 11, 12), SamplingParams(max_tokens=3, temperature=0))
        return [e async for e in engine.submit(plan)]

    last = asyncio.run(go())[-1]
    assert isinstance(last, Finished), last
    return last


def test_a_ready_model_serves_while_another_loads(models_dir: Path) -> None:
    gate = threading.Event()

    def held(spec: ModelSpec) -> Generator[str, None, LoadedModel]:
        while spec.name == "slow" and not gate.is_set():
            yield "held by the test"
            time.sleep(0.002)
        return (yield from load_steps(spec))

    # "slow" comes first: the engine must not wait for it before serving "tiny".
    engine = MlxEngine(
        [ModelSpec("slow", "tiny", models_dir=str(models_dir)), ModelSpec("tiny", "tiny", models_dir=str(models_dir))],
        load=held,
    )
    engine.start()
    try:
        _wait(engine, "tiny", "ready")
        assert _complete(engine, "tiny").completion_tokens == 3
        slow = engine.health()["models"]["slow"]
        assert slow["state"] == "loading" and slow["stage"] == "held by the test"
        with pytest.raises(EngineNotReady, match="still loading"):
            engine.tokenizer("slow")
        assert [m.id for m in engine.models()] == ["slow", "tiny"]
        gate.set()
        _wait(engine, "slow", "ready")
        assert _complete(engine, "slow").completion_tokens == 3
        assert engine.health()["models"]["slow"]["load_seconds"] is not None
    finally:
        gate.set()
        engine.stop()


def test_a_failed_model_is_unavailable_and_unlisted(models_dir: Path, tmp_path: Path) -> None:
    engine = MlxEngine(
        [
            ModelSpec("gone", str(tmp_path / "missing"), models_dir=str(models_dir)),
            ModelSpec("tiny", "tiny", models_dir=str(models_dir)),
        ]
    )
    engine.start()
    try:
        _wait(engine, "gone", "failed")
        _wait(engine, "tiny", "ready")
        assert [m.id for m in engine.models()] == ["tiny"]
        with pytest.raises(ModelUnavailable, match="retrying will not help"):
            engine.tokenizer("gone")
        assert _complete(engine, "tiny").completion_tokens == 3
    finally:
        engine.stop()
