"""Adapters served per row (``adapters.mlx_lm.lora``) on the real tiny model, with random LoRA and DoRA factors
written as ``mlx_lm.lora`` writes them: a row's output is what mlx-lm's own LoRA/DoRA layers give for its adapter,
whatever its neighbours run; the engine batches adapters of one base together, unloads one only when its running
requests are done, and refuses files it cannot serve."""

from __future__ import annotations

import asyncio
import copy
import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from adapters.mlx_lm.blas import load_optimised_blas

load_optimised_blas()  # before mlx is imported below

import mlx.core as mx  # noqa: E402
from mlx_lm.tuner.utils import load_adapters  # noqa: E402

from adapters.base import (  # noqa: E402
    AdapterRefused,
    Finished,
    Plan,
    ResponseKVUse,
    SamplingParams,
    Started,
    UnknownModel,
)
from adapters.mlx_lm.engine import MlxEngine  # noqa: E402
from adapters.mlx_lm.lora import AdapterBank, AdapterError, read_adapter  # noqa: E402
from adapters.mlx_lm.models import LoadedModel, ModelSpec, load_model  # noqa: E402
from adapters.setup import AdapterSpec  # noqa: E402
from bench.random_adapters import make_random_adapter  # noqa: E402
from tests.greedy import assert_same_greedy, greedy_of  # noqa: E402


@pytest.fixture(scope="module")
def loaded(models_dir: Path) -> LoadedModel:
    return load_model(ModelSpec("tiny", "tiny", models_dir=str(models_dir)))


