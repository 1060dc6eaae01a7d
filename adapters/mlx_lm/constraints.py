"""Grammar-constrained decoding: masks that keep a sequence's tokens inside a JSON schema or Lark grammar.

Compiling and validating constraints is :class:`adapters.grammar.GrammarCompiler` (no MLX: planning uses it
too); this module adds what decoding needs. A compiled grammar is copied per sequence in microseconds, and
the mask for the next token is computed on the CPU in tens of microseconds straight into a preallocated
bitmask. That bitmask (one bit per token id, 32 ids a word) goes to MLX once per step and is unpacked and
applied there, so no Python loop ever runs over the vocabulary.

Thread model: compiling and checking may run on any thread (planning calls them);
:meth:`MaskingGrammarCompiler.matcher` and everything on :class:`GrammarMatcher` run on the engine thread.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import cast

import llguidance as llg
import mlx.core as mx
import numpy as np

from adapters.base import OutputConstraint
from adapters.grammar import GrammarCompiler

__all__ = [
    "BatchMasker",
    "GrammarMatcher",
    "LogitsProcessor",
    "MaskingGrammarCompiler",
]

LogitsProcessor = Callable[[mx.array, mx.array], mx.array]


class MaskingGrammarCompiler(GrammarCompiler):
    """The model's grammar compiler (and its cache), which also hands out per-sequence matchers."""

    def matcher(self, constraint: OutputConstraint) -> GrammarMatcher:
        """A fresh matcher for one sequence (a copy of the cached grammar). Engine thread."""
        compiled = self.compile(constraint)
        return GrammarMatcher(compiled.template.deep_copy(), self._tokenizer.vocab_size, self.vocab_size, self._eos)


