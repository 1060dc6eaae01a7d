"""A model's tokenizer as planning sees it, without mlx: what the front end process tokenises with.

The engine loads a model through mlx-lm, which decides things about its tokenizer (the EOS ids, the
tool-call format and its markers); it sends those once as :class:`TokenizerFacts`, plain data. The front
end loads the same Hugging Face tokenizer from the same directory (:meth:`TextTokenizer.load`) and, with
the facts, implements :class:`adapters.base.PromptTokenizer` exactly as the engine's own tokenizer does
(the engine's ``MlxTokenizer`` delegates to a :class:`TextTokenizer` on the tokenizer it already holds).

Nothing here imports mlx or mlx_lm (tests/adapters/test_text_tokenizer.py checks it in a fresh process).
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import msgspec

from adapters.base import OutputConstraint, ToolCalling
from adapters.grammar import GrammarCompiler, json_tools_grammar

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

__all__ = ["TextTokenizer", "TokenizerFacts"]


_LOAD_LOCK = threading.Lock()


class TokenizerFacts(msgspec.Struct, frozen=True, kw_only=True):
    """What the engine knows about a model's tokenizer that the front end cannot learn without mlx-lm.

    Attributes:
        path: the local directory the Hugging Face tokenizer loads from (the model's resolved directory).
        vocab_size: the vocabulary size planning checks token ids against (``PromptTokenizer.vocab_size``):
            the engine's, which may differ from ``len(tokenizer)`` (padded or cut logits).
        eos_token_ids: the ids that end a sequence, sorted: the config's and the tokenizer's, as mlx-lm
            gathers them (a completed grammar allows only these).
        tool_call_format: the name of mlx-lm's tool-call parser module (``json_tools``, ``pythonic`` ...),
            or None when the chat template has no tool calls.
        tool_call_start: that format's opening marker (``<tool_call>``), or None.
        tool_call_end: its closing marker (``</tool_call>``), or None.
        trust_remote_code: whether the tokenizer may run the model directory's own code, as the engine
            loaded it.
    """

    path: str
    vocab_size: int
    eos_token_ids: tuple[int, ...]
    tool_call_format: str | None = None
    tool_call_start: str | None = None
    tool_call_end: str | None = None
    trust_remote_code: bool = False


class TextTokenizer:
    """:class:`adapters.base.PromptTokenizer` on a Hugging Face tokenizer and the engine's facts about it."""

    def __init__(
        self,
        hf: PreTrainedTokenizerFast,
        facts: TokenizerFacts,
        *,
        compiler: type[GrammarCompiler] = GrammarCompiler,
    ) -> None:
        """Wrap a loaded tokenizer.

        Args:
            hf: the Hugging Face tokenizer loaded from ``facts.path``.
            facts: what the engine decided about it.
            compiler: the grammar compiler to build on first use; the engine passes one that also masks
                logits, so that planning's checks and decoding share one compiled grammar per constraint.
        """
        self.hf = hf
        self.facts = facts
        self._compiler = compiler
        self._grammars: GrammarCompiler | None = None
        self._grammars_lock = threading.Lock()
        added = getattr(hf, "added_tokens_decoder", {}) or {}
        # A token that strips whitespace on its left would take the boundary's newline: never split there.
        specials = {
            t.content for t in added.values() if getattr(t, "special", False) and not getattr(t, "lstrip", True)
        }
        # Longest first: str.startswith with a tuple stops at the first match, any one is enough.
        self.special_texts: tuple[str, ...] = tuple(sorted((t for t in specials if t), key=len, reverse=True))

    @classmethod
    def load(cls, facts: TokenizerFacts) -> TextTokenizer:
        """Load the tokenizer at ``facts.path`` as the engine did (a second of transformers' import the first
        time, then about as long as mlx-lm's own load took)."""
        # One load at a time: transformers' lazy module gave "cannot import name 'AutoTokenizer'" to the second of
        # two threads importing it at once (two models ready together).
        with _LOAD_LOCK:
            from transformers import AutoTokenizer  # heavy to import: only the processes that tokenise pay for it

            hf = AutoTokenizer.from_pretrained(facts.path, trust_remote_code=facts.trust_remote_code)
        return cls(hf, facts)

    @property
    def grammars(self) -> GrammarCompiler:
        """The model's grammar compiler, built on first use (about 0.3 s for a 32K vocabulary)."""
        with self._grammars_lock:
            if self._grammars is None:
                self._grammars = self._compiler(self.hf, self.facts.vocab_size, self.facts.eos_token_ids)
            return self._grammars

    @property
    def vocab_size(self) -> int:
        return self.facts.vocab_size

    @property
    def tool_call_format(self) -> str | None:
        return self.facts.tool_call_format

    @property
    def eos_token_ids(self) -> set[int]:
        return set(self.facts.eos_token_ids)

    def encode(self, text: str) -> list[int]:
        return list(self.hf.encode(text, add_special_tokens=False))

    def encode_after(self, prefix_text: str, prefix_tokens: Sequence[int], text: str) -> list[int]:
        """A chat hit resends the cached messages: only what follows them is tokenised when it begins with
        a special token (``<|im_start|>``). The tokenizer splits its input at special tokens before
        anything else, so the parts on either side tokenise alone and the result equals ``encode(text)``
        (tests/adapters/test_text.py checks it); elsewhere a boundary can merge, and the whole is encoded."""
        rest = text[len(prefix_text) :]
        if text.startswith(prefix_text) and rest.startswith(self.special_texts):
            return [*prefix_tokens, *self.encode(rest)]
        return self.encode(text)

    def decode(self, tokens: Sequence[int]) -> str:
        return str(self.hf.decode(list(tokens)))

    def render_chat(
        self, messages: Sequence[Mapping[str, object]], *, add_generation_prompt: bool, tools: object = None
    ) -> str:
        kwargs: dict[str, Any] = {"tokenize": False, "add_generation_prompt": add_generation_prompt}
        if tools:
            kwargs["tools"] = tools
        # transformers types a conversation as dict[str, str]; ours carry content parts and tool calls too.
        conversation: Any = list(messages)
        return str(self.hf.apply_chat_template(conversation, **kwargs))

    def check_constraint(self, constraint: OutputConstraint) -> None:
        self.grammars.check(constraint)

    def tool_call_constraint(self, tools: ToolCalling) -> OutputConstraint:
        facts = self.facts
        if facts.tool_call_format != "json_tools" or facts.tool_call_start is None or facts.tool_call_end is None:
            raise ValueError(
                f"Forcing a tool call is supported for the json_tools (Hermes) format; this model's chat "
                f"template uses {facts.tool_call_format or 'no tool-call format'}. Use tool_choice 'auto'."
            )
        return OutputConstraint("lark", json_tools_grammar(tools, facts.tool_call_start, facts.tool_call_end))
