"""TextTokenizer, planning's tokenizer without mlx: built from the engine's facts about the default model
(SmolLM2-135M), it gives what the engine's MlxTokenizer gives, and a process using it never imports mlx."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import msgspec
import pytest

from adapters.base import OutputConstraint, ToolCalling
from adapters.grammar import InvalidConstraint
from adapters.mlx_lm.models import MlxTokenizer, ModelSpec, load_model
from adapters.tokenizer import TextTokenizer, TokenizerFacts
from adapters.upstream import hf_tokenizer

MODEL = "smollm2-135m"  # the gateway's default model
REPO = Path(__file__).parents[2]

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
CLOCK = {"type": "function", "function": {"name": "get_time"}}  # no parameters: any object
CONVERSATION = [
    {"role": "system", "content": "Be terse. Tabs\tand  double spaces, ünïcödé, 数字 42."},
    {"role": "user", "content": [{"type": "text", "text": "Weather in Paris?"}]},
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}],
    },
    {"role": "tool", "content": '{"temperature": 21}'},
]
TEXTS = ["naïve café — 東京 🚀", "  two  spaces\n\ttab\r\nend  ", "<|im_start|>user\nhi<|im_end|>", "2024", ""]
BAD_CONSTRAINTS = [
    OutputConstraint("json_schema", '{"type": "nope"}'),
    OutputConstraint("json_schema", '{"type": "object",'),
    OutputConstraint("json_schema", "[1, 2]"),
    OutputConstraint("lark", "start: undefined_rule"),
]
TOOL_CHOICES = [
    ToolCalling((WEATHER, CLOCK), "required", ("get_weather", "get_time"), True),
    ToolCalling((WEATHER, CLOCK), "required", ("get_weather", "get_time"), False),
    ToolCalling((WEATHER, CLOCK), "named", ("get_time",), True),
]


@pytest.fixture(scope="module")
def engine_tok(models_dir: Path) -> MlxTokenizer:
    return load_model(ModelSpec(MODEL, MODEL, models_dir=str(models_dir))).tokenizer


@pytest.fixture(scope="module")
def text_tok(engine_tok: MlxTokenizer) -> TextTokenizer:
    # Through the wire format: the front end gets the facts as bytes, not as the engine's object.
    facts = msgspec.json.decode(msgspec.json.encode(engine_tok.facts()), type=TokenizerFacts)
    assert facts == engine_tok.facts()
    return TextTokenizer.load(facts)


def test_facts_say_what_mlx_lm_decided(engine_tok: MlxTokenizer) -> None:
    facts = engine_tok.facts()
    assert Path(facts.path, "tokenizer.json").is_file()
    assert facts.eos_token_ids == (2,)
    assert (facts.tool_call_format, facts.tool_call_start, facts.tool_call_end) == (
        "json_tools",
        "<tool_call>",
        "</tool_call>",
    )
    assert facts.vocab_size == engine_tok.vocab_size and not facts.trust_remote_code


def test_a_new_tokenizer_is_loaded_not_shared(engine_tok: MlxTokenizer, text_tok: TextTokenizer) -> None:
    assert text_tok.hf is not engine_tok.text.hf  # the comparisons below are between two loads
    assert engine_tok.text.hf is hf_tokenizer(engine_tok.wrapper)  # the engine's: no second load


@pytest.mark.parametrize("text", TEXTS)
def test_encode_and_decode_agree(engine_tok: MlxTokenizer, text_tok: TextTokenizer, text: str) -> None:
    tokens = engine_tok.encode(text)
    assert text_tok.encode(text) == tokens
    assert text_tok.decode(tokens) == engine_tok.decode(tokens) == text


@pytest.mark.parametrize("tools", [None, [WEATHER], [WEATHER, CLOCK]])
@pytest.mark.parametrize("generation", [True, False])
def test_render_chat_and_encode_after_agree(
    engine_tok: MlxTokenizer, text_tok: TextTokenizer, tools: list[dict[str, object]] | None, generation: bool
) -> None:
    cached = engine_tok.render_chat(CONVERSATION[:2], add_generation_prompt=False, tools=tools)
    text = engine_tok.render_chat(CONVERSATION, add_generation_prompt=generation, tools=tools)
    assert text_tok.render_chat(CONVERSATION[:2], add_generation_prompt=False, tools=tools) == cached
    assert text_tok.render_chat(CONVERSATION, add_generation_prompt=generation, tools=tools) == text
    assert text_tok.special_texts == engine_tok.text.special_texts
    for prefix in (cached, cached[:-3], "no such prefix"):  # the fast path, a boundary inside a token, none
        prefix_tokens = engine_tok.encode(prefix)
        expected = engine_tok.encode_after(prefix, prefix_tokens, text)
        assert expected == engine_tok.encode(text)
        assert text_tok.encode_after(prefix, prefix_tokens, text) == expected


def test_sizes_and_format_agree(engine_tok: MlxTokenizer, text_tok: TextTokenizer) -> None:
    assert (text_tok.vocab_size, text_tok.tool_call_format) == (engine_tok.vocab_size, engine_tok.tool_call_format)


@pytest.mark.parametrize("constraint", BAD_CONSTRAINTS, ids=lambda c: c.source)
def test_constraint_errors_agree(
    engine_tok: MlxTokenizer, text_tok: TextTokenizer, constraint: OutputConstraint
) -> None:
    with pytest.raises(InvalidConstraint) as engine_error:
        engine_tok.check_constraint(constraint)
    with pytest.raises(InvalidConstraint) as text_error:
        text_tok.check_constraint(constraint)
    assert str(text_error.value) == str(engine_error.value)


@pytest.mark.parametrize("tools", TOOL_CHOICES, ids=lambda t: f"{t.choice}-{t.parallel}")
def test_tool_call_grammars_agree(engine_tok: MlxTokenizer, text_tok: TextTokenizer, tools: ToolCalling) -> None:
    grammar = engine_tok.tool_call_constraint(tools)
    assert text_tok.tool_call_constraint(tools) == grammar
    text_tok.check_constraint(grammar)  # it compiles for this tokenizer


def test_a_format_without_a_grammar_is_refused(text_tok: TextTokenizer) -> None:
    facts = msgspec.structs.replace(text_tok.facts, tool_call_format="pythonic", tool_call_start="[")
    with pytest.raises(ValueError, match="uses pythonic. Use tool_choice 'auto'"):
        TextTokenizer(text_tok.hf, facts).tool_call_constraint(TOOL_CHOICES[0])


# Runs in a fresh interpreter: the front end's whole use of the tokenizer, then which modules it imported.
FRONT_END = """
import json, sys
import msgspec
from adapters.base import OutputConstraint, ToolCalling
from adapters.grammar import InvalidConstraint
from adapters.tokenizer import TextTokenizer, TokenizerFacts