class GrammarMatcher:
    """One sequence's position in its grammar, and the mask for its next token.

    Use :meth:`processor` as an mlx-lm logits processor, or :meth:`apply` then :meth:`advance` from a
    sampler of your own. Once the grammar is complete (or the matcher failed), only EOS is allowed.
    """

    def __init__(self, matcher: llg.LLMatcher, tokenizer_vocab: int, vocab_size: int, eos_token_ids: list[int]) -> None:
        self._matcher = matcher
        self._eos = eos_token_ids
        self._fill_bytes = 4 * ((tokenizer_vocab + 31) // 32)  # llguidance writes exactly this much
        self._words = (max(vocab_size, tokenizer_vocab) + 31) // 32
        # Filled in place every step; words past the tokenizer's ids stay zero (disallowed).
        self._mask = np.zeros(self._words, dtype=np.uint32)
        # Made here, on the engine thread: a lazy array made at import belongs to the importing thread's
        # stream, and evaluating it on another thread fails ("There is no Stream(cpu, 0) in current thread").
        self._shifts = mx.arange(32, dtype=mx.uint32)

    @property
    def error(self) -> str | None:
        """Why the matcher stopped accepting tokens (a token outside the grammar was forced), or None."""
        return self._matcher.get_error() or None if self._matcher.is_error() else None

    @property
    def done(self) -> bool:
        """The grammar is complete: the next token must be EOS."""
        return self._matcher.is_stopped()

    def advance(self, token: int) -> None:
        """Move past ``token``, the one sampled last. A token the grammar forbids leaves only EOS allowed."""
        self._matcher.consume_token(token)

    def apply(self, logits: mx.array) -> mx.array:
        """``logits`` (``(vocab,)`` or ``(rows, vocab)``) with every token the grammar forbids at -inf."""
        width = logits.shape[-1]
        if width > 32 * self._words:  # logits wider than we planned for: grow, the extra ids stay zero
            self._words = (width + 31) // 32
            self._mask = np.zeros(self._words, dtype=np.uint32)
        self._fill()
        words = mx.array(self._mask)  # one copy of (vocab / 8) bytes per step
        allowed = ((words[:, None] >> self._shifts) & 1).reshape(-1)[:width].astype(mx.bool_)
        return mx.where(allowed, logits, mx.array(-mx.inf, dtype=logits.dtype))

    def processor(self) -> LogitsProcessor:
        """An mlx-lm logits processor ``(tokens, logits) -> logits`` for this sequence.

        On the first call ``tokens`` is the prompt; on each later call its last entry is the token sampled
        at the previous step, which the matcher consumes before masking.
        """
        started = False

        def process(tokens: mx.array, logits: mx.array) -> mx.array:
            nonlocal started
            if started:
                # The mask needs the token sampled last, so reading it waits for the device. Queue that
                # token first, then this step's forward pass behind it: the device computes the pass while
                # the CPU reads the token and fills the mask. (Reading the token with nothing queued
                # leaves the device idle while the CPU works; queueing the pass before the token's own
                # slice made the read wait for the whole pass.)
                last = tokens[-1]
                mx.async_eval(last)
                mx.async_eval(logits)
                self.advance(cast(int, last.item()))
            started = True
            return self.apply(logits)

        return process

    def _fill(self) -> None:
        if self._matcher.is_error():
            self._only_eos(self._mask)
            return
        self._matcher.unsafe_compute_mask_ptr(self._mask.ctypes.data, self._fill_bytes)

    def _only_eos(self, words: np.ndarray) -> None:
        words[:] = 0
        for eos in self._eos:
            words[eos // 32] |= np.uint32(1 << (eos % 32))


class BatchMasker:
    """The masks of many sequences' next tokens at once, for one step of a batch.

    llguidance fills every constrained row's bitmask in one call (in parallel, on its own threads, without
    the GIL); the (rows, words) bitmask goes to MLX in one copy and is unpacked and applied in one
    ``mx.where``. Per-row work stays on the CPU side and is small: no per-row MLX ops, no per-row sync.
    Engine thread only.
    """

    def __init__(self, threads: int | None = None) -> None:
        self._executor = llg.LLExecutor(threads)
        self._shifts: mx.array | None = None  # made on first use, on the engine thread (see GrammarMatcher)

    def apply(self, logits: mx.array, rows: Sequence[GrammarMatcher | None]) -> mx.array:
        """``logits`` (``(rows, ..., vocab)``) with every token each row's grammar forbids at -inf.

        Args:
            logits: one leading entry per row; the last axis is the vocabulary (it may be wider than the
                tokenizer: padding ids are never allowed in a constrained row).
            rows: each row's matcher, already advanced past the row's last token; None leaves a row as it is.
        """
        constrained = [(i, m) for i, m in enumerate(rows) if m is not None]
        if not constrained:
            return logits
        width = logits.shape[-1]
        fill_bytes = constrained[0][1]._fill_bytes
        filled = fill_bytes // 4
        words = max(filled, (width + 31) // 32)
        fill = np.empty((len(constrained), filled), dtype=np.uint32)
        parallel = []
        for k, (_, m) in enumerate(constrained):
            if m._fill_bytes != fill_bytes:
                raise ValueError("matchers of one batch must share one tokenizer")
            if m._matcher.is_error():
                m._only_eos(fill[k])
            else:
                parallel.append((m._matcher, k))
        if len(parallel) == 1:  # one row: fill it here (handing one fill to the thread pool costs more)
            matcher, k = parallel[0]
            matcher.unsafe_compute_mask_ptr(fill[k].ctypes.data, fill_bytes)
        elif parallel:
            # llguidance checks that one mask is exactly its tokenizer's size, and writes row k at k * size.
            self._executor.unsafe_compute_mask_ptr(parallel, fill.ctypes.data, fill_bytes, len(constrained))
        mask = np.full((len(rows), words), 0xFFFFFFFF, dtype=np.uint32)  # unconstrained rows: all allowed
        index = [i for i, _ in constrained]
        mask[index] = 0  # ids past the tokenizer's stay disallowed in constrained rows
        mask[index, :filled] = fill
        if self._shifts is None:
            self._shifts = mx.arange(32, dtype=mx.uint32)
        bits = mx.array(mask)  # the one host->device copy of the step
        allowed = ((bits[:, :, None] >> self._shifts) & 1).reshape(len(rows), -1)[:, :width].astype(mx.bool_)
        allowed = allowed.reshape(len(rows), *([1] * (logits.ndim - 2)), width)
        return mx.where(allowed, logits, mx.array(-mx.inf, dtype=logits.dtype))
