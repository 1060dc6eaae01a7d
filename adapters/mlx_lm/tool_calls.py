"""Tool calls in a choice's text: found with mlx-lm's own pieces, returned in OpenAI's terms.

mlx-lm picks a model's tool-call format from its chat template (``TokenizerWrapper.tool_parser``,
``tool_call_start``/``tool_call_end``: Hermes-style ``json_tools``, ``pythonic``, ``mistral``,
``qwen3_coder`` ...) and splits decoded text into normal and tool states with ``TextStateMachine``
(which holds back text that may begin a marker). This module feeds a choice's content through that
machine and turns each finished tool block into :class:`ToolCallOut` with the model's own parser.
"""

from __future__ import annotations

import json
import logging
import secrets
from collections.abc import Callable, Mapping
from typing import Any

from mlx_lm.generate import TextStateMachine

from adapters.base import ToolCalling, ToolCallOut
from adapters.mlx_lm.text import StopTextAssembler

__all__ = ["ChoiceText", "new_call_id"]

logger = logging.getLogger(__name__)


def new_call_id() -> str:
    return f"call_{secrets.token_hex(12)}"


class ChoiceText:
    """A choice's text: stop strings held back (:class:`StopTextAssembler`), then, when the request may
    get tool calls, tool-call blocks taken out of the content and parsed."""

    def __init__(self, text: StopTextAssembler, tools: ToolCalling | None, wrapper: Any) -> None:
        self._text = text
        self._calls: list[ToolCallOut] = []
        self.made_calls = False
        self._parse: Callable[[str, Any], Any] | None = None
        if tools is not None and wrapper.has_tool_calling:
            machine = TextStateMachine(
                {
                    "normal": [(wrapper.tool_call_start, "tool")],
                    "tool": [(wrapper.tool_call_end, "normal")] if wrapper.tool_call_end else [],
                }
            )
            self._state = machine.make_state("normal")
            self._tool_text = self._gap = ""
            self._parse = wrapper.tool_parser
            self._markers = (wrapper.tool_call_start, wrapper.tool_call_end or "")
            self._tools = [dict(t) for t in tools.tools]
            self._parallel = tools.parallel

    @property
    def stopped(self) -> bool:
        return self._text.stopped

    @property
    def thinking(self) -> bool:
        """Whether the last token was (part of) a thinking model's reasoning."""
        return self._text.thinking

    def take_reasoning(self) -> str:
        """A thinking model's reasoning text since the last call (it never holds tool calls)."""
        return self._text.take_reasoning()

    def add(self, token: int) -> str:
        return self._split(self._text.add(token), final=False)

    def finish(self) -> str:
        return self._split(self._text.finish(), final=True)

    def take_calls(self) -> tuple[ToolCallOut, ...]:
        """The tool calls completed since the last call."""
        calls, self._calls = tuple(self._calls), []
        return calls

    def _split(self, text: str, *, final: bool) -> str:
        if self._parse is None:
            return text
        self._state, segments = TextStateMachine.split(self._state, text)
        if final:
            self._state, rest, current = TextStateMachine.flush(self._state)
            segments.append((current, rest))
        content = []
        for state, piece in segments:
            if state == "tool":
                self._tool_text += piece
                self._gap = ""  # blank text between two calls is the separator, not content
                continue
            if self._tool_text:
                content.append(self._close_block(closed=True))
            if self.made_calls and not (self._gap + piece).strip():
                self._gap += piece  # held: content only if more than blank space follows
                continue
            content.append(self._gap + piece)
            self._gap = ""
        if final and self._tool_text:  # a call that was cut off (max_tokens): no end marker came
            content.append(self._close_block(closed=False))
        return "".join(content)

    def _close_block(self, *, closed: bool) -> str:
        """Parse a tool block; one that does not parse (or was cut off) stays content, markers and all."""
        block, self._tool_text = self._tool_text, ""
        start, end = self._markers
        as_text = start + block + (end if closed else "")
        if not closed:
            return as_text
        assert self._parse is not None
        try:
            parsed = self._parse(block, self._tools)
        except Exception as exc:  # the model's text, not our fault: show it as it came
            logger.info("tool call did not parse (%s: %s); returned as content", type(exc).__name__, exc)
            return as_text
        for call in parsed if isinstance(parsed, list) else [parsed]:
            if not isinstance(call, Mapping) or "name" not in call:
                return as_text
            if self.made_calls and not self._parallel:
                continue  # parallel_tool_calls: false keeps the first call only
            arguments = call.get("arguments", {})
            text = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
            self._calls.append(ToolCallOut(str(call.get("id") or new_call_id()), str(call["name"]), text))
            self.made_calls = True
        return ""
