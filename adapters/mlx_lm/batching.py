"""Continuous batching for one model on mlx-lm's ``BatchGenerator``.

Each sequence (one choice of one request) brings its own cache (a fresh one or its own view of a named
prefix cache), its own sampler with its own random key, and its own logits processors. Requests join
and leave between steps; a step decodes one token for every running sequence and prefills one chunk
of the waiting ones, so a long prompt delays the others by at most one chunk.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
from mlx_lm.generate import BatchGenerator
from mlx_lm.sample_utils import apply_top_p

from adapters.base import SamplingParams
from adapters.mlx_lm.models import LoadedModel
from adapters.mlx_lm.sampling import SampledToken, choice_keys, logit_bias_vector
from prefix_caches.costs import MIN_PREFILL_SAMPLE_TOKENS

__all__ = ["Batcher", "SequenceOut"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SequenceOut:
    uid: int
    sampled: SampledToken
    finish_reason: str | None  # "stop" (an EOS token) | "length" | None
    cache: list[Any] | None = None  # the sequence's own KV, once it finished in the batch


def _greedy(logprobs: mx.array) -> mx.array:
    return mx.argmax(logprobs, axis=-1)


_shared: dict[tuple[float, float], Callable[[mx.array], mx.array]] = {}


def _unseeded(temperature: float, top_p: float) -> Callable[[mx.array], mx.array]:
    """One sampler object per (temperature, top_p) for requests without a seed.

    BatchGenerator samples the whole batch in one call when every sequence has the same sampler object;
    unseeded requests promise no reproducibility, so they may share mlx's RNG. Seeded ones never do.
    """
    key = (temperature, top_p)
    if key not in _shared:

        def sample(logprobs: mx.array) -> mx.array:
            scaled = logprobs * (1.0 / temperature)
            if 0.0 < top_p < 1.0:
                scaled = apply_top_p(scaled - mx.logsumexp(scaled, axis=-1, keepdims=True), top_p)
            return mx.random.categorical(scaled)

        _shared[key] = sample
    return _shared[key]


def _sampler(params: SamplingParams, key: mx.array) -> Callable[[mx.array], mx.array]:
    """A sequence's sampler over log-probabilities (shape (rows, vocab)); seeded ones own their key."""
    if params.temperature <= 0.0:
        return _greedy
    if params.seed is None:
        return _unseeded(params.temperature, params.top_p)
    state = {"key": key}

    def sample(logprobs: mx.array) -> mx.array:
        scaled = logprobs * (1.0 / params.temperature)
        if 0.0 < params.top_p < 1.0:
            scaled = apply_top_p(scaled - mx.logsumexp(scaled, axis=-1, keepdims=True), params.top_p)
        state["key"], sub = mx.random.split(state["key"])
        return mx.random.categorical(scaled, key=sub)

    return sample


def _processors(params: SamplingParams, vocab: int) -> list[Callable[[mx.array, mx.array], mx.array]]:
    """Logit bias and OpenAI's penalties over generated tokens."""
    out: list[Callable[[mx.array, mx.array], mx.array]] = []
    bias = logit_bias_vector(params, vocab)
    if bias is not None:
        out.append(lambda _, logits: logits + bias)
    if params.presence_penalty or params.frequency_penalty:
        calls = {"n": 0}

        def penalise(context: mx.array, logits: mx.array) -> mx.array:
            # The context ends with the tokens fed so far; the last ``n`` of them are generated ones.
            generated, calls["n"] = calls["n"], calls["n"] + 1
            if generated == 0:
                return logits
            counts = mx.zeros((vocab,), dtype=mx.float32).at[context[-generated:]].add(1.0)
            penalty = params.frequency_penalty * counts + params.presence_penalty * (counts > 0)
            return logits - penalty[None]

        out.append(penalise)
    return out


class Batcher:
    def __init__(self, loaded: LoadedModel, max_running: int) -> None:
        self.loaded = loaded
        step = loaded.spec.prefill_step_size or 512
        self.gen = BatchGenerator(
            loaded.model,
            stop_tokens=[[t] for t in sorted(loaded.tokenizer.eos_token_ids)],
            completion_batch_size=max_running,
            prefill_batch_size=min(8, max_running),
            prefill_step_size=step,
        )
        self._wants: dict[int, SamplingParams] = {}
        # (prompt tokens, seconds) of the last step's prefill chunk when it was long enough to time.
        self.prompt_sample: tuple[int, float] | None = None

    @property
    def busy(self) -> bool:
        return bool(self._wants)

    def insert(self, prompt: list[int], cache: list[Any], params: SamplingParams) -> list[int]:
        """Queue ``params.n`` sequences continuing ``cache`` with ``prompt``; their uids."""
        n = params.n
        caches = [cache] + [copy.deepcopy(cache) for _ in range(n - 1)]
        keys = choice_keys(params.seed, n)
        loaded = self.loaded
        uids = self.gen.insert(
            [list(prompt) for _ in range(n)],
            max_tokens=[params.max_tokens] * n,
            caches=caches,
            all_tokens=[[] for _ in range(n)],
            samplers=[_sampler(params, k) for k in keys],
            logits_processors=[_processors(params, loaded.vocab_size) for _ in range(n)],
        )
        for uid in uids:
            self._wants[uid] = params
        return list(uids)

    def remove(self, uids: list[int]) -> None:
        live = [u for u in uids if u in self._wants]
        if live:
            self.gen.remove(live)
        for u in live:
            self._wants.pop(u, None)

    def step(self) -> list[SequenceOut]:
        """One batched decode step plus one prefill chunk; the tokens it produced."""
        with self.gen.stats() as stats:
            _, responses = self.gen.next()
        long_enough = stats.prompt_tokens >= MIN_PREFILL_SAMPLE_TOKENS
        self.prompt_sample = (stats.prompt_tokens, stats.prompt_time) if long_enough else None
        out = []
        for r in responses:
            params = self._wants.get(r.uid)
            if params is None:
                continue
            chosen: float | None = None
            top: tuple[tuple[int, float], ...] = ()
            if params.logprobs:
                lp = r.logprobs.reshape(-1)
                arrays = [lp[r.token]]
                if params.top_logprobs:
                    k = min(params.top_logprobs, lp.shape[-1])
                    ids = mx.argpartition(-lp, k - 1)[:k]
                    arrays += [ids, lp[ids]]
                mx.eval(*arrays)
                chosen = float(arrays[0].item())  # type: ignore[arg-type]
                if len(arrays) == 3:
                    pairs = zip(arrays[1].tolist(), arrays[2].tolist(), strict=True)  # type: ignore[arg-type]
                    top = tuple(sorted(pairs, key=lambda t: -t[1]))  # type: ignore[arg-type]
            if r.finish_reason is not None:
                self._wants.pop(r.uid, None)
            sampled = SampledToken(int(r.token), chosen, top)
            out.append(SequenceOut(r.uid, sampled, r.finish_reason, r.prompt_cache))
        return out

    def close(self) -> None:
        self.gen.close()
