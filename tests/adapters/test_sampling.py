"""The samplers and logits processors on real MLX arrays (no model needed): exact arithmetic."""

from __future__ import annotations

import mlx.core as mx
import pytest

from adapters.base import SamplingParams
from adapters.mlx_lm.sampling import (
    ChoiceSampler,
    gather_logprobs,
    logits_processors,
    read_sampled,
    sampled_token,
    token_sampler,
)


def params(**kw: object) -> SamplingParams:
    return SamplingParams(max_tokens=8, **kw)  # type: ignore[arg-type]


def test_repetition_penalty_covers_prompt_and_generated_tokens() -> None:
    (rep,) = logits_processors(params(repetition_penalty=2.0), 5, prompt=[0, 1])
    logits = mx.array([[2.0, -2.0, 1.0, 0.5, 3.0]])
    assert rep(mx.array([0, 1]), logits).tolist() == [[1.0, -4.0, 1.0, 0.5, 3.0]]
    # Token 2 was generated: from now on it is penalised too.
    assert rep(mx.array([2]), logits).tolist() == [[1.0, -4.0, 0.5, 0.5, 3.0]]


def test_openai_penalties_count_generated_tokens_only() -> None:
    (pen,) = logits_processors(params(frequency_penalty=0.5, presence_penalty=0.25), 4, prompt=[3, 3])
    logits = mx.zeros((1, 4))
    assert pen(mx.array([3]), logits).tolist() == [[0.0, 0.0, 0.0, 0.0]]  # the prompt's last token
    assert pen(mx.array([1]), logits).tolist() == [[0.0, -0.75, 0.0, 0.0]]
    assert pen(mx.array([1]), logits).tolist() == [[0.0, -1.25, 0.0, 0.0]]


@pytest.mark.parametrize("filters", [{"top_k": 1}, {"min_p": 1.0}, {"top_p": 1e-6}])
def test_filters_that_keep_one_token_are_greedy(filters: dict[str, float]) -> None:
    logits = mx.random.normal((16, 1000), key=mx.random.key(0))
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    greedy = mx.argmax(logprobs, axis=-1).tolist()
    for seed in (None, 7):
        sample = token_sampler(params(temperature=1.5, seed=seed, **filters), mx.random.key(1))
        assert sample(logprobs).tolist() == greedy


def test_top_k_samples_only_among_the_k_best() -> None:
    logits = mx.random.normal((1, 100), key=mx.random.key(3))
    best = set(mx.argsort(-logits[0])[:5].tolist())
    sample = token_sampler(params(temperature=2.0, seed=1, top_k=5), mx.random.key(1))
    drawn = {int(sample(logits).item()) for _ in range(200)}
    assert drawn <= best and len(drawn) > 1


def test_choice_sampler_feeds_its_processors_the_token_it_sampled() -> None:
    sampler = ChoiceSampler(params(temperature=0.0, repetition_penalty=100.0), 3, mx.random.key(0), prompt=[0])
    logits = mx.array([5.0, 4.0, 3.0])
    # Token 0 is in the prompt (5/100 < 4), so 1 wins; then 1 is penalised as well, so 2 wins.
    assert [sampler(logits).token for _ in range(2)] == [1, 2]


def test_batch_logprobs_equal_each_rows_own() -> None:
    """The batch step gathers every row's log-probabilities in one round trip: each row gets what the
    one-row function gives it, whatever mix of logprobs / top_logprobs the rows asked for."""
    mx.random.seed(3)
    logits = mx.random.normal((5, 300)) * 3
    batch = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    logprobs = list(batch)
    params = [
        SamplingParams(max_tokens=1, logprobs=True, top_logprobs=5),
        SamplingParams(max_tokens=1),
        SamplingParams(max_tokens=1, logprobs=True, top_logprobs=0),
        SamplingParams(max_tokens=1, logprobs=True, top_logprobs=2),
        SamplingParams(max_tokens=1, logprobs=True, top_logprobs=20),
    ]
    tokens = [7, 11, 299, 0, 150]
    rows = [i for i, p in enumerate(params) if p.logprobs]
    k = max(params[i].top_logprobs for i in rows)
    arrays = gather_logprobs(batch, mx.array(tokens), rows, k)
    together = read_sampled(params, tokens, rows, arrays)
    for p, t, lp, got in zip(params, tokens, logprobs, together, strict=True):
        alone = sampled_token(p, t, lp)
        assert got.token == alone.token and len(got.top) == len(alone.top) == (p.top_logprobs if p.logprobs else 0)
        if p.logprobs:
            assert got.logprob is not None and alone.logprob is not None
            assert abs(got.logprob - alone.logprob) < 1e-6
            assert [i for i, _ in got.top] == [i for i, _ in alone.top]
            assert all(abs(a - b) < 1e-6 for (_, a), (_, b) in zip(got.top, alone.top, strict=True))
        else:
            assert got.logprob is None and alone.logprob is None
