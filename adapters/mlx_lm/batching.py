"""Continuous batching for one model on mlx-lm's ``BatchGenerator``.

Each sequence (one choice of one request) brings its own cache (a fresh one or its own view of a named
prefix cache), its own sampler with its own random key, and its own logits processors. Requests join
and leave between steps; a step decodes one token for every running sequence and prefills one chunk
of the waiting ones, so a long prompt delays the others by at most one chunk.

mlx-lm prefills all but a prompt's last token and feeds that token in a decode pass of its own (the first
token costs two passes), and it prefills through its batch cache with an explicit attention mask (on an
H100, 8B shape, a 4K-token prompt took ~2.7x the in-process prefill). So one sequence at a time, the
*lane*, is prefilled here on its own plain cache, one chunk per step between the batch's decode steps;
its first token comes from the last position and it joins the batch with that token. Arrivals while the
lane is busy (bursts) go to mlx-lm's batched prefill, which handles many short prompts in few passes.
"""

from __future__ import annotations

import copy
import itertools
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
from mlx_lm.generate import BatchGenerator

from adapters.base import SamplingParams
from adapters.mlx_lm.models import LoadedModel
from adapters.mlx_lm.sampling import (
    Processor,
    SampledToken,
    Sampler,
    choice_keys,
    logits_processors,
    sampled_token,
    token_sampler,
)

