"""Logits processing and sampling, one definition for the sequential path and the batch.

OpenAI's semantics where OpenAI defines the field, not mlx-lm's defaults: presence/frequency penalties
count every token generated so far (mlx-lm's look at the last 20), ``logit_bias`` adds to the raw
logits, reported log-probabilities are those of the processed distribution before temperature, and a
``seed`` drives a per-request key (mlx's global RNG would make a request's tokens depend on its
neighbours). Fields OpenAI lacks follow vLLM and Hugging Face: ``repetition_penalty`` covers the prompt
and the generated tokens (mlx-lm's, the last 20 only), and the filters run after temperature, as
``top_k`` -> ``top_p`` -> ``min_p`` (mlx-lm's own ``apply_*`` functions do the filtering).

Processors follow mlx-lm's protocol, ``(tokens, logits (1, vocab)) -> logits``, and are called once per
sampled token with ``tokens`` ending in the token fed last (the prompt's last token on the first call,
then each sampled one). They keep their state as MLX arrays, updated lazily, so the batch's
asynchronous step is not forced to wait on the device.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import cast

import mlx.core as mx
from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p

from adapters.base import SamplingParams
from adapters.mlx_lm.constraints import GrammarMatcher, MaskingGrammarCompiler

__all__ = [
    "ChoiceSampler",
    "Processor",
    "SampledToken",
    "Sampler",
    "choice_keys",
    "gather_logprobs",
    "logits_processors",
    "read_sampled",
    "sampled_token",
    "token_sampler",
]

Processor = Callable[[mx.array, mx.array], mx.array]
Sampler = Callable[[mx.array], mx.array]


@dataclass(frozen=True)
class SampledToken:
    token: int
    logprob: float | None
    top: tuple[tuple[int, float], ...]


def choice_keys(seed: int | None, n: int) -> list[mx.array]:
    """One independent key per choice; the same seed gives the same keys."""
    base = mx.random.key(seed if seed is not None else secrets.randbits(63))
    return list(mx.random.split(base, n)) if n > 1 else [base]


# ---- logits processors -----------------------------------------------------------------------------


def _logit_bias(params: SamplingParams, vocab: int) -> Processor | None:
    """``logit_bias`` added to the logits. Padded vocabularies need no mask here: the loaded model's
    logits already stop at the tokenizer's ids."""
    if not params.logit_bias:
        return None
    bias = mx.zeros((vocab,), dtype=mx.float32)
    bias[mx.array([i for i, _ in params.logit_bias])] = mx.array([b for _, b in params.logit_bias], dtype=mx.float32)
    return lambda _, logits: logits + bias


class _OpenAIPenalties:
    """OpenAI's presence and frequency penalties over every token generated so far."""

    def __init__(self, params: SamplingParams, vocab: int) -> None:
        self._presence, self._frequency = params.presence_penalty, params.frequency_penalty
        self._counts = mx.zeros((vocab,), dtype=mx.float32)
        self._calls = 0

    def __call__(self, tokens: mx.array, logits: mx.array) -> mx.array:
        self._calls += 1
        if self._calls == 1:  # the first call's last token is the prompt's, not a generated one
            return logits
        self._counts = self._counts.at[tokens[-1:]].add(1.0)
        return logits - (self._frequency * self._counts + self._presence * (self._counts > 0))[None]


class _RepetitionPenalty:
    """The CTRL paper's penalty, as vLLM and Hugging Face apply it: every token in the prompt or generated
    so far has its logit divided by the penalty (multiplied when negative)."""

    def __init__(self, penalty: float, prompt: Sequence[int], vocab: int) -> None:
        self._penalty = penalty
        self._seen = mx.zeros((vocab,), dtype=mx.bool_)
        if prompt:
            self._seen[mx.array(list(prompt))] = True

    def __call__(self, tokens: mx.array, logits: mx.array) -> mx.array:
        self._seen[tokens[-1:]] = True  # idempotent for the prompt's last token on the first call
        penalised = mx.where(logits < 0, logits * self._penalty, logits / self._penalty)
        return mx.where(self._seen[None], penalised, logits)


def logits_processors(
    params: SamplingParams,
    vocab: int,
    prompt: Sequence[int],
    grammars: MaskingGrammarCompiler | None = None,
    matcher: GrammarMatcher | None = None,
) -> list[Processor]:
    """A sequence's own processors (each call of this gives fresh state): bias, then penalties, then the
    grammar's mask (last, so that nothing after it can make a forbidden token possible again).

    A constrained sequence's matcher is made from ``grammars``, or is ``matcher`` when the caller keeps
    it to drive it later itself (the batch masks its decode steps batch-wide).
    """
    out: list[Processor] = []
    bias = _logit_bias(params, vocab)
    if bias is not None:
        out.append(bias)
    if params.presence_penalty or params.frequency_penalty:
        out.append(_OpenAIPenalties(params, vocab))
    if params.repetition_penalty != 1.0:
        out.append(_RepetitionPenalty(params.repetition_penalty, prompt, vocab))
    if params.constraint is not None:
        if matcher is None:
            if grammars is None:
                raise ValueError("a constrained request needs its model's grammar compiler")
            matcher = grammars.matcher(params.constraint)
        out.append(matcher.processor())
    return out


