"""Grammar masks applied batch-wide by the real Batcher on the real tiny model (random weights).

Every constrained sequence decoded in a batch, next to constrained and unconstrained neighbours, must be
the same greedy decode as the request alone on the sequential path (``ChoiceSampler``, which masks with
``GrammarMatcher.apply`` one row at a time): a matcher advanced twice, or not at all, for one token, or a
row masked with its neighbour's grammar, breaks that equality. Each way into the batch is covered: the
lane (a lone arrival's first token), mlx-lm's batched prefill (a burst), ``n > 1``, a sequence leaving
mid-way, and EOS once the grammar is complete.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from adapters.mlx_lm.blas import load_optimised_blas

load_optimised_blas()  # before mlx is imported below

import mlx.core as mx  # noqa: E402

from adapters.base import OutputConstraint, SamplingParams  # noqa: E402
from adapters.mlx_lm.batching import Batcher  # noqa: E402
from adapters.mlx_lm.constraints import BatchMasker  # noqa: E402
from adapters.mlx_lm.models import LoadedModel, ModelSpec, load_model  # noqa: E402
from adapters.mlx_lm.sampling import ChoiceSampler, SampledToken, choice_keys  # noqa: E402
from tests.adapters.test_constraints import FLAT, NESTED, TOOL_CALL, TOOL_GRAMMAR, check_schema  # noqa: E402
from tests.closers import closing_bias_ids  # noqa: E402

TOL = 1e-4
Decode = list[SampledToken]


@pytest.fixture(scope="module")
def loaded(models_dir: Path) -> LoadedModel:
    return load_model(ModelSpec("tiny", "tiny", models_dir=str(models_dir)))


@pytest.fixture(scope="module")
def closing_bias(loaded: LoadedModel) -> tuple[tuple[int, float], ...]:
    """Favour closing punctuation so that random weights finish their JSON (tests/closers.py)."""
    return tuple(closing_bias_ids(loaded.tokenizer.decode, loaded.vocab_size).items())


def prompt(loaded: LoadedModel, words: str) -> list[int]:
    return loaded.tokenizer.encode(f"<|im_start|>user\n{words}<|im_end|>\n<|im_start|>assistant\n")


def params(max_tokens: int, constraint: OutputConstraint | None = None, **kw: Any) -> SamplingParams:
    return SamplingParams(
        max_tokens=max_tokens, temperature=0.0, logprobs=True, top_logprobs=4, constraint=constraint, **kw
    )


def schema(value: dict[str, Any]) -> OutputConstraint:
    return OutputConstraint("json_schema", json.dumps(value))


def alone(loaded: LoadedModel, tokens: list[int], p: SamplingParams) -> Decode:
    """The sequential path's greedy decode of one choice, up to EOS or ``max_tokens``."""
    cache = loaded.make_cache()
    grammars = loaded.tokenizer.grammars if p.constraint is not None else None
    sampler = ChoiceSampler(p, loaded.vocab_size, choice_keys(None, 1)[0], tokens, grammars)
    logits = loaded.model(mx.array(tokens)[None], cache=cache)[0, -1, :]
    out: Decode = []
    while True:
        sampled = sampler(logits)
        out.append(sampled)
        if sampled.token in loaded.tokenizer.eos_token_ids or len(out) >= p.max_tokens:
            return out
        logits = loaded.model(mx.array([sampled.token])[None], cache=cache)[0, -1, :]


def drive(batcher: Batcher, results: dict[int, Decode], finished: dict[int, str]) -> Iterator[None]:
    """Step the batch until it is idle, collecting each sequence's tokens; yields after every step."""
    while batcher.busy:
        for out in batcher.step():
            results.setdefault(out.uid, []).append(out.sampled)
            if out.finish_reason is not None:
                finished[out.uid] = out.finish_reason
        yield


def assert_same_greedy(ref: Decode, got: Decode) -> None:
    """Equal token for token, or parted only where the reference's top two were tied (float rounding
    differs between a batch and one row: random weights give near-flat distributions)."""
    assert ref and got
    for i, (a, b) in enumerate(zip(ref, got, strict=False)):
        assert a.logprob is not None and b.logprob is not None
        if a.token == b.token:
            assert abs(a.logprob - b.logprob) < TOL, f"position {i}: logprobs {a.logprob} vs {b.logprob}"
            continue
        alternatives = dict(a.top)
        assert b.token in alternatives and abs(alternatives[b.token] - a.logprob) < TOL, (
            f"position {i}: {a.token} ({a.logprob}) vs {b.token}, not tied in {a.top}"
        )
        return
    assert len(ref) == len(got)


def text_of(loaded: LoadedModel, decode: Decode) -> str:
    return loaded.tokenizer.decode([s.token for s in decode if s.token not in loaded.tokenizer.eos_token_ids])