given = json.loads(sys.stdin.read())
tok = TextTokenizer.load(msgspec.convert(given["facts"], TokenizerFacts))
text = tok.render_chat(given["messages"], add_generation_prompt=True, tools=given["tools"])
tok.check_constraint(OutputConstraint("json_schema", '{"type": "object"}'))
try:
    tok.check_constraint(OutputConstraint("json_schema", '{"type": "nope"}'))
    error = None
except InvalidConstraint as exc:
    error = str(exc)
grammar = tok.tool_call_constraint(ToolCalling(tuple(given["tools"]), "required", ("get_weather",), True))
print(json.dumps({
    "text": text,
    "tokens": tok.encode(text),
    "error": error,
    "grammar": grammar.source,
    "imported": sorted(m for m in sys.modules if m.partition(".")[0] in ("mlx", "mlx_lm")),
}))
"""


def test_the_front_end_never_imports_mlx(engine_tok: MlxTokenizer) -> None:
    given = {"facts": msgspec.to_builtins(engine_tok.facts()), "messages": CONVERSATION, "tools": [WEATHER]}
    run = subprocess.run(
        [sys.executable, "-c", FRONT_END],
        input=json.dumps(given),
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    assert out["imported"] == []
    text = engine_tok.render_chat(CONVERSATION, add_generation_prompt=True, tools=[WEATHER])
    assert (out["text"], out["tokens"]) == (text, engine_tok.encode(text))
    assert out["error"] is not None and out["error"].startswith("Invalid JSON schema")
    required = ToolCalling((WEATHER,), "required", ("get_weather",), True)
    assert out["grammar"] == engine_tok.tool_call_constraint(required).source
