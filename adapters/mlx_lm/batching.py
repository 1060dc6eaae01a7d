"""Continuous batching for one model on mlx-lm's ``BatchGenerator``.

Each sequence (one choice of one request) brings its own cache (a fresh one or its own view of a named
prefix cache), its own sampler with its own random key, and its own logits processors. Requests join
and leave between steps; a step decodes one token for every running sequence and prefills one chunk
of the waiting ones, so a long prompt delays the others by at most one chunk.

mlx-lm prefills all but a prompt's last token and feeds that token in a decode pass of its own, so the
first token costs two forward passes. A single arrival whose prompt fits in one chunk, with no other
sequence waiting, is prefilled here in one pass instead: its first token comes from the last position,
and it joins the batch with that token (on a prefix-cache hit the second pass was most of the gap
between time to first token and one forward pass over the question).
"""

from __future__ import annotations

import copy
import logging
import time
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


def _sampled(params: SamplingParams, token: int, logprobs: mx.array) -> SampledToken:
    """The token with the log-probabilities the request asked for (each lookup waits on the device)."""
    chosen: float | None = None
    top: tuple[tuple[int, float], ...] = ()
    if params.logprobs:
        lp = logprobs.reshape(-1)
        arrays = [lp[token]]
        if params.top_logprobs:
            k = min(params.top_logprobs, lp.shape[-1])
            ids = mx.argpartition(-lp, k - 1)[:k]
            arrays += [ids, lp[ids]]
        mx.eval(*arrays)
        chosen = float(arrays[0].item())  # type: ignore[arg-type]
        if len(arrays) == 3:
            pairs = zip(arrays[1].tolist(), arrays[2].tolist(), strict=True)  # type: ignore[arg-type]
            top = tuple(sorted(pairs, key=lambda t: -t[1]))  # type: ignore[arg-type]
    return SampledToken(token, chosen, top)


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
        self._waiting: set[int] = set()  # inserted, no token out yet (mlx-lm prefills them)
        self._early: list[SequenceOut] = []  # first tokens of sequences prefilled alone
        # (prompt tokens, seconds) of the last step's prefill chunk when it was long enough to time.
        self.prompt_sample: tuple[int, float] | None = None

    @property
    def busy(self) -> bool:
        return bool(self._wants or self._early)

    def insert(self, prompt: list[int], cache: list[Any], params: SamplingParams) -> list[int]:
        """Queue ``params.n`` sequences continuing ``cache`` with ``prompt``; their uids."""
        n = params.n
        step = self.loaded.spec.prefill_step_size or 512
        if n == 1 and not self._waiting and len(prompt) <= step:
            return [self._prefill_alone(prompt, cache, params)]
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
        self._waiting.update(uids)
        return list(uids)

    def _prefill_alone(self, prompt: list[int], cache: list[Any], params: SamplingParams) -> int:
        """One pass over the whole prompt; the first token from its last position; then into the batch."""
        loaded = self.loaded
        sampler = _sampler(params, choice_keys(params.seed, 1)[0])
        processors = _processors(params, loaded.vocab_size)
        started = time.perf_counter()
        with mx.stream(self.gen.stream):
            logits = loaded.model(mx.array(prompt)[None], cache=cache)[:, -1, :]
            context = mx.array(prompt)
            for process in processors:
                logits = process(context, logits)
            logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
            token = int(sampler(logprobs).item())  # type: ignore[arg-type]
        if len(prompt) >= MIN_PREFILL_SAMPLE_TOKENS:
            self.prompt_sample = (len(prompt), time.perf_counter() - started)
        finish = "stop" if token in loaded.tokenizer.eos_token_ids else "length" if params.max_tokens <= 1 else None
        # The batch continues from the sampled token (its cache already holds the prompt).
        (uid,) = self.gen.insert(
            [[token]],
            max_tokens=[max(1, params.max_tokens - 1)],
            caches=[cache],
            all_tokens=[[]],
            samplers=[sampler],
            logits_processors=[processors],
        )
        if finish is None:
            self._wants[uid] = params
        else:
            self.gen.remove([uid])
        self._early.append(SequenceOut(uid, _sampled(params, token, logprobs[0]), finish, cache if finish else None))
        return uid

    def remove(self, uids: list[int]) -> None:
        live = [u for u in uids if u in self._wants]
        if live:
            self.gen.remove(live)
        for u in live:
            self._wants.pop(u, None)
            self._waiting.discard(u)
        gone = set(uids)
        self._early = [o for o in self._early if o.uid not in gone]

    def step(self) -> list[SequenceOut]:
        """One batched decode step plus one prefill chunk; the tokens it produced.

        First tokens of sequences prefilled alone go out at once, before the batch takes its step.
        """
        if self._early:
            out, self._early = self._early, []
            return out
        self.prompt_sample = None
        with self.gen.stats() as stats:
            _, responses = self.gen.next()
        if stats.prompt_tokens >= MIN_PREFILL_SAMPLE_TOKENS:
            self.prompt_sample = (stats.prompt_tokens, stats.prompt_time)
        out = []
        for r in responses:
            params = self._wants.get(r.uid)
            if params is None:
                continue
            self._waiting.discard(r.uid)
            if r.finish_reason is not None:
                self._wants.pop(r.uid, None)
            out.append(SequenceOut(r.uid, _sampled(params, int(r.token), r.logprobs), r.finish_reason, r.prompt_cache))
        return out

    def close(self) -> None:
        self.gen.close()
