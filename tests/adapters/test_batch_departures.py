"""Departures from the real Batcher on the real tiny model: a sequence that finishes frees its slot for the
next arrival, and every sequence's tokens are still the greedy decode it gets alone."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from adapters.mlx_lm.blas import load_optimised_blas

load_optimised_blas()  # before mlx is imported below

from adapters.base import SamplingParams  # noqa: E402
from adapters.mlx_lm.batching import Batcher  # noqa: E402
from adapters.mlx_lm.models import LoadedModel, ModelSpec, load_model  # noqa: E402
from tests.adapters.test_batch_masks import alone, assert_same_greedy, drive, prompt  # noqa: E402


@pytest.fixture(scope="module")
def loaded(models_dir: Path) -> LoadedModel:
    return load_model(ModelSpec("tiny", "tiny", models_dir=str(models_dir)))


def test_departures_free_slots_for_arrivals_and_change_no_token(loaded: LoadedModel) -> None:
    """Twelve requests through a batch of four slots: each departure frees its slot (nothing copied), the
    waiting arrivals take the freed slots, and every sequence's tokens are still its greedy decode alone."""
    # A logit bias against EOS: every sequence runs to its own max_tokens, so they leave one by one.
    eos = tuple((t, -100.0) for t in loaded.tokenizer.eos_token_ids)
    requests = [
        (
            prompt(loaded, f"question number {i}" + " and more" * (i % 5)),
            SamplingParams(max_tokens=4 + 3 * i, temperature=0.0, logprobs=True, top_logprobs=4, logit_bias=eos),
        )
        for i in range(12)
    ]
    batcher = Batcher(loaded, max_running=4)
    uids = [batcher.insert(t, loaded.make_cache(), p, t)[0] for t, p in requests]
    results: dict[int, Any] = {}
    finished: dict[int, str] = {}
    slots_used: set[int] = set()
    most = 0
    for _ in drive(batcher, results, finished):
        most = max(most, batcher.running)
        state = batcher.state()
        assert state.slot_rows <= 4
        slots_used.update(state.occupied)
    assert set(finished) == set(uids) and set(finished.values()) == {"length"}
    for uid, (tokens, p) in zip(uids, requests, strict=True):
        assert len(results[uid]) == p.max_tokens
        assert_same_greedy(alone(loaded, tokens, p), results[uid])
    assert most == 4 and slots_used == {0, 1, 2, 3}  # twelve sequences went through four slots
    state = batcher.state()
    assert not state.slot_rows and not state.sequences  # idle: nothing left behind, the KV freed
