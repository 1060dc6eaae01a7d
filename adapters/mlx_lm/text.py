"""Tokens to text for one choice: streaming detokenisation, a thinking model's reasoning taken out, stop
strings held back."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from adapters.mlx_lm.reasoning import ReasoningSplit

__all__ = ["StopTextAssembler"]


class StopTextAssembler:
    """Turns a choice's tokens into text deltas.

    Text that could be the start of a stop string is held back until it either completes the stop
    string (then it and everything after it is dropped) or can no longer match (then it is released).

    With ``reasoning`` (a thinking model's chat), the reasoning is split off first and collected for
    :meth:`take_reasoning`; stop strings apply to the answer only: they are the client's way to cut the
    answer short, and one that matched inside the reasoning would end the choice before it answered.
    """

    def __init__(self, detokenizer: Any, stop: tuple[str, ...], reasoning: ReasoningSplit | None = None) -> None:
        self._detok = detokenizer
        self._reasoning = reasoning
        self._thought = ""
        # Whether the last token's text was (part of) the reasoning, its markers included.
        self.thinking = False
        self._detok.reset()
        self._stop = tuple(s for s in stop if s)
        self._longest = max((len(s) for s in self._stop), default=0)
        self._text = ""
        self._emitted = 0
        self.stopped = False

    def add(self, token: int) -> str:
        """Add a token; return the text that can be shown now. Sets ``stopped`` on a stop string."""
        self._detok.add_token(token)
        self._take(self._detok.last_segment, final=False)
        return self._release(final=False)

    def finish(self) -> str:
        """The generation ended for another reason: release what was held back."""
        if self.stopped:
            return ""
        self._detok.finalize()
        self._take(self._detok.last_segment, final=True)
        return self._release(final=True)

    def take_reasoning(self) -> str:
        """The reasoning text that can be shown since the last call."""
        thought, self._thought = self._thought, ""
        return thought

    def _take(self, segment: str, *, final: bool) -> None:
        split = self._reasoning
        if split is None:
            self._text += segment
            return
        was_thinking = split.in_block
        thought, answer = split.add(segment)
        if final:
            more_thought, more_answer = split.finish()
            thought, answer = thought + more_thought, answer + more_answer
        # A token that opened or closed the block counts as reasoning, as its markers do.
        self.thinking = was_thinking or split.in_block
        self._thought += thought
        self._text += answer

    def _release(self, *, final: bool) -> str:
        if self.stopped:
            return ""
        text = self._text
        if self._stop:
            search_from = max(0, self._emitted - self._longest + 1)
            hits = [i for i in (text.find(s, search_from) for s in self._stop) if i >= 0]
            if hits:
                end = max(min(hits), self._emitted)
                self.stopped = True
                out, self._emitted = text[self._emitted : end], len(text)
                return out
        end = len(text) if final else len(text) - self._holdback(text)
        out = text[self._emitted : end] if end > self._emitted else ""
        self._emitted = max(self._emitted, end)
        return out

    def _holdback(self, text: str) -> int:
        """Length of the longest suffix of ``text`` (not yet emitted) that begins a stop string."""
        limit = min(self._longest - 1, len(text) - self._emitted)
        for k in range(limit, 0, -1):
            tail = text[-k:]
            if any(s.startswith(tail) for s in self._stop):
                return k
        return 0