def test_lane_burst_and_unconstrained_neighbours_match_alone(
    loaded: LoadedModel, closing_bias: tuple[tuple[int, float], ...]
) -> None:
    """A burst of arrivals prefilled together (right-padded), constrained and not, next to each other; the
    biased constrained ones complete their grammar and end on EOS."""
    requests = [
        (prompt(loaded, "JSON please"), params(160, schema(FLAT), logit_bias=closing_bias)),  # the lane
        (prompt(loaded, "hello there"), params(24)),
        (prompt(loaded, "an order"), params(160, schema(NESTED), logit_bias=closing_bias)),
        (prompt(loaded, "weather?"), params(160, OutputConstraint("lark", TOOL_GRAMMAR), logit_bias=closing_bias)),
        (prompt(loaded, "no help"), params(20, schema(FLAT))),  # constrained, no other processor
        (prompt(loaded, "plain and biased"), params(20, logit_bias=closing_bias)),
        (prompt(loaded, "something longer than the others, to prefill a little longer"), params(20, schema(FLAT))),
    ]
    batcher = Batcher(loaded, max_running=8)
    uids = [batcher.insert(t, loaded.make_cache(), p, t)[0] for t, p in requests]
    results: dict[int, Decode] = {}
    finished: dict[int, str] = {}
    for _ in drive(batcher, results, finished):
        pass
    for uid, (tokens, p) in zip(uids, requests, strict=True):
        assert_same_greedy(alone(loaded, tokens, p), results[uid])
    for uid, shape in [(uids[0], FLAT), (uids[2], NESTED)]:
        assert finished[uid] == "stop", text_of(loaded, results[uid])
        check_schema(json.loads(text_of(loaded, results[uid])), shape)
    text = text_of(loaded, results[uids[3]])
    assert finished[uids[3]] == "stop" and text.startswith("<tool_call>") and text.endswith("</tool_call>")
    check_schema(json.loads(text.removeprefix("<tool_call>").removesuffix("</tool_call>")), TOOL_CALL)
    state = batcher.state()
    assert not state.sequences and not state.slot_rows  # nothing left behind


def test_n_choices_and_a_sequence_leaving_mid_way(
    loaded: LoadedModel, closing_bias: tuple[tuple[int, float], ...]
) -> None:
    """``n = 3`` constrained choices (each its own matcher) next to others; one constrained sequence leaves
    after a few tokens (rows shift under the mask) and the rest still decode as alone."""
    t1, t2, t3 = prompt(loaded, "first"), prompt(loaded, "three choices"), prompt(loaded, "leaves early")
    p1 = params(30)
    p2 = params(40, schema(FLAT), n=3)
    p3 = params(40, schema(NESTED))
    batcher = Batcher(loaded, max_running=8)
    (u1,) = batcher.insert(t1, loaded.make_cache(), p1, t1)
    many = batcher.insert(t2, loaded.make_cache(), p2, t2)
    (u3,) = batcher.insert(t3, loaded.make_cache(), p3, t3)
    results: dict[int, Decode] = {}
    finished: dict[int, str] = {}
    for _ in drive(batcher, results, finished):
        if len(results.get(u3, [])) == 5 and u3 not in finished:
            batcher.remove([u3])
            finished[u3] = "removed"
    assert_same_greedy(alone(loaded, t1, p1), results[u1])
    ref = alone(loaded, t2, replace(p2, n=1))
    for uid in many:
        assert_same_greedy(ref, results[uid])
    assert len(results[u3]) == 5
    assert_same_greedy(alone(loaded, t3, replace(p3, max_tokens=5)), results[u3])
    state = batcher.state()
    assert not state.sequences and not state.slot_rows


def test_the_batch_masks_constrained_rows_at_once(loaded: LoadedModel, monkeypatch: pytest.MonkeyPatch) -> None:
    """Constrained rows carry no per-row processor (no row-by-row loop) and each step masks all rows in one
    call."""
    calls: list[int] = []
    original = BatchMasker.apply

    def counted(self: BatchMasker, logits: mx.array, rows: Any) -> mx.array:
        calls.append(sum(r is not None for r in rows))
        return original(self, logits, rows)

    monkeypatch.setattr(BatchMasker, "apply", counted)
    batcher = Batcher(loaded, max_running=8)
    tokens = prompt(loaded, "JSON please")
    batcher.insert(tokens, loaded.make_cache(), params(12), tokens)  # the lane, unconstrained
    batcher.insert(tokens, loaded.make_cache(), params(12, schema(FLAT), n=4), tokens)
    results: dict[int, Decode] = {}
    steps = drive(batcher, results, {})
    while batcher.running < 5:
        next(steps)
    next(steps)
    state = batcher.state()
    assert state.processed == 0  # no row-by-row processing
    assert state.constrained == 4
    for _ in steps:
        pass
    assert calls and max(calls) == 4  # one call for all four constrained rows


def test_masker_leaves_unconstrained_rows_and_bars_padding(loaded: LoadedModel) -> None:
    grammars = loaded.tokenizer.grammars
    matcher = grammars.matcher(schema(FLAT))
    width = loaded.vocab_size + 40  # a padded vocabulary
    logits = mx.random.normal((3, 1, width))
    masked = BatchMasker().apply(logits, [None, matcher, None])
    assert mx.array_equal(masked[0], logits[0]) and mx.array_equal(masked[2], logits[2])
    single = matcher.apply(logits[1, 0])
    assert mx.array_equal(masked[1, 0], single)
    assert mx.all(mx.isinf(masked[1, 0, loaded.vocab_size :])).item()
