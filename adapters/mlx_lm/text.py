"""Tokens to text for one choice: streaming detokenisation with stop strings held back."""

from __future__ import annotations

from typing import Any

__all__ = ["StopTextAssembler"]


class StopTextAssembler:
    """Turns a choice's tokens into text deltas.

    Text that could be the start of a stop string is held back until it either completes the stop
    string (then it and everything after it is dropped) or can no longer match (then it is released).
    """

    def __init__(self, detokenizer: Any, stop: tuple[str, ...]) -> None:
        self._detok = detokenizer
        self._detok.reset()
        self._stop = tuple(s for s in stop if s)
        self._longest = max((len(s) for s in self._stop), default=0)
        self._text = ""
        self._emitted = 0
        self.stopped = False

    def add(self, token: int) -> str:
        """Add a token; return the text that can be shown now. Sets ``stopped`` on a stop string."""
        self._detok.add_token(token)
        self._text += self._detok.last_segment
        return self._release(final=False)

    def finish(self) -> str:
        """The generation ended for another reason: release what was held back."""
        if self.stopped:
            return ""
        self._detok.finalize()
        self._text += self._detok.last_segment
        return self._release(final=True)

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
