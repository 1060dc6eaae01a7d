"""Continuous batching for one model: our own decode loop on slot KV (:mod:`adapters.mlx_lm.slot_kv`).

Each sequence (one choice of one request) brings its own cache (a fresh one or its own view of a named
prefix cache), its own sampler with its own random key, and its own logits processors. A step does three
things, in this order:

1. **Arrivals.** Prompts waiting at the head of the queue are prefilled: those that continue caches of one
   length (fresh ones, or views of one prefix) and fit one chunk go through the model together, right-padded
   with a causal mask (no array mask: every real position only sees real positions before it); a longer
   prompt is prefilled alone, one chunk per step (:func:`~adapters.mlx_lm.prefill.prefill_chunk`), so that it
   delays the running batch by at most one chunk.
   A prefilled prompt's first token is sampled from its last position (no extra pass), its KV is copied
   into a free slot of the batch, and the token becomes that slot's input for the decode step that follows.
2. **Decode.** One forward pass of every slot (free ones masked out), logits processors and grammar masks,
   sampling for the whole batch (greedy rows in one argmax, unseeded rows of one setting in one draw; a
   seeded row draws with its own key and stays in the batch), and the log-probabilities the rows asked for,
   gathered in one go. The step is queued (``mx.async_eval``) and its tokens become the next step's inputs
   without being read.
3. **Reading.** Only then are the previous step's tokens read: the device computes this step while the host
   detokenises, checks stop strings and sends events for the last one (as mlx-lm's generator does).

A sequence that ends (EOS, ``max_tokens``, a stop string, a cancellation) frees its slot at once: nothing is
copied, and the step already queued computes one token for it that nobody reads. Its cache is copied out of
the slot only when its insert asked for it (automatic reuse, a recomputed prefix).

**Admission always makes progress.** A request's ``n`` sequences join in parts of at most ``max_running``
(each part prefilled on its own copy of the request's cache; parts of one length go through the model
together), so no arrival can need more slots than the batch has. Waiting arrivals are taken tenant by
tenant, the tenant holding the fewest slots first, and an arrival that does not fit (slots, or the KV budget
below) holds the ones behind it back until it does, so a large one is never starved by small ones. When a
tenant below its fair share (``max_running`` over the tenants running or waiting) waits for slots that a
tenant above its share holds, sequences of the latter are **preempted**: each one's KV is copied out of its
slot and it waits as an arrival whose prompt is its last token, resuming where it stopped (same sampler,
same processors, same count) when its turn comes. Sequences that keep their cache or follow a grammar are not
preempted (their state lives in the slot and the matcher).

**A KV budget.** Slots are a rectangle: rows times the longest sequence's capacity. An arrival joins only if
the rectangle that running sequences and it could grow to (every sequence at its prompt plus ``max_tokens``)
fits ``LoadedModel.kv_budget`` (``max_running_kv_bytes``); planning refuses a request that could never fit
it alone, so waiting always ends.

A batcher and everything in it (sequences, arrivals, slots) belong to the engine thread; others see only the
counts the engine publishes in its snapshot (``running``, ``waiting``, ``preempted``). The thread that drives
a batch (the engine's, or a test's or benchmark's) reads its figures as one :class:`BatchState`.

Grammars (structured output) are masked batch-wide: before a step's mask is built each constrained row's
matcher consumes the token that row is fed, read from the device while the step's forward pass runs; all
masks are filled in one llguidance call and applied with one ``mx.where`` (:class:`BatchMasker`).
"""

from __future__ import annotations

import itertools
import logging
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import mlx.core as mx
from mlx_lm.models.cache import KVCache

from adapters.base import SamplingParams, kv_bytes_at_most
from adapters.mlx_lm.constraints import BatchMasker, GrammarMatcher
from adapters.mlx_lm.models import LoadedModel
from adapters.mlx_lm.prefill import prefill_chunk, prefill_step
from adapters.mlx_lm.sampling import (
    Processor,
    SampledToken,
    Sampler,
    choice_keys,
    gather_logprobs,
    logits_processors,
    read_sampled,
    token_sampler,
)
from adapters.mlx_lm.slot_kv import SlotBatch, capacity_for