__all__ = ["Batcher", "SequenceOut"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SequenceOut:
    uid: int
    sampled: SampledToken
    finish_reason: str | None  # "stop" (an EOS token) | "length" | None
    cache: list[Any] | None = None  # the sequence's own KV, once it finished in the batch


@dataclass
class _Lane:
    """A sequence the batcher prefills itself, one chunk per step, on its own plain KV cache."""

    uid: int
    prompt: list[int]
    cache: list[Any]
    params: SamplingParams
    sampler: Sampler
    processors: list[Processor]
    done: int = 0


class Batcher:
    """One model's continuous batch. Uids are the batcher's own (a lane's sequence has no batch uid yet)."""

    def __init__(self, loaded: LoadedModel, max_running: int) -> None:
        self.loaded = loaded
        self.step_size = loaded.spec.prefill_step_size or 512
        self.gen = BatchGenerator(
            loaded.model,
            stop_tokens=[[t] for t in sorted(loaded.tokenizer.eos_token_ids)],
            completion_batch_size=max_running,
            prefill_batch_size=min(8, max_running),
            prefill_step_size=self.step_size,
        )
        self._uids = itertools.count()
        self._wants: dict[int, SamplingParams] = {}
        self._in_gen: dict[int, int] = {}  # our uid -> the batch generator's
        self._ours: dict[int, int] = {}  # the batch generator's uid -> ours
        self._waiting: set[int] = set()  # in mlx-lm's prefill, no token out yet
        self._lane: _Lane | None = None
        # (prompt tokens, seconds) of each prefill chunk the last step ran.
        self.prefill_timings: list[tuple[int, float]] = []

    @property
    def busy(self) -> bool:
        return bool(self._wants)

    def insert(self, prompt: list[int], cache: list[Any], params: SamplingParams, context: Sequence[int]) -> list[int]:
        """Queue ``params.n`` sequences continuing ``cache`` with ``prompt``; their uids. ``context`` is the
        whole prompt, the part already in ``cache`` included (a repetition penalty covers it)."""
        n = params.n
        vocab = self.loaded.vocab_size
        grammars = self.loaded.tokenizer.grammars if params.constraint is not None else None
        if n == 1 and self._lane is None and not self._waiting:
            uid = next(self._uids)
            sampler = token_sampler(params, choice_keys(params.seed, 1)[0])
            self._lane = _Lane(
                uid, list(prompt), cache, params, sampler, logits_processors(params, vocab, context, grammars)
            )
            self._wants[uid] = params
            return [uid]
        caches = [cache] + [copy.deepcopy(cache) for _ in range(n - 1)]
        keys = choice_keys(params.seed, n)
        gen_uids = self.gen.insert(
            [list(prompt) for _ in range(n)],
            max_tokens=[params.max_tokens] * n,
            caches=caches,
            all_tokens=[[] for _ in range(n)],
            samplers=[token_sampler(params, k) for k in keys],
            logits_processors=[logits_processors(params, vocab, context, grammars) for _ in range(n)],
        )
        uids = [self._adopt(g, params) for g in gen_uids]
        self._waiting.update(uids)
        return uids

    def _adopt(self, gen_uid: int, params: SamplingParams, uid: int | None = None) -> int:
        uid = next(self._uids) if uid is None else uid
        self._in_gen[uid], self._ours[gen_uid] = gen_uid, uid
        self._wants[uid] = params
        return uid

    def _lane_chunk(self) -> SequenceOut | None:
        """Prefill the lane's next chunk; after the last one, its first token (and it joins the batch)."""
        lane = self._lane
        assert lane is not None
        loaded = self.loaded
        chunk = lane.prompt[lane.done : lane.done + self.step_size]
        lane.done += len(chunk)
        started = time.perf_counter()
        with mx.stream(self.gen.stream):
            logits = loaded.model(mx.array(chunk)[None], cache=lane.cache)[:, -1, :]
            if lane.done < len(lane.prompt):
                mx.eval([c.state for c in lane.cache])
                self.prefill_timings.append((len(chunk), time.perf_counter() - started))
                return None
            context = mx.array(lane.prompt)
            for process in lane.processors:
                logits = process(context, logits)
            logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
            token = int(lane.sampler(logprobs).item())  # type: ignore[arg-type]
        self.prefill_timings.append((len(chunk), time.perf_counter() - started))
        self._lane = None
        params = lane.params
        finish = "stop" if token in loaded.tokenizer.eos_token_ids else "length" if params.max_tokens <= 1 else None
        if finish is None:  # the batch continues from the sampled token; the cache already holds the prompt
            (gen_uid,) = self.gen.insert(
                [[token]],
                max_tokens=[params.max_tokens - 1],
                caches=[lane.cache],
                all_tokens=[[]],
                samplers=[lane.sampler],
                logits_processors=[lane.processors],
            )
            self._adopt(gen_uid, params, lane.uid)
        else:
            self._wants.pop(lane.uid, None)
        return SequenceOut(lane.uid, sampled_token(params, token, logprobs[0]), finish, lane.cache if finish else None)

    def remove(self, uids: list[int]) -> None:
        gone = set(uids)
        if self._lane is not None and self._lane.uid in gone:
            self._lane = None
        gen_uids = [self._in_gen.pop(u) for u in uids if u in self._in_gen]
        for g in gen_uids:
            self._ours.pop(g, None)
        if gen_uids:
            self.gen.remove(gen_uids)
        for u in uids:
            self._wants.pop(u, None)
            self._waiting.discard(u)

    def step(self) -> list[SequenceOut]:
        """One prefill chunk of the lane, then one batched decode step (with one chunk of mlx-lm's own
        prefill); the tokens they produced. A lane's first token goes out at once: the batch steps next."""
        self.prefill_timings = []
        if self._lane is not None:
            first = self._lane_chunk()
            if first is not None:
                return [first]
        if not self._in_gen:
            return []
        with self.gen.stats() as stats:
            _, responses = self.gen.next()
        if stats.prompt_tokens:
            self.prefill_timings.append((stats.prompt_tokens, stats.prompt_time))
        out = []
        for r in responses:
            uid = self._ours.get(r.uid)
            params = self._wants.get(uid) if uid is not None else None
            if uid is None or params is None:
                continue
            self._waiting.discard(uid)
            if r.finish_reason is not None:
                self._wants.pop(uid, None)
                self._in_gen.pop(uid, None)
                self._ours.pop(r.uid, None)
            out.append(
                SequenceOut(uid, sampled_token(params, int(r.token), r.logprobs), r.finish_reason, r.prompt_cache)
            )
        return out

    def close(self) -> None:
        self.gen.close()