@pytest.fixture(scope="module")
def adapter_dirs(loaded: LoadedModel, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return {
        "lora": make_random_adapter(loaded.model, root / "lora", rank=8, seed=1, magnitude=0.05),
        "lora-mlp": make_random_adapter(
            loaded.model, root / "lora-mlp", rank=4, seed=2, keys=["mlp.down_proj", "self_attn.v_proj"], magnitude=0.05
        ),
        "dora": make_random_adapter(
            loaded.model, root / "dora", rank=4, kind="dora", seed=3, keys=["self_attn.q_proj", "mlp.up_proj"]
        ),
    }


def test_each_row_gets_what_mlx_lms_own_layers_give(loaded: LoadedModel, adapter_dirs: dict[str, Path]) -> None:
    model = copy.deepcopy(loaded.model)
    inner = getattr(model, "wrapped", model)
    vocab = loaded.vocab_size
    x = mx.array([[5, 6, 7, 8, 9], [10, 11, 12, 13, 14], [15, 16, 17, 18, 19], [20, 21, 22, 23, 24]])
    base = model(x)
    want = {kind: load_adapters(copy.deepcopy(inner), str(path))(x)[..., :vocab] for kind, path in adapter_dirs.items()}
    bank = AdapterBank(model)
    index = {kind: bank.add(kind, read_adapter(path)) for kind, path in adapter_dirs.items()}
    assert bank.names == list(adapter_dirs)
    rows = ["lora", None, "dora", "lora-mlp"]
    with bank.selected([index[k] if k else 0 for k in rows]):
        got = model(x)
    for i, kind in enumerate(rows):
        expected = base[i] if kind is None else want[kind][i]
        assert mx.abs(got[i] - expected).max().item() < 1e-4, kind
    for kind in adapter_dirs:  # each adapter changes the output: the comparison above can fail
        assert mx.abs(want[kind][0] - base[0]).max().item() > 1e-3, kind
    assert mx.abs(model(x) - base).max().item() == 0  # no rows selected: the base layers alone

    bank.remove(index["lora"])
    with bank.selected([0, 0, index["dora"], index["lora-mlp"]]):
        after = model(x)
    assert mx.abs(after[2] - want["dora"][2]).max().item() < 1e-4
    assert mx.abs(after[3] - want["lora-mlp"][3]).max().item() < 1e-4
    assert bank.add("again", read_adapter(adapter_dirs["lora"])) == index["lora"]  # the freed index is reused


def test_files_it_cannot_serve_are_refused_with_the_reason(loaded: LoadedModel, tmp_path: Path) -> None:
    full = tmp_path / "full"
    full.mkdir()
    (full / "adapter_config.json").write_text(json.dumps({"fine_tune_type": "full", "num_layers": 2}))
    mx.save_safetensors(str(full / "adapters.safetensors"), {"model.norm.weight": mx.ones((4,))})
    with pytest.raises(AdapterError, match="full fine-tune: it is a model, not an adapter"):
        read_adapter(full)
    with pytest.raises(AdapterError, match="no adapter_config.json"):
        read_adapter(tmp_path)
    other = tmp_path / "other"
    other.mkdir()
    (other / "adapter_config.json").write_text(json.dumps({"lora_parameters": {"rank": 2, "scale": 1.0}}))
    name = "model.layers.0.self_attn.q_proj"
    mx.save_safetensors(
        str(other / "adapters.safetensors"),
        {f"{name}.lora_a": mx.zeros((3, 2)), f"{name}.lora_b": mx.zeros((2, 5))},
    )
    bank = AdapterBank(copy.deepcopy(loaded.model))
    with pytest.raises(AdapterError, match="trained for another model"):
        bank.add("other", read_adapter(other))
    assert bank.names == []


@pytest.fixture(scope="module")
def engine(models_dir: Path, adapter_dirs: dict[str, Path]) -> Iterator[MlxEngine]:
    specs = [
        AdapterSpec(f"{base}-{kind}", base, str(path))
        for base in ("strict", "batched")
        for kind, path in adapter_dirs.items()
    ]
    eng = MlxEngine(
        [
            ModelSpec("strict", "tiny", models_dir=str(models_dir), isolation_mode="strict"),
            ModelSpec("batched", "tiny", models_dir=str(models_dir), isolation_mode="balanced"),
            ModelSpec("perf", "tiny", models_dir=str(models_dir), isolation_mode="performance"),
        ],
        adapters=[*specs, *(AdapterSpec(f"perf-{k}", "perf", str(adapter_dirs[k])) for k in ("lora", "dora"))],
    )
    eng.start()
    deadline = time.monotonic() + 120
    while len(eng.models()) < 3 + len(specs) + 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    yield eng
    eng.stop()


def _plan(model: str, tokens: tuple[int, ...], max_tokens: int = 8, response_kv: ResponseKVUse | None = None) -> Plan:
    params = SamplingParams(max_tokens=max_tokens, temperature=0, logprobs=True, top_logprobs=5)
    return Plan(f"r-{model}", model, "default", tokens, params, response_kv=response_kv)


def _cached(events: list[object]) -> int:
    return next(e.cached_tokens for e in events if isinstance(e, Started))


async def _collect(engine: MlxEngine, plan: Plan) -> list[object]:
    return [e async for e in engine.submit(plan)]


def test_adapters_are_models_with_their_base_as_parent(engine: MlxEngine) -> None:
    infos = {m.id: m for m in engine.models()}
    assert infos["batched-dora"].parent == "batched" and infos["batched"].parent is None
    assert infos["batched-lora"].fingerprint not in ("", infos["batched"].fingerprint)
    assert infos["batched-lora"].fingerprint != infos["batched-dora"].fingerprint
    assert infos["batched-lora"].adapter_bytes > 0 and infos["batched-lora"].batched


def test_a_mixed_batch_gives_each_request_its_own_adapters_answer(engine: MlxEngine) -> None:
    """Each request in one balanced batch (three adapters and the base model, two prompts each) gives what it
    gives alone on the strict path, one sequence per forward pass."""
    kinds = ["lora", "dora", "lora-mlp", None]
    prompts = [tuple(range(40 + 7 * i, 60 + 9 * i)) for i in range(2)]
    jobs = [(kind, p) for kind in kinds for p in prompts]

    async def together() -> list[list[object]]:
        return await asyncio.gather(*(_collect(engine, _plan(f"batched-{k}" if k else "batched", p)) for k, p in jobs))

    mixed = asyncio.run(together())
    alone = [asyncio.run(_collect(engine, _plan(f"strict-{k}" if k else "strict", p))) for k, p in jobs]
    for (kind, _), got, ref in zip(jobs, mixed, alone, strict=True):
        assert isinstance(got[-1], Finished) and isinstance(ref[-1], Finished), kind
        assert_same_greedy(greedy_of(ref), greedy_of(got))
    base = greedy_of(alone[-1])
    assert any(greedy_of(a) != base for a in alone[:-2])  # the adapters change answers: the test can fail


def test_an_unloaded_adapter_lets_its_running_requests_finish(engine: MlxEngine) -> None:
    name = "batched-lora-mlp"
    before = engine.loaded("batched").bank
    assert before is not None and name in before.names

    async def scenario() -> tuple[list[object], bool]:
        running = asyncio.create_task(_collect(engine, _plan(name, tuple(range(30, 60)), max_tokens=40)))
        await asyncio.sleep(0.05)
        unloaded = await asyncio.wrap_future(engine.adapter_unloaded(name))
        return await running, unloaded

    events, unloaded = asyncio.run(scenario())
    assert unloaded and isinstance(events[-1], Finished) and events[-1].completion_tokens == 40
    with pytest.raises(UnknownModel):
        asyncio.run(_collect(engine, _plan(name, (1, 2, 3))))
    assert name not in [m.id for m in engine.models()]
    deadline = time.monotonic() + 10
    while name in before.names and time.monotonic() < deadline:
        engine.wake()
        time.sleep(0.05)
    assert name not in before.names  # its weights went once nothing ran on it


def test_loading_at_run_time_checks_the_files_and_the_base(engine: MlxEngine, adapter_dirs: dict[str, Path]) -> None:
    info = engine.adapter_loaded(AdapterSpec("late", "batched", str(adapter_dirs["lora"]), owner="alpha")).result(30)
    assert info.id == "late" and info.owner == "alpha" and info.parent == "batched"
    events = asyncio.run(_collect(engine, _plan("late", (4, 5, 6))))
    assert isinstance(events[-1], Finished)
    with pytest.raises(AdapterRefused, match="base model 'nope'"):
        engine.adapter_loaded(AdapterSpec("x", "nope", str(adapter_dirs["lora"]))).result(30)
    with pytest.raises(AdapterRefused, match="no adapter_config.json"):
        engine.adapter_loaded(AdapterSpec("y", "batched", str(adapter_dirs["lora"].parent))).result(30)
    assert engine.adapter_unloaded("late").result(30)


def test_quantised_base_weights_take_adapters_too(loaded: LoadedModel, adapter_dirs: dict[str, Path]) -> None:
    import mlx.nn as nn

    model = copy.deepcopy(loaded.model)
    inner = getattr(model, "wrapped", model)
    nn.quantize(inner, group_size=32, bits=4)
    x = mx.array([[5, 6, 7, 8, 9], [10, 11, 12, 13, 14]])
    vocab = loaded.vocab_size
    want = {
        kind: load_adapters(copy.deepcopy(inner), str(adapter_dirs[kind]))(x)[..., :vocab] for kind in ("lora", "dora")
    }
    bank = AdapterBank(model)
    index = {kind: bank.add(kind, read_adapter(adapter_dirs[kind])) for kind in ("lora", "dora")}
    with bank.selected([index["lora"], index["dora"]]):
        got = model(x)
    assert mx.abs(got[0] - want["lora"][0]).max().item() < 1e-3
    assert mx.abs(got[1] - want["dora"][1]).max().item() < 1e-3


def test_automatic_reuse_never_crosses_adapters(engine: MlxEngine) -> None:
    """performance mode keeps each finished prompt's KV for the tenant's next request: only under the same
    adapter (its KV under another adapter, or the base model, is another KV)."""
    prompt = tuple(range(200, 280))
    first = asyncio.run(_collect(engine, _plan("perf-lora", prompt)))
    again = asyncio.run(_collect(engine, _plan("perf-lora", prompt)))
    assert _cached(first) == 0 and _cached(again) > 0
    other = asyncio.run(_collect(engine, _plan("perf-dora", prompt)))
    base = asyncio.run(_collect(engine, _plan("perf", prompt)))
    assert _cached(other) == 0 and _cached(base) == 0
    assert_same_greedy(greedy_of(asyncio.run(_collect(engine, _plan("strict-dora", prompt)))), greedy_of(other))


def test_a_stored_responses_kv_is_continued_only_under_its_adapter(engine: MlxEngine) -> None:
    prompt = tuple(range(300, 360))
    kept = asyncio.run(_collect(engine, _plan("batched-lora", prompt, response_kv=ResponseKVUse(keep_as="resp_1"))))
    assert isinstance(kept[-1], Finished)
    longer = prompt + (5, 6, 7)
    same = asyncio.run(
        _collect(engine, _plan("batched-lora", longer, response_kv=ResponseKVUse("resp_1", len(prompt))))
    )
    other = asyncio.run(
        _collect(engine, _plan("batched-dora", longer, response_kv=ResponseKVUse("resp_1", len(prompt))))
    )
    assert _cached(same) == len(prompt) and _cached(other) == 0
    assert_same_greedy(greedy_of(asyncio.run(_collect(engine, _plan("strict-dora", longer)))), greedy_of(other))


def test_each_adapter_costs_its_own_size_and_gives_it_back(loaded: LoadedModel, tmp_path: Path) -> None:
    model = copy.deepcopy(loaded.model)
    paths = [make_random_adapter(model, tmp_path / f"a{i}", rank=8, seed=10 + i) for i in range(3)]
    size = read_adapter(paths[0]).nbytes
    bank = AdapterBank(model)
    mx.clear_cache()
    before = mx.get_active_memory()
    steps = []
    for i, path in enumerate(paths):
        bank.add(f"a{i}", read_adapter(path))
        mx.clear_cache()
        steps.append(mx.get_active_memory() - before)
    assert all(abs(used - (i + 1) * size) <= 0.1 * size for i, used in enumerate(steps)), (steps, size)
    for index in (3, 2, 1):  # the last ones first: each gives its memory back
        bank.remove(index)
    mx.clear_cache()
    assert mx.get_active_memory() - before <= 0.1 * size