__all__ = ["BatchState", "Batcher", "SequenceOut"]

# Prompt tokens (padding included) that arrivals prefilled together may bring to one pass, in chunks.
PREFILL_TOGETHER_CHUNKS = 4

logger = logging.getLogger(__name__)

_NO_PARAMS = SamplingParams(max_tokens=1)


@dataclass(frozen=True)
class SequenceOut:
    uid: int
    sampled: SampledToken
    finish_reason: str | None  # "stop" (an EOS token) | "length" | None
    cache: list[Any] | None = None  # the sequence's own KV, once it finished (when its insert asked)


@dataclass(frozen=True)
class BatchState:
    """What a batch holds at one moment, as plain figures (tests and benchmarks check a batch with it)."""

    sequences: int  # not yet ended: decoding, waiting or preempted
    running: int  # decoding in slots
    waiting: int  # waiting for a slot (new, or preempted)
    slot_rows: int  # rows of slot KV held (0: none held, the KV freed)
    slot_capacity: int  # positions per row (0: none held)
    occupied: tuple[int, ...]  # the slots in use, by index
    constrained: int  # sequences following a grammar (masked batch-wide)
    processed: int  # sequences whose logits go through their own processors, row by row


@dataclass(eq=False)
class _Seq:
    """One sequence: how it samples, and where it decodes."""

    uid: int
    params: SamplingParams
    sampler: Sampler
    processors: list[Processor]
    matcher: GrammarMatcher | None
    keep: bool
    seeded: bool
    model: LoadedModel  # the batch's model, or a view of it with an adapter
    tenant: str = ""
    count: int = 0  # tokens read so far
    slot: int | None = None
    # Preempted: the arrival it waits in to resume (its prompt is its last token, once that is read).
    parked: _Arrival | None = None
    final: int = 0  # the most positions its KV can reach (prompt + max_tokens)

    @property
    def adapter(self) -> int:
        """Its adapter's index in the model's bank (0: the base model)."""
        return self.model.adapter

    @property
    def preemptible(self) -> bool:
        return not self.keep and self.matcher is None and self.slot is not None


@dataclass(eq=False)
class _Arrival:
    """One request's prompt on its way into the batch; its ``n`` sequences join together."""

    seqs: list[_Seq]
    prompt: list[int]  # the tokens to prefill into ``cache`` (empty: a preempted one's last token, not yet read)
    cache: list[Any]
    context: mx.array  # the whole prompt (a processor's first call sees it)
    model: LoadedModel  # the batch's model, or a view of it with an adapter
    tenant: str = ""
    order: int = 0  # arrival order: first come, first served within a tenant
    done: int = 0  # prompt tokens prefilled so far

    @property
    def offset(self) -> int:
        return int(self.cache[0].offset)


@dataclass(eq=False)
class _Launched:
    """A queued sampling (a decode step's, or arrivals' first tokens): row by row, whose token it is."""

    seqs: list[_Seq | None]
    tokens: mx.array
    logprob_rows: list[int] = field(default_factory=list)
    logprob_arrays: list[mx.array] = field(default_factory=list)


