"""A thinking model's reasoning, split from its answer as the text streams.

Which models think, and where the block starts, is mlx-lm's knowledge, reused here:

* A model **thinks** when mlx-lm's ``TokenizerWrapper.has_thinking`` says so: its vocabulary holds a pair
  of think markers (``<think>``/``</think>`` as Qwen3 and the DeepSeek-R1 distills have them, and the
  other pairs ``mlx_lm.tokenizer_utils._infer_thinking`` knows).
* A request's output **starts inside the block** when its prompt already opened one: the last start
  marker in the prompt's tail comes after the last end marker (the rule of ``mlx_lm.server``, applied to
  the tail only: a generation prompt opens the block in its last few tokens, as Qwen3's
  ``<|im_start|>assistant\\n<think>\\n`` does; Qwen3 with thinking off renders an empty, closed block).
* Otherwise the **model may open it itself**: output that begins (after blank space) with the start
  marker is reasoning up to the end marker. Anywhere later the marker is answer text: mlx-lm's server
  would open a block mid-answer, but a model that quotes ``<think>`` in its answer should not lose it.

Everything up to the end marker is reasoning (a block never closed, e.g. cut by ``max_tokens``, is all
reasoning); the markers themselves go nowhere; blank space between the block and the answer is dropped.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from mlx_lm.generate import TextStateMachine

__all__ = ["ReasoningSplit", "reasoning_split"]

# How far back from the prompt's end an open block is looked for: generation prompts open it within a few
# tokens of the end, and the search then costs nothing on long prompts.
PROMPT_TAIL = 32


def reasoning_split(wrapper: Any, prompt: Sequence[int]) -> ReasoningSplit | None:
    """A splitter for one choice of ``prompt``'s output, or None when the model does not think.

    Args:
        wrapper: mlx-lm's ``TokenizerWrapper`` for the model.
        prompt: the request's prompt tokens.
    """
    if not wrapper.has_thinking:
        return None
    tail = list(prompt[-PROMPT_TAIL:])
    opened = wrapper.rfind_think_start(tail) > wrapper.rfind_think_end(tail)
    return ReasoningSplit(wrapper.think_start, wrapper.think_end, opened=opened)


class ReasoningSplit:
    """Splits a choice's decoded text into (reasoning, answer) pieces, one piece at a time.

    Text that may be the start of a marker is held back until it is known not to be (mlx-lm's
    ``TextStateMachine`` finds the end marker and holds partial matches, as its server does).
    """

    def __init__(self, start: str, end: str, *, opened: bool) -> None:
        self._start = start
        self._state = TextStateMachine({"reasoning": [(end, "answer")], "answer": []}).make_state("reasoning")
        # "opening": not yet known whether the model opens a block; "reasoning": inside it; "answer": after.
        self.phase = "reasoning" if opened else "opening"
        self._held = ""  # opening: text that may still begin the start marker
        self._trim = False  # the block just closed: blank space before the answer's first text is dropped

    @property
    def in_block(self) -> bool:
        return self.phase == "reasoning"

    def add(self, text: str) -> tuple[str, str]:
        """Take the next decoded text; return the (reasoning, answer) text that can be shown now."""
        if self.phase == "opening":
            self._held += text
            lead = self._held.lstrip()
            if lead.startswith(self._start):
                self.phase, self._held = "reasoning", ""
                text = lead[len(self._start) :]
            elif self._start.startswith(lead):
                return "", ""  # blank so far, or a part of the marker: wait for more
            else:  # the model did not open a block: all of it is answer, as it came
                self.phase, text, self._held = "answer", self._held, ""
                return "", text
        if self.phase == "answer":
            return "", self._answer(text)
        self._state, segments = TextStateMachine.split(self._state, text)
        reasoning = "".join(piece for state, piece in segments if state == "reasoning")
        answer = "".join(piece for state, piece in segments if state == "answer")
        if self._state[0] == "answer":
            self.phase = "answer"
            self._trim = True
            answer = self._answer(answer)
        return reasoning, answer

    def finish(self) -> tuple[str, str]:
        """The output ended: release what was held back (a partial marker is text after all)."""
        if self.phase == "opening":
            text, self._held = self._held, ""
            return "", text
        if self.phase == "reasoning":
            self._state, rest, _ = TextStateMachine.flush(self._state)
            return rest, ""
        return "", ""

    def _answer(self, text: str) -> str:
        """Answer text, without the blank space that separates it from the block."""
        if not self._trim:
            return text
        text = text.lstrip()
        self._trim = not text
        return text
