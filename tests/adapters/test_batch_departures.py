"""Departures from the real Batcher on the real tiny model: sequences that finish leave the decoding batch
together, in few filters of its cache, not one filter per departure (each one syncs the device once per
layer), and every sequence's tokens are still the greedy decode it gets alone."""

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


def test_departures_leave_together_and_change_no_token(loaded: LoadedModel, monkeypatch: pytest.MonkeyPatch) -> None:
    # A logit bias against EOS: every sequence runs to its own max_tokens, so they leave one by one.
    eos = tuple((t, -100.0) for t in loaded.tokenizer.eos_token_ids)
    requests = [
        (
            prompt(loaded, f"question number {i}"),
            SamplingParams(max_tokens=4 + 3 * i, temperature=0.0, logprobs=True, top_logprobs=4, logit_bias=eos),
        )
        for i in range(12)
    ]
    batcher = Batcher(loaded, max_running=16)
    filters: list[int] = []
    real_filter = batcher.gen._generation_batch.filter.__func__  # type: ignore[attr-defined]

    def counted(self: Any, keep: list[int]) -> None:
        filters.append(len(self.uids) - len(keep))
        real_filter(self, keep)

    monkeypatch.setattr(type(batcher.gen._generation_batch), "filter", counted)
    # A burst: all but the first go through mlx-lm's batched prefill, so all decode in one batch.
    uids = [batcher.insert(t, loaded.make_cache(), p, t)[0] for t, p in requests]
    results: dict[int, Any] = {}
    finished: dict[int, str] = {}
    for _ in drive(batcher, results, finished):
        pass
    assert set(finished) == set(uids) and set(finished.values()) == {"length"}
    for uid, (tokens, p) in zip(uids, requests, strict=True):
        assert len(results[uid]) == p.max_tokens
        assert_same_greedy(alone(loaded, tokens, p), results[uid])
    assert len(batcher.gen._generation_batch.uids) == 0  # no row is left behind
    departures = sum(filters)
    assert departures >= 11
    assert len([f for f in filters if f]) <= departures // 3, filters  # rows left in groups, not one by one