class Batcher:
    """One model's continuous batch."""

    def __init__(self, loaded: LoadedModel, max_running: int, kv_budget: int | None = None) -> None:
        self.loaded = loaded
        self.max_running = max_running
        # None: no budget (bench and unit tests that drive a batch directly).
        self.kv_budget = kv_budget
        self._eos = set(loaded.tokenizer.eos_token_ids)
        self._uids = itertools.count()
        self._orders = itertools.count()
        self._seqs: dict[int, _Seq] = {}  # every sequence not yet ended, by uid
        self._arrivals: deque[_Arrival] = deque()
        self._slots: SlotBatch | None = None
        self._rows: list[_Seq | None] = []  # the sequence in each slot
        self._inputs = mx.zeros((0,), mx.int32)  # each slot's next input token (lazy)
        self._pending: _Launched | None = None  # the decode step queued last, not yet read
        self._masker: BatchMasker | None = None
        # (prompt tokens, seconds) of each prefill chunk the last step ran and waited for.
        self.prefill_timings: list[tuple[int, float]] = []
        # Whether the last step queued a decode step; whether it did anything at all (prefill, decode, read).
        self.decoded = False
        self.worked = False
        self.preempted = 0  # sequences preempted so far (fair share)
        self.early_count = 0  # first tokens the last step handed out early

    @property
    def step_size(self) -> int:
        """The model's prefill chunk (read at each use: a spec replaced on the loaded model takes effect)."""
        return prefill_step(self.loaded)

    @property
    def busy(self) -> bool:
        return bool(self._seqs) or self._pending is not None

    @property
    def running(self) -> int:
        """Sequences decoding in slots."""
        return sum(s is not None for s in self._rows)

    @property
    def waiting(self) -> int:
        """Sequences waiting for a slot (new, or preempted)."""
        return sum(len(a.seqs) for a in self._arrivals)

    def state(self) -> BatchState:
        """The batch's figures now (engine thread, or the thread driving the batch)."""
        slots = self._slots
        seqs = list(self._seqs.values())
        return BatchState(
            sequences=len(seqs),
            running=self.running,
            waiting=self.waiting,
            slot_rows=slots.rows if slots is not None else 0,
            slot_capacity=slots.capacity if slots is not None else 0,
            occupied=tuple(s.slot for s in self._rows if s is not None and s.slot is not None),
            constrained=sum(s.matcher is not None for s in seqs),
            processed=sum(bool(s.processors) for s in seqs),
        )

    def held(self) -> Counter[str]:
        """Slots held per tenant."""
        return Counter(s.tenant for s in self._rows if s is not None)

    # ---- arrivals -------------------------------------------------------------------------------

    def insert(
        self,
        prompt: list[int],
        cache: list[Any],
        params: SamplingParams,
        context: Sequence[int],
        keep_cache: bool = False,
        tenant: str = "",
        model: LoadedModel | None = None,
    ) -> list[int]:
        """Queue ``params.n`` sequences continuing ``cache`` (empty: a fresh one) with ``prompt``; their uids.
        ``context`` is the whole prompt, the part already in ``cache`` included (a repetition penalty covers
        it). With ``keep_cache``, the first sequence's finish carries its KV. The sequences join in parts of
        at most ``max_running``, each on its own copy of ``cache``. ``model``: a view of the batch's model with
        one of its adapters (None: the model itself); each row of a pass runs its own."""
        model = model or self.loaded
        if not prompt:
            raise ValueError("a sequence needs at least one prompt token to prefill")
        final = len(context) + params.max_tokens
        seqs = []
        for i, key in enumerate(choice_keys(params.seed, params.n)):
            matcher = None
            if params.constraint is not None:
                matcher = self.loaded.tokenizer.grammars.matcher(params.constraint)
                if self._masker is None:
                    self._masker = BatchMasker()
            processors = logits_processors(params, self.loaded.vocab_size, context, matcher=matcher)
            if matcher is not None:  # the batch masks grammars itself: drop the per-row processor (last)
                processors = processors[:-1]
            seq = _Seq(
                next(self._uids),
                params,
                token_sampler(params, key),
                processors,
                matcher,
                keep=keep_cache and i == 0,
                seeded=params.seed is not None and params.temperature > 0.0,
                tenant=tenant,
                final=final,
                model=model,
            )
            self._seqs[seq.uid] = seq
            seqs.append(seq)
        whole = mx.array(list(context))
        size = self._part_size(final, kv_bytes_at_most(len(context), params.max_tokens, self.loaded.kv_bytes_per_token))
        for start in range(0, len(seqs), size):
            part = seqs[start : start + size]
            own = (cache if start == 0 else _copy_cache(cache)) if cache else self.loaded.make_cache()
            self._arrivals.append(_Arrival(part, list(prompt), own, whole, model, tenant, next(self._orders)))
        return [s.uid for s in seqs]

    def _part_size(self, final: int, row: int) -> int:
        """The most sequences of ``final`` positions (``row`` bytes of slots each) that join together: at most
        ``max_running``, and as many as the KV budget holds in an otherwise empty batch (rows double, as
        ``_free_slot`` grows them).

        Raises:
            ValueError: not even one fits the budget (planning refuses such requests: it would wait forever).
        """
        if self.kv_budget is None:
            return self.max_running
        if row > self.kv_budget:
            raise ValueError(
                f"a sequence of {final} positions needs {row} bytes of KV, over the budget {self.kv_budget}"
            )
        size, rows = 1, 1
        while size < self.max_running:
            grown = min(self.max_running, 2 * rows)
            if grown * row > self.kv_budget:
                break
            size = rows = grown
        return size

    def _prefill(self) -> _Launched | None:
        """One pass over waiting prompts (see the module's docstring); the first tokens of those it finished."""
        group = self._next_group()
        if not group:
            return None
        if len(group) == 1:
            return self._chunk(group[0])
        return self._together(group)

    def _queue(self) -> list[_Arrival]:
        """Arrivals ready to prefill, in the order they are taken: by the slots their tenant holds (fewest
        first), then first come first served. A long prompt part-prefilled keeps its place in that order, so
        another tenant's short prompt need not wait for all of its chunks."""
        held = self.held()
        ready = [a for a in self._arrivals if a.prompt]
        return sorted(ready, key=lambda a: (held[a.tenant], a.order))

    def _next_group(self) -> list[_Arrival]:
        """Arrivals at the head of the queue that fit the batch and go through the model together."""
        room = self.max_running - self.running
        group: list[_Arrival] = []
        budget = self.step_size * PREFILL_TOGETHER_CHUNKS
        for arrival in self._queue():
            if len(arrival.seqs) > room or not self._kv_fits([*group, arrival]):
                break  # it waits for room, and holds back those behind it (never starved by smaller ones)
            left = len(arrival.prompt) - arrival.done
            if group:
                longest = max(left, *(len(a.prompt) for a in group))
                if (
                    left > self.step_size
                    or arrival.done
                    or arrival.offset != group[0].offset
                    or longest * (len(group) + 1) > budget
                ):
                    break
            group.append(arrival)
            room -= len(arrival.seqs)
            if arrival.done or left > self.step_size:  # a long prompt goes alone, chunk by chunk
                break
        return group

    def _chunk(self, arrival: _Arrival) -> _Launched | None:
        """The next chunk of one prompt, prefilled alone on its own cache."""
        # A batch's caches are plain KV, never quantised (quantised ones run on the sequential path).
        part = prefill_chunk(arrival.model, arrival.prompt, arrival.cache, arrival.done, quantize=False)
        arrival.done = part.done
        if part.seconds is not None:
            self.prefill_timings.append((part.tokens, part.seconds))
        if not part.finished:
            return None
        self._arrivals.remove(arrival)
        return self._join([arrival], part.logits[None], arrival.cache, [arrival.offset])

    def _kv_fits(self, group: list[_Arrival]) -> bool:
        """Whether the slots could hold the running sequences and ``group`` at their longest within the budget:
        rows as the batch would grow to, times the capacity of the longest final length."""
        if self.kv_budget is None:
            return True
        running = [s for s in self._rows if s is not None]
        joining = [s for a in group for s in a.seqs]
        count = len(running) + len(joining)
        rows = self._slots.rows if self._slots is not None else 1
        while rows < min(count, self.max_running):  # as _free_slot grows them
            rows = min(self.max_running, 2 * rows)
        longest = max(s.final for s in [*running, *joining])
        capacity = capacity_for(longest + 1)
        if self._slots is not None:
            capacity = max(capacity, self._slots.capacity)
        return rows * capacity * self.loaded.kv_bytes_per_token <= self.kv_budget

    def _together(self, group: list[_Arrival]) -> _Launched:
        """Arrivals continuing caches of one length, prefilled in one right-padded pass."""
        for arrival in group:
            self._arrivals.remove(arrival)
        offset = group[0].offset
        width = max(len(a.prompt) for a in group)
        cache = self._stacked([a.cache for a in group], offset)
        inputs = mx.array([a.prompt + [0] * (width - len(a.prompt)) for a in group])
        with self.loaded.rows([a.model.adapter for a in group]):
            logits = self.loaded.model(inputs, cache=cache)
        last = mx.array([len(a.prompt) - 1 for a in group])
        logits = mx.take_along_axis(logits, last[:, None, None], axis=1)[:, 0, :]
        return self._join(group, logits, cache, [offset + len(a.prompt) for a in group])

    def _stacked(self, caches: list[list[Any]], offset: int) -> list[Any]:
        """One batched cache over ``caches`` (each ``offset`` tokens long)."""
        if offset == 0:
            return self.loaded.make_cache()
        out = []
        for layers in zip(*caches, strict=True):
            c = KVCache()
            c.keys = mx.concatenate([layer.keys[..., :offset, :] for layer in layers])
            c.values = mx.concatenate([layer.values[..., :offset, :] for layer in layers])
            c.offset = offset
            out.append(c)
        return out

    def _join(self, group: list[_Arrival], logits: mx.array, cache: list[Any], lengths: list[int]) -> _Launched:
        """Sample the first token of every sequence of ``group`` (row ``i`` of ``logits`` and ``cache``:
        arrival ``i``, ``lengths[i]`` tokens), move each sequence's KV into a slot, and feed it that token."""
        seqs: list[_Seq | None] = []
        rows: list[int] = []
        for i, arrival in enumerate(group):
            for seq in arrival.seqs:
                seqs.append(seq)
                rows.append(i)
        picked = logits[mx.array(rows)] if rows != list(range(len(group))) else logits
        contexts = [group[i].context for i in rows]
        launched = self._sample(picked, seqs, lambda k: contexts[k])
        slots = []
        for seq, i in zip(seqs, rows, strict=True):
            assert seq is not None
            slot = self._free_slot(cache, lengths[i])
            self._slots_of().admit(slot, cache, row=i, length=lengths[i])
            seq.slot, seq.parked = slot, None
            self._rows[slot] = seq
            slots.append(slot)
        # A new array: the queued step's tokens (``_pending.tokens``, read later) are this one until now, and
        # a slot freed by a preemption this step is taken again here.
        inputs = mx.array(self._inputs)
        inputs[mx.array(slots)] = launched.tokens
        self._inputs = inputs
        mx.async_eval(launched.tokens, *launched.logprob_arrays)
        return launched

    def _slots_of(self) -> SlotBatch:
        assert self._slots is not None
        return self._slots

    def _free_slot(self, cache: list[Any], length: int) -> int:
        if self._slots is None:  # sized for this sequence: rows double as the batch fills
            self._slots = SlotBatch.like(cache, 1, length + 1)
            self._rows = [None] * self._slots.rows
            self._inputs = mx.zeros((self._slots.rows,), mx.int32)
        slots = self._slots
        slot = slots.free_slot()
        if slot is None:
            rows = min(self.max_running, 2 * slots.rows)
            slot = slots.rows
            slots.grow_rows(rows)
            self._rows += [None] * (rows - len(self._rows))
            self._inputs = mx.concatenate([self._inputs, mx.zeros((rows - self._inputs.shape[0],), mx.int32)])
        return slot

    # ---- fair share -----------------------------------------------------------------------------

    def _share(self) -> None:
        """Preempt sequences of tenants above their fair share while the next arrival, of a tenant below its
        share, waits for slots (see the module's docstring)."""
        queue = self._queue()
        if not queue or self._slots is None:
            return
        held = self.held()
        tenants = set(held) | {a.tenant for a in self._arrivals}
        if len(tenants) < 2:
            return
        fair = max(1, self.max_running // len(tenants))
        head = queue[0]
        need = len(head.seqs) - (self.max_running - self.running)
        if need <= 0 or held[head.tenant] >= fair:
            return
        victims: list[_Seq] = []
        # Latest admitted first (the least decoding lost), from the tenants furthest above their share.
        rows = [s for s in reversed(self._rows) if s is not None and s.preemptible]
        while need > 0:
            tenant, count = held.most_common(1)[0]
            if count <= fair:
                break
            seq = next((s for s in rows if s.tenant == tenant and s not in victims), None)
            if seq is None:
                held[tenant] = 0  # nothing of it can be preempted
                continue
            victims.append(seq)
            held[tenant] -= 1
            need -= 1
        if need > 0:
            return  # preempting would not let the head in: let running sequences finish instead
        for seq in victims:
            self._park(seq)

    def _park(self, seq: _Seq) -> None:
        """Take ``seq`` out of its slot; it waits as an arrival continuing its own KV (the token the queued
        step samples for it becomes its prompt when read)."""
        assert seq.slot is not None and self._slots is not None
        cache = self._slots.extract(seq.slot)
        self._slots.release(seq.slot)
        self._rows[seq.slot] = None
        seq.slot = None
        arrival = _Arrival([seq], [], cache, mx.zeros((0,), mx.int32), seq.model, seq.tenant, next(self._orders))
        seq.parked = arrival
        self._arrivals.append(arrival)
        self.preempted += 1

    # ---- the decode step ------------------------------------------------------------------------

    def _decode(self) -> _Launched | None:
        """Queue one decode step of every slot."""
        slots = self._slots
        if slots is None or not self.running:
            return None
        inputs = self._inputs
        slots.prepare_step()
        with self.loaded.rows([s.adapter if s is not None else 0 for s in self._rows]):
            logits = self.loaded.model(inputs[:, None], cache=slots.layers)[:, -1, :]
        slots.advance()
        rows = list(self._rows)
        if any(s is not None and s.matcher is not None for s in rows):
            # The masks need each constrained row's input token: queue the tokens, then the forward pass
            # behind them, and read the tokens while the device computes the pass.
            mx.async_eval(inputs)
            mx.async_eval(logits)
            fed = cast(list[int], inputs.tolist())
            for seq, token in zip(rows, fed, strict=True):
                if seq is not None and seq.matcher is not None:
                    seq.matcher.advance(token)
        launched = self._sample(logits, rows, lambda i: inputs[i : i + 1])
        self._inputs = launched.tokens
        mx.async_eval(launched.tokens, *launched.logprob_arrays)
        return launched

    def _sample(self, logits: mx.array, seqs: list[_Seq | None], fed: Callable[[int], mx.array]) -> _Launched:
        """Process, mask and sample ``logits`` (one row per entry of ``seqs``; None: a free slot) in as few
        calls as the rows' settings allow; ``fed(i)``: the tokens row ``i``'s processors see."""
        logits = logits.astype(mx.float32)
        processed = [i for i, s in enumerate(seqs) if s is not None and s.processors]
        if processed:
            rows = []
            for i in processed:
                row = logits[i : i + 1]
                for process in cast(_Seq, seqs[i]).processors:
                    row = process(fed(i), row)
                rows.append(row)
            logits[mx.array(processed)] = mx.concatenate(rows)
        if self._masker is not None and any(s is not None and s.matcher is not None for s in seqs):
            logits = self._masker.apply(logits, [s.matcher if s is not None else None for s in seqs])
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        tokens = self._draw(logprobs, seqs)
        want = [i for i, s in enumerate(seqs) if s is not None and s.params.logprobs]
        arrays: list[mx.array] = []
        if want:
            k = max(cast(_Seq, seqs[i]).params.top_logprobs for i in want)
            arrays = gather_logprobs(logprobs, tokens, want, k)
        return _Launched(seqs, tokens, want, arrays)

    @staticmethod
    def _draw(logprobs: mx.array, seqs: list[_Seq | None]) -> mx.array:
        """Every row's token: one call per shared sampler (greedy, or unseeded with one setting), one per
        seeded row (its own key); free rows get whatever the first group draws for them."""
        groups: dict[int, tuple[Sampler, list[int]]] = {}
        for i, seq in enumerate(seqs):
            if seq is not None:
                key = id(seq) if seq.seeded else id(seq.sampler)
                groups.setdefault(key, (seq.sampler, []))[1].append(i)
        if len(groups) == 1:  # one sampler for every row: draw for the whole batch at once, unless it is seeded
            ((sampler, rows),) = groups.values()
            if not cast(_Seq, seqs[rows[0]]).seeded:
                return sampler(logprobs).astype(mx.int32)
        tokens = mx.zeros((len(seqs),), mx.int32)
        for sampler, rows in groups.values():
            idx = mx.array(rows)
            tokens[idx] = sampler(logprobs[idx]).astype(mx.int32)
        return tokens

    # ---- reading and departures -----------------------------------------------------------------

    def _read(self, launched: _Launched) -> list[SequenceOut]:
        """The sequences' tokens of a queued sampling (waits for it); ends those that finished."""
        tokens = cast(list[int], launched.tokens.tolist())
        params = [s.params if s is not None else _NO_PARAMS for s in launched.seqs]
        sampled = read_sampled(params, tokens, launched.logprob_rows, launched.logprob_arrays)
        out = []
        for seq, token in zip(launched.seqs, sampled, strict=True):
            if seq is None or self._seqs.get(seq.uid) is not seq:
                continue  # a free slot, or a sequence that ended after this was queued
            seq.count += 1
            finish = "stop" if token.token in self._eos else "length" if seq.count >= seq.params.max_tokens else None
            cache = None
            if finish is not None:
                if seq.keep and seq.slot is not None:
                    cache = self._slots_of().extract(seq.slot)
                self._end(seq)
            elif seq.parked is not None and seq.slot is None:
                seq.parked.prompt = [token.token]  # preempted: it resumes from the token it was to be fed
                seq.parked.context = mx.array([token.token], mx.int32)
            out.append(SequenceOut(seq.uid, token, finish, cache))
        return out

    def _end(self, seq: _Seq) -> None:
        self._seqs.pop(seq.uid, None)
        if seq.slot is not None and self._slots is not None:
            self._slots.release(seq.slot)
            self._rows[seq.slot] = None
            seq.slot = None
        if seq.parked is not None and seq.parked in self._arrivals:
            self._arrivals.remove(seq.parked)
        seq.parked = None

    def remove(self, uids: list[int]) -> None:
        """End sequences (stopped or cancelled): their slots are free for the next step."""
        for uid in uids:
            seq = self._seqs.get(uid)
            if seq is None:
                continue
            self._end(seq)
            for arrival in list(self._arrivals):
                if seq in arrival.seqs:
                    arrival.seqs.remove(seq)
                    if not arrival.seqs:
                        self._arrivals.remove(arrival)

    def step(self, early: Callable[[list[SequenceOut]], None] | None = None) -> list[SequenceOut]:
        """Arrivals' prefill, one decode step queued, then the tokens of the step queued before it and the
        first tokens of the arrivals that joined. With ``early``, a lone arrival's first tokens are handed to
        it as soon as they are read, before the next decode step is built (and not returned)."""
        self.prefill_timings = []
        self.early_count = 0
        self._share()
        alone = self.running == 0
        first = self._prefill()
        self.worked = first is not None or bool(self.prefill_timings) or self._pending is not None
        out: list[SequenceOut] = []
        if first is not None and alone:
            # Nothing else decodes: the first tokens go out before the next step is built (a lone request's
            # time to first token is one prefill, not one prefill plus building a decode step: 12 against 25
            # ms for a 2K-token hot hit on an H100, 8B shape, issue 20).
            firsts = self._read(first)
            first = None
            if early is not None:
                self.early_count = len(firsts)
                early(firsts)
            else:
                out += firsts
        launched = self._decode()
        self.decoded = launched is not None
        self.worked = self.worked or self.decoded
        if self._pending is not None:
            out += self._read(self._pending)
        self._pending = launched
        if first is not None:
            out += self._read(first)
        if not self._seqs:
            # Idle: free the KV now (nobody reads the step queued for ended rows). Waiting for one more step
            # kept the slots, since the engine steps a batch only while a request is in it: the next request
            # decoded in rows that earlier ones grew, and its last bits depended on them.
            self._pending = None
            self._drop_slots()
        return out

    def _drop_slots(self) -> None:
        self._slots, self._rows, self._inputs = None, [], mx.zeros((0,), mx.int32)

    def close(self) -> None:
        self._seqs.clear()
        self._arrivals.clear()
        self._pending = None
        self._drop_slots()


def _copy_cache(cache: list[Any]) -> list[Any]:
    """Each layer's KV up to its offset, as a cache of its own (generation writes caches in place)."""
    out = []
    for layer in cache:
        c = KVCache()
        offset = int(layer.offset)
        if offset:
            c.keys = mx.array(layer.keys[..., :offset, :])
            c.values = mx.array(layer.values[..., :offset, :])
        c.offset = offset
        out.append(c)
    return out
