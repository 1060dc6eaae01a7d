"""Constraints compiled against one tokenizer, and the grammars we write for tool calls; no MLX.

Planning validates a request's schema or grammar here before anything is queued, and builds the grammar
that forces a tool call; it may run in a process that never imports mlx. The engine masks logits with
the same compiled grammars (``adapters/mlx_lm/constraints.py`` extends :class:`GrammarCompiler`), so a
constraint is compiled once per model wherever both live in one process.

Built on llguidance (chosen by measurement, see ``bench/grammar_libs.py``): a grammar compiles in about a
millisecond (its lexer is built lazily) and a compiled grammar is copied per sequence in microseconds.
"""

from __future__ import annotations

import copy
import json
import threading
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import llguidance as llg

from adapters.base import OutputConstraint, ToolCalling

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

    from adapters.upstream import JsonCompileOptions

__all__ = [
    "CACHE_ENTRIES",
    "JSON_OPTIONS",
    "CompiledGrammar",
    "GrammarCompiler",
    "InvalidConstraint",
    "json_tools_grammar",
]

# Compiled grammars kept per compiler; each holds a lexer that grows as masks are computed (kilobytes to
# a few megabytes), so the cache is bounded.
CACHE_ENTRIES = 256

# llguidance allows any run of whitespace between JSON tokens by default; a model that starts emitting blank
# lines can then never leave them (seen with random weights: 96 tokens of spaces after '{'). Bounded runs
# still fit compact, spaced and indented JSON; a schema's own "x-guidance" options take precedence.
JSON_OPTIONS: JsonCompileOptions = {"whitespace_pattern": r"[\x20\x0A\x0D\x09]{0,32}"}


class InvalidConstraint(ValueError):
    """A schema or grammar that cannot constrain output; the message says why, for the user."""


@dataclass(frozen=True)
class CompiledGrammar:
    """A constraint compiled against one tokenizer; the engine copies ``template`` per sequence."""

    constraint: OutputConstraint
    template: llg.LLMatcher


class GrammarCompiler:
    """Compiles constraints for one model's tokenizer and caches them (bounded, least recently used out).

    Thread-safe, and makes no MLX calls: planning may call :meth:`check` from any thread.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerFast, vocab_size: int, eos_token_ids: Iterable[int]) -> None:
        """Build llguidance's view of the tokenizer (about 0.3 s for a 32K vocabulary: do it once per model).

        Args:
            tokenizer: the model's Hugging Face fast tokenizer.
            vocab_size: the model's vocabulary size (its logits may be wider than the tokenizer: padding).
            eos_token_ids: the ids that end a sequence; once the grammar is complete only these are allowed.
        """
        backend = copy.copy(tokenizer.backend_tokenizer)  # padding and truncation off, on a copy
        backend.no_padding()
        backend.no_truncation()
        self._eos = sorted(set(eos_token_ids))
        if not self._eos:
            raise ValueError("constrained decoding needs at least one EOS token id")
        self._tokenizer = llg.LLTokenizer(backend.to_str(), eos_token=self._eos)
        self.vocab_size = max(vocab_size, self._tokenizer.vocab_size)
        self._lock = threading.Lock()
        self._cache: OrderedDict[OutputConstraint, CompiledGrammar | InvalidConstraint] = OrderedDict()

    def check(self, constraint: OutputConstraint) -> None:
        """Raise :class:`InvalidConstraint` if ``constraint`` cannot be used."""
        self.compile(constraint)

    def compile(self, constraint: OutputConstraint) -> CompiledGrammar:
        """The compiled grammar for ``constraint``, from the cache when it was compiled before.

        Raises:
            InvalidConstraint: the schema or grammar is malformed or uses something unsupported.
        """
        with self._lock:
            hit = self._cache.get(constraint)
            if hit is not None:
                self._cache.move_to_end(constraint)
        if hit is None:
            # Compiled outside the lock: llguidance drops the GIL while it builds, others keep going.
            try:
                hit = CompiledGrammar(constraint, self._build(constraint))
            except InvalidConstraint as exc:
                hit = exc
            with self._lock:
                hit = self._cache.setdefault(constraint, hit)
                while len(self._cache) > CACHE_ENTRIES:
                    self._cache.popitem(last=False)
        if isinstance(hit, InvalidConstraint):
            raise InvalidConstraint(str(hit))
        return hit

    def _build(self, c: OutputConstraint) -> llg.LLMatcher:
        if c.kind == "json_schema":
            what = "JSON schema"
            try:  # parsed here too, so that a syntax error points into the user's text, not llguidance's wrapper
                schema = json.loads(c.source)
            except ValueError as exc:
                raise InvalidConstraint(f"The JSON schema is not valid JSON: {exc}") from None
            if not isinstance(schema, dict):
                raise InvalidConstraint("The JSON schema must be a JSON object")
            grammar = llg.LLMatcher.grammar_from_json_schema(c.source, defaults=JSON_OPTIONS)
        elif c.kind == "lark":
            what = "grammar"
            grammar = llg.LLMatcher.grammar_from_lark(c.source)
        else:
            raise InvalidConstraint(f"Unknown constraint kind {c.kind!r}")
        template = llg.LLMatcher(self._tokenizer, grammar, log_level=0)
        if not template.is_error():
            # The first mask builds the lexer's start state: some errors (size limits) only show here, and
            # every copy of the template starts warm.
            template.compute_bitmask()
        if template.is_error():
            raise InvalidConstraint(f"Invalid {what}: {template.get_error().strip()}")
        return template


def json_tools_grammar(tools: ToolCalling, start: str, end: str) -> str:
    """A Lark grammar (llguidance's dialect) that admits only calls of ``tools.names`` in the Hermes
    ``json_tools`` format, each with arguments valid for that function's parameter schema.

    Args:
        tools: the request's tools and which of them may be called.
        start: the format's opening marker (``<tool_call>``), as mlx-lm's parser module names it.
        end: its closing marker (``</tool_call>``).
    """
    by_name = {str(fn["name"]): fn for fn in _functions(tools.tools)}
    rules = []
    for i, name in enumerate(tools.names):
        fn = by_name[name]
        params = fn.get("parameters") or {"type": "object", "properties": {}}
        schema = {
            # Compact, with the template's own separators: the form the model saw in its prompt and
            # training, and no room for runs of blank space (a random-weight model never leaves them).
            "x-guidance": {"whitespace_flexible": False, "key_separator": ": ", "item_separator": ", "},
            "type": "object",
            "properties": {"name": {"const": name}, "arguments": params},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        rules.append(f"fn{i}: %json {json.dumps(schema)}")
    alternatives = " | ".join(f"fn{i}" for i in range(len(tools.names)))
    repeat = ' ("\\n" call)*' if tools.parallel and tools.choice == "required" else ""
    call = f'call: {json.dumps(start)} "\\n" body "\\n" {json.dumps(end)}'
    return "\n".join([f"start: call{repeat}", call, f"body: {alternatives}", *rules])


def _functions(tools: Sequence[Mapping[str, object]]) -> list[Mapping[str, Any]]:
    """The tools' ``function`` objects (entries of other types carry none)."""
    return [fn for t in tools if isinstance(fn := t.get("function"), Mapping)]
