"""Per-choice logits processing and sampling with the choice's own random key.

OpenAI's semantics, not mlx-lm's defaults: presence/frequency penalties count every token generated so
far (mlx-lm's look at the last 20), ``logit_bias`` adds to the raw logits, reported log-probabilities
are those of the processed distribution before temperature, and a ``seed`` drives a per-request key
(mlx's global RNG would make a request's tokens depend on its neighbours).
"""

from __future__ import annotations

import secrets
from collections import Counter
from dataclasses import dataclass
from typing import cast

import mlx.core as mx
from mlx_lm.sample_utils import apply_top_p

from adapters.base import SamplingParams

__all__ = ["ChoiceSampler", "SampledToken", "choice_keys", "logit_bias_vector"]


@dataclass(frozen=True)
class SampledToken:
    token: int
    logprob: float | None
    top: tuple[tuple[int, float], ...]


def choice_keys(seed: int | None, n: int) -> list[mx.array]:
    """One independent key per choice; the same seed gives the same keys."""
    base = mx.random.key(seed if seed is not None else secrets.randbits(63))
    return list(mx.random.split(base, n)) if n > 1 else [base]


def logit_bias_vector(params: SamplingParams, vocab_size: int) -> mx.array | None:
    """``logit_bias`` as a dense vector to add to the logits, or None when there is none.

    Padded vocabularies need no mask here: the loaded model's logits already stop at the tokenizer's ids.
    """
    if not params.logit_bias:
        return None
    bias = mx.zeros((vocab_size,), dtype=mx.float32)
    bias[mx.array([i for i, _ in params.logit_bias])] = mx.array([b for _, b in params.logit_bias], dtype=mx.float32)
    return bias


class ChoiceSampler:
    def __init__(self, params: SamplingParams, vocab_size: int, key: mx.array) -> None:
        self._params = params
        self._key = key
        self._counts: Counter[int] = Counter()
        self._bias = logit_bias_vector(params, vocab_size)
        self._penalise = params.presence_penalty != 0.0 or params.frequency_penalty != 0.0

    def __call__(self, logits: mx.array) -> SampledToken:
        """Sample from ``logits`` (shape ``(vocab,)``) and record the token for penalties."""
        p = self._params
        logits = logits.astype(mx.float32)
        if self._bias is not None:
            logits = logits + self._bias
        if self._penalise and self._counts:
            ids = mx.array(list(self._counts.keys()))
            counts = mx.array(list(self._counts.values()), dtype=mx.float32)
            logits = logits.at[ids].add(-(p.frequency_penalty * counts + p.presence_penalty))
        logprobs = logits - mx.logsumexp(logits)
        if p.temperature <= 0.0:
            token = mx.argmax(logprobs)
        else:
            scaled = logprobs * (1.0 / p.temperature)
            if 0.0 < p.top_p < 1.0:
                scaled = apply_top_p(scaled - mx.logsumexp(scaled), p.top_p)
            self._key, sub = mx.random.split(self._key)
            token = mx.random.categorical(scaled, key=sub)
        outputs = [token]
        top_ids = top_vals = chosen = None
        if p.logprobs:
            chosen = logprobs[token]
            outputs.append(chosen)
            if p.top_logprobs > 0:
                k = min(p.top_logprobs, logprobs.shape[-1])
                top_ids = mx.argpartition(-logprobs, k - 1)[:k]
                top_vals = logprobs[top_ids]
                outputs += [top_ids, top_vals]
        mx.eval(*outputs)
        tok = cast(int, token.item())
        self._counts[tok] += 1
        top: tuple[tuple[int, float], ...] = ()
        if top_ids is not None and top_vals is not None:
            pairs = zip(cast(list[int], top_ids.tolist()), cast(list[float], top_vals.tolist()), strict=True)
            top = tuple(sorted(pairs, key=lambda t: -t[1]))
        return SampledToken(tok, cast(float, chosen.item()) if chosen is not None else None, top)