# ---- samplers ---------------------------------------------------------------------------------------


def _filtered(logprobs: mx.array, params: SamplingParams) -> mx.array:
    """Temperature, then top_k, top_p and min_p over log-probabilities (rows, vocab)."""
    scaled = logprobs * (1.0 / params.temperature)
    if 0 < params.top_k < scaled.shape[-1]:
        scaled = apply_top_k(scaled, params.top_k)
    if 0.0 < params.top_p < 1.0:
        scaled = apply_top_p(scaled, params.top_p)
    if params.min_p > 0.0:
        scaled = apply_min_p(scaled, params.min_p)
    return scaled


def _greedy(logprobs: mx.array) -> mx.array:
    return mx.argmax(logprobs, axis=-1)


_shared: dict[tuple[float, float, int, float], Sampler] = {}


def _unseeded(params: SamplingParams) -> Sampler:
    """One sampler object per filter setting for requests without a seed.

    BatchGenerator samples the whole batch in one call when every sequence has the same sampler object;
    unseeded requests promise no reproducibility, so they may share mlx's RNG. Seeded ones never do.
    """
    key = (params.temperature, params.top_p, params.top_k, params.min_p)
    if key not in _shared:
        _shared[key] = lambda logprobs: mx.random.categorical(_filtered(logprobs, params))
    return _shared[key]


def token_sampler(params: SamplingParams, key: mx.array) -> Sampler:
    """A sequence's sampler over log-probabilities (rows, vocab); seeded ones own their key."""
    if params.temperature <= 0.0:
        return _greedy
    if params.seed is None:
        return _unseeded(params)
    state = {"key": key}

    def sample(logprobs: mx.array) -> mx.array:
        state["key"], sub = mx.random.split(state["key"])
        return mx.random.categorical(_filtered(logprobs, params), key=sub)

    return sample


def sampled_token(params: SamplingParams, token: int, logprobs: mx.array) -> SampledToken:
    """The token with the log-probabilities the request asked for (waits on the device when it asked)."""
    if not params.logprobs:
        return SampledToken(token, None, ())
    arrays = gather_logprobs(logprobs.reshape(1, -1), mx.array([token]), [0], params.top_logprobs)
    return read_sampled([params], [token], [0], arrays)[0]


def gather_logprobs(logprobs: mx.array, tokens: mx.array, rows: Sequence[int], k: int) -> list[mx.array]:
    """Lazily, for the ``rows`` of a step that asked for log-probabilities: each sampled token's, and the
    ``k`` best ids with theirs (``logprobs``: (rows, vocab); ``tokens``: (rows,))."""
    idx = mx.array(list(rows))
    lp = logprobs[idx]
    arrays = [mx.take_along_axis(lp, tokens[idx][:, None], axis=-1)[:, 0]]
    k = min(k, lp.shape[-1])
    if k:
        ids = mx.argpartition(-lp, k - 1, axis=-1)[:, :k]
        arrays += [ids, mx.take_along_axis(lp, ids, axis=-1)]
    return arrays


def read_sampled(
    params: Sequence[SamplingParams], tokens: Sequence[int], rows: Sequence[int], arrays: Sequence[mx.array]
) -> list[SampledToken]:
    """A step's sampled tokens with the log-probabilities :func:`gather_logprobs` queued for ``rows`` (one
    device round trip for all of them)."""
    out = [SampledToken(t, None, ()) for t in tokens]
    if not rows:
        return out
    values = cast(list[float], arrays[0].tolist())
    top_ids = cast(list[list[int]], arrays[1].tolist()) if len(arrays) == 3 else []
    top_values = cast(list[list[float]], arrays[2].tolist()) if len(arrays) == 3 else []
    for row, i in enumerate(rows):
        top: tuple[tuple[int, float], ...] = ()
        if params[i].top_logprobs:
            pairs = sorted(zip(top_ids[row], top_values[row], strict=True), key=lambda t: -t[1])
            top = tuple(pairs[: params[i].top_logprobs])
        out[i] = SampledToken(tokens[i], float(values[row]), top)
    return out


class ChoiceSampler:
    """One choice of the sequential path: its processors and sampler, fed one logits row per step."""

    def __init__(
        self,
        params: SamplingParams,
        vocab_size: int,
        key: mx.array,
        prompt: Sequence[int],
        grammars: MaskingGrammarCompiler | None = None,
    ) -> None:
        self._params = params
        self._processors = logits_processors(params, vocab_size, prompt, grammars)
        self._sample = token_sampler(params, key)
        self._last = mx.array(list(prompt[-1:]) or [0])

    def __call__(self, logits: mx.array) -> SampledToken:
        """Sample from ``logits`` (shape ``(vocab,)``)."""
        row = logits.astype(mx.float32)[None]
        for process in self._processors:
            row = process(self._last, row)
        logprobs = row - mx.logsumexp(row, axis=-1, keepdims=True)
        token = self._sample(logprobs)
        self._last = token.reshape(1)
        tok = cast(int, token.item())
        return sampled_token(self._params, tok, logprobs[0])
