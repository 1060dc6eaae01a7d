"""Slot KV decodes as each sequence would alone, and a departure leaves the others as they were."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from adapters.mlx_lm.blas import load_optimised_blas

load_optimised_blas()  # before mlx is imported below

import mlx.core as mx  # noqa: E402
from mlx_lm.models.cache import make_prompt_cache  # noqa: E402

from adapters.mlx_lm.models import LoadedModel, ModelSpec, load_model  # noqa: E402
from adapters.mlx_lm.slot_kv import SlotBatch  # noqa: E402

STEPS = 10
# Fixed input tokens (not sampled ones): the logits of each step are compared, so a wrong mask or offset
# shows even where the tiny random model's greedy token would not change.
FEED = [11, 42, 7, 99, 3, 64, 25, 150, 8, 77]


@pytest.fixture(scope="module")
def loaded(models_dir: Path) -> LoadedModel:
    return load_model(ModelSpec("tiny", "tiny", models_dir=str(models_dir)))


def _prefilled(model: Any, prompt: list[int]) -> list[Any]:
    cache = make_prompt_cache(model)
    mx.eval(model(mx.array(prompt)[None], cache=cache))
    return cache


def _alone(model: Any, prompt: list[int]) -> list[mx.array]:
    cache = _prefilled(model, prompt)
    return [model(mx.array([[t]]), cache=cache)[0, -1, :] for t in FEED]


def test_slots_decode_as_alone_and_survive_a_departure(loaded: LoadedModel) -> None:
    model = loaded.model
    # Mixed lengths: every row has its own offset (RoPE position and mask).
    prompts = [[(7 * i + 3 * j) % 200 + 5 for j in range(n)] for i, n in enumerate((9, 23, 40))]
    alone = [_alone(model, p) for p in prompts]
    args = model.args
    head_dim = args.hidden_size // args.num_attention_heads
    batch = SlotBatch(len(model.layers), 4, 64, args.num_key_value_heads, head_dim, mx.float32)
    for slot, prompt in enumerate(prompts):
        batch.admit(slot, _prefilled(model, prompt))
    for step, token in enumerate(FEED):
        batch.prepare_step()
        logits = model(mx.array([[token]] * 4), cache=batch.layers)[:, -1, :]  # slot 3 stays free
        batch.advance()
        for slot in (0, 2) if step > 4 else (0, 1, 2):
            assert mx.allclose(logits[slot], alone[slot][step], atol=1e-4).item(), (slot, step)
        if step == 4:
            batch.release(1)  # slot 1 leaves; nothing is copied, the others go on unchanged
    assert batch.free_slot() == 1 and sum(batch.live) == 2
