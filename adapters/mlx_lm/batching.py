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

Departures are deferred. mlx-lm ends a sequence in the step that finishes it, extracting its cache and
filtering every layer of the batch's cache at once; ``BatchKVCache.extract`` and ``.filter`` read the
padding back to the host in every layer, so each departure stalled the pipelined step and then synced once
per layer (an 8B model on an H200: a closed loop of 64 clients, a departure every few steps, ran at 44 ms
a step against 13 for the plain loop). Here mlx-lm never ends a sequence (no stop tokens, no length limit
of its own): the batcher ends them by EOS and max_tokens, the engine by stop strings and cancellation, and
an ended sequence stays in the batch as a row whose tokens nobody reads. Those rows leave together, in one
filter, once they are a quarter of ``max_running``, or have waited 64 steps, or they take the room that
sequences waiting to join need, or nothing else decodes (then at once, in ``remove``). A row costs
little: the decode step is flat from 8 to 128 rows. The cache of a finished sequence is extracted only
when its insert asked for it (automatic reuse, a recomputed prefix).

Grammars (structured output) are masked batch-wide. mlx-lm runs logits processors row by row in Python
(slice, call, concatenate, and for a grammar a device sync per row: ~0.4 ms per constrained row per step
on an H200), so a constrained sequence's grammar processor only serves its first token (the lane's, and
the first step of a sequence joining the batch, where mlx-lm samples from the prompt's logits); from then
on the model that BatchGenerator calls is wrapped, and on each decode step of the running batch the
wrapper reads every row's last token at once, advances each constrained row's matcher, fills all masks in
one llguidance call and applies them with one ``mx.where`` (:class:`BatchMasker`). Masking before the
other processors instead of after them changes nothing: they are elementwise and keep -inf at -inf.
"""

from __future__ import annotations

import copy
import itertools
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import mlx.core as mx
from mlx_lm.generate import BatchGenerator

from adapters.base import SamplingParams
from adapters.mlx_lm.constraints import BatchMasker, GrammarMatcher
from adapters.mlx_lm.models import LoadedModel
from adapters.mlx_lm.sampling import (
    Processor,
    SampledToken,
    Sampler,
    choice_keys,
    logits_processors,
    sampled_token,
    sampled_tokens,
    token_sampler,
)

if TYPE_CHECKING:
    import mlx.nn as nn

__all__ = ["Batcher", "SequenceOut"]

# mlx-lm's own length limit for a sequence: never reached; the batcher and the engine end them.
_NO_LIMIT = 1 << 40
# Decode steps an ended row may wait for others to leave with it.
ENDED_ROWS_MAX_STEPS = 64

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
    matcher: GrammarMatcher | None
    done: int = 0


class _HookedModel:
    """The model as mlx-lm's BatchGenerator calls it, every call's logits passed through ``hook``."""

    def __init__(self, model: Any, hook: Callable[[mx.array, Any, mx.array], mx.array]) -> None:
        self._model = model
        self._hook = hook

    def __call__(self, inputs: mx.array, cache: Any = None, **kwargs: Any) -> mx.array:
        return self._hook(inputs, cache, self._model(inputs, cache=cache, **kwargs))

    def __getattr__(self, name: str) -> Any:  # layers, make_cache, ...: the model's own
        if name.startswith("__") or name in ("_model", "_hook"):
            raise AttributeError(name)
        return getattr(self._model, name)


class Batcher:
    """One model's continuous batch. Uids are the batcher's own (a lane's sequence has no batch uid yet)."""

    def __init__(self, loaded: LoadedModel, max_running: int) -> None:
        self.loaded = loaded
        self.step_size = loaded.spec.prefill_step_size or 512
        self.gen = BatchGenerator(
            cast("nn.Module", _HookedModel(loaded.model, self._mask_decode)),
            stop_tokens=[],
            completion_batch_size=max_running,
            prefill_batch_size=min(8, max_running),
            prefill_step_size=self.step_size,
        )
        self._uids = itertools.count()
        self._wants: dict[int, SamplingParams] = {}
        self._in_gen: dict[int, int] = {}  # our uid -> the batch generator's
        self._ours: dict[int, int] = {}  # the batch generator's uid -> ours
        self._waiting: set[int] = set()  # in mlx-lm's prefill, no token out yet
        # Batch-generator uids of ended sequences still decoding in the batch (their tokens are dropped).
        self._ended: set[int] = set()
        self._counts: dict[int, int] = {}  # tokens each sequence has produced
        self._steps = 0  # decode steps so far
        self._ended_at = 0  # the step since which rows have been waiting to leave
        self._keep: set[int] = set()  # sequences whose cache goes out with their finish
        self.max_running = max_running
        self._eos = set(loaded.tokenizer.eos_token_ids)
        self._lane: _Lane | None = None
        # Constrained sequences, by the batch generator's uid: those whose grammar processor has yet to
        # serve their first step in the batch (with that processor), then those the batch-wide mask drives.
        self._first: dict[int, tuple[GrammarMatcher, Processor]] = {}
        self._grammar: dict[int, GrammarMatcher] = {}
        self._masker: BatchMasker | None = None
        # (prompt tokens, seconds) of each prefill chunk the last step ran.
        self.prefill_timings: list[tuple[int, float]] = []
        # Whether the last step ran a batched decode (a step may only prefill the lane's chunk).
        self.decoded = False

    @property
    def busy(self) -> bool:
        return bool(self._wants)

    def insert(
        self,
        prompt: list[int],
        cache: list[Any],
        params: SamplingParams,
        context: Sequence[int],
        keep_cache: bool = False,
    ) -> list[int]:
        """Queue ``params.n`` sequences continuing ``cache`` with ``prompt``; their uids. ``context`` is the
        whole prompt, the part already in ``cache`` included (a repetition penalty covers it). With
        ``keep_cache``, the first sequence's finish carries its KV."""
        uids = self._insert(prompt, cache, params, context)
        if keep_cache:
            self._keep.add(uids[0])
        return uids

    def _insert(self, prompt: list[int], cache: list[Any], params: SamplingParams, context: Sequence[int]) -> list[int]:
        n = params.n
        if n == 1 and self._lane is None and not self._waiting:
            uid = next(self._uids)
            sampler = token_sampler(params, choice_keys(params.seed, 1)[0])
            processors, matcher = self._processors(params, context)
            self._lane = _Lane(uid, list(prompt), cache, params, sampler, processors, matcher)
            self._wants[uid] = params
            return [uid]
        caches = [cache] + [copy.deepcopy(cache) for _ in range(n - 1)]
        keys = choice_keys(params.seed, n)
        each = [self._processors(params, context) for _ in range(n)]
        gen_uids = self.gen.insert(
            [list(prompt) for _ in range(n)],
            max_tokens=[_NO_LIMIT] * n,
            caches=caches,
            all_tokens=[[] for _ in range(n)],
            samplers=[token_sampler(params, k) for k in keys],
            logits_processors=[processors for processors, _ in each],
        )
        for gen_uid, (processors, matcher) in zip(gen_uids, each, strict=True):
            self._expect_first_step(gen_uid, processors, matcher)
        uids = [self._adopt(g, params) for g in gen_uids]
        self._waiting.update(uids)
        return uids

    def _processors(
        self, params: SamplingParams, context: Sequence[int]
    ) -> tuple[list[Processor], GrammarMatcher | None]:
        """A new sequence's logits processors, and its grammar's matcher (None if unconstrained)."""
        matcher = None
        if params.constraint is not None:
            matcher = self.loaded.tokenizer.grammars.matcher(params.constraint)
        return logits_processors(params, self.loaded.vocab_size, context, matcher=matcher), matcher

    def _expect_first_step(self, gen_uid: int, processors: list[Processor], matcher: GrammarMatcher | None) -> None:
        """A constrained sequence's processor (last in its list) masks its first step in the batch."""
        if matcher is not None:
            self._first[gen_uid] = (matcher, processors[-1])
            if self._masker is None:
                self._masker = BatchMasker()

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
                max_tokens=[_NO_LIMIT],
                caches=[lane.cache],
                all_tokens=[[]],
                samplers=[lane.sampler],
                logits_processors=[lane.processors],
            )
            # The processor has masked this first token without consuming it; it consumes it on the batch's
            # first step with this sequence (the token is that step's input), then the batch-wide mask goes on.
            self._expect_first_step(gen_uid, lane.processors, lane.matcher)
            self._adopt(gen_uid, params, lane.uid)
            self._counts[lane.uid] = 1
        else:
            self._wants.pop(lane.uid, None)
        return SequenceOut(lane.uid, sampled_token(params, token, logprobs[0]), finish, lane.cache if finish else None)

    def remove(self, uids: list[int]) -> None:
        """End sequences (stopped or cancelled). Those decoding in the batch leave it later, all together
        (see the module's docstring)."""
        gone = set(uids)
        if self._lane is not None and self._lane.uid in gone:
            self._lane = None
        now, later = [], []
        for u in uids:
            g = self._in_gen.pop(u, None)
            if g is None:
                continue
            self._ours.pop(g, None)
            self._first.pop(g, None)
            self._grammar.pop(g, None)
            # A sequence still in mlx-lm's prefill has no row in the decoding batch yet.
            (now if u in self._waiting else later).append(g)
        self._ended.update(later)
        self._silence(later)
        if not self._in_gen:  # nothing left decoding: every ended row goes now (an empty filter is cheap)
            now += sorted(self._ended)
            self._ended.clear()
        if now:
            self.gen.remove(now)
        for u in uids:
            self._wants.pop(u, None)
            self._waiting.discard(u)
            self._counts.pop(u, None)
            self._keep.discard(u)

    def _silence(self, gen_uids: list[int]) -> None:
        """Ended rows run no logits processor any more (a grammar past its end would refuse their tokens)."""
        if not gen_uids:
            return
        batch = self.gen._generation_batch
        processors = batch.logits_processors
        ended = set(gen_uids)
        for i, g in enumerate(batch.uids):
            if g in ended and processors is not None:
                processors[i] = []

    def _drop_ended(self) -> None:
        """Ended rows leave in one filter (see the module's docstring for when)."""
        if not self._ended:
            self._ended_at = self._steps
            return
        rows = len(self.gen._generation_batch.uids)
        # mlx-lm admits arrivals into the room max_running leaves; ended rows must not take it from them.
        full = len(self._waiting) > self.max_running - rows
        many = 4 * len(self._ended) >= self.max_running
        if many or full or self._steps - self._ended_at >= ENDED_ROWS_MAX_STEPS:
            self.gen.remove(sorted(self._ended))
            self._ended.clear()

    def step(self) -> list[SequenceOut]:
        """One prefill chunk of the lane, then one batched decode step (with one chunk of mlx-lm's own
        prefill); the tokens they produced. A lane's first token goes out at once: the batch steps next."""
        self.prefill_timings = []
        self.decoded = False
        if self._lane is not None:
            first = self._lane_chunk()
            if first is not None:
                return [first]
        self._drop_ended()
        if not self._in_gen:
            return []
        with self.gen.stats() as stats:
            _, responses = self.gen.next()
        self.decoded = True
        self._steps += 1
        self._grammars_to_batch()
        if stats.prompt_tokens:
            self.prefill_timings.append((stats.prompt_tokens, stats.prompt_time))
        rows = []
        for r in responses:
            uid = self._ours.get(r.uid)
            params = self._wants.get(uid) if uid is not None else None
            if uid is not None and params is not None:
                rows.append((uid, params, r))
        sampled = sampled_tokens(
            [p for _, p, _ in rows], [int(r.token) for *_, r in rows], [r.logprobs for *_, r in rows]
        )
        out = []
        for (uid, params, r), token in zip(rows, sampled, strict=True):
            self._waiting.discard(uid)
            count = self._counts[uid] = self._counts.get(uid, 0) + 1
            finish = "stop" if token.token in self._eos else "length" if count >= params.max_tokens else None
            cache = None
            if finish is not None:
                if uid in self._keep:
                    found = self.gen.extract_cache([r.uid]).get(r.uid)
                    cache = found[0] if found else None
                self.remove([uid])
            out.append(SequenceOut(uid, token, finish, cache))
        return out

    def _grammars_to_batch(self) -> None:
        """Constrained sequences that took their first step in the batch: their grammar processor leaves
        their processor list (mlx-lm's row-by-row loop then skips a sequence that has no other) and the
        batch-wide mask drives their matcher from the next decode step on."""
        if not self._first:
            return
        batch = self.gen._generation_batch  # mlx-lm offers no accessor; pinned by tests/adapters/test_batch_masks.py
        processors = batch.logits_processors
        assert processors is not None
        for i, gen_uid in enumerate(batch.uids):
            first = self._first.pop(gen_uid, None)
            if first is None:
                continue
            matcher, process = first
            processors[i] = [p for p in processors[i] if p is not process]
            self._grammar[gen_uid] = matcher

    def _mask_decode(self, inputs: mx.array, cache: Any, logits: mx.array) -> mx.array:
        """The running batch's decode step (``inputs``: each row's last token, shape (rows, 1)): every
        constrained row's matcher consumes its token, then all rows are masked at once. Other calls of the
        model (prefill chunks, a joining group's first step) pass through."""
        batch = self.gen._generation_batch
        if not self._grammar or cache is not batch.prompt_cache:
            return logits
        rows = [self._grammar.get(g) for g in batch.uids]
        if inputs.shape != (len(rows), 1) or not self._first.keys().isdisjoint(batch.uids):
            raise RuntimeError(f"unexpected decode call: inputs {inputs.shape} for {len(rows)} rows")
        assert self._masker is not None
        # Queue the tokens' read, then this step's forward pass behind it: the device computes the pass
        # while the CPU reads the tokens and fills the masks (one sync per step, not one per row).
        mx.async_eval(inputs)
        mx.async_eval(logits)
        tokens = cast(list[int], inputs.reshape(-1).tolist())
        for matcher, token in zip(rows, tokens, strict=True):
            if matcher is not None:
                matcher.advance(token)
        return self._masker.apply(logits, rows)

    def close(self) -> None:
        self.gen.close()
