"""Tool calls found in a choice's text, with the tiny model's real tokenizer and mlx-lm's own parser."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlx_lm.tokenizer_utils import load as load_tokenizer

from adapters.base import ToolCalling
from adapters.mlx_lm.models import MlxTokenizer
from adapters.mlx_lm.presets import build_model
from adapters.mlx_lm.text import StopTextAssembler
from adapters.mlx_lm.tool_calls import ChoiceText

WEATHER = {
    "type": "function",
    "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}},
}


@pytest.fixture(scope="module")
def tokenizer(models_dir: Path) -> MlxTokenizer:
    wrapper = load_tokenizer(build_model("tiny", models_dir=models_dir))
    return MlxTokenizer(wrapper, len(wrapper))


def run(tokenizer: MlxTokenizer, text: str, tools: ToolCalling | None, stop: tuple[str, ...] = ()) -> tuple[str, list]:
    choice = ChoiceText(StopTextAssembler(tokenizer.detokenizer(), stop), tools, tokenizer.wrapper)
    content, calls = [], []
    for token in tokenizer.encode(text):  # one token at a time, as the engine feeds it
        content.append(choice.add(token))
        calls += choice.take_calls()
    content.append(choice.finish())
    calls += choice.take_calls()
    return "".join(content), calls


def auto(parallel: bool = True) -> ToolCalling:
    return ToolCalling((WEATHER,), "auto", ("get_weather",), parallel)


def test_the_preset_template_gives_the_json_tools_format(tokenizer: MlxTokenizer) -> None:
    assert tokenizer.wrapper.has_tool_calling and tokenizer.tool_call_format == "json_tools"
    rendered = tokenizer.render_chat([{"role": "user", "content": "x"}], add_generation_prompt=True, tools=[WEATHER])
    plain = tokenizer.render_chat([{"role": "user", "content": "x"}], add_generation_prompt=True)
    assert '"name": "get_weather"' in rendered and "<tools>" in rendered and "<tools>" not in plain


def test_calls_are_taken_out_of_the_content(tokenizer: MlxTokenizer) -> None:
    text = (
        "Let me check.\n<tool_call>\n"
        '{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n<tool_call>\n'
        '{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call>'
    )
    content, calls = run(tokenizer, text, auto())
    assert content == "Let me check.\n"  # the blank line between the two calls is their separator
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("get_weather", {"city": "Paris"}),
        ("get_weather", {"city": "Rome"}),
    ]
    assert all(c.id.startswith("call_") for c in calls) and calls[0].id != calls[1].id
    content, _ = run(tokenizer, text + "\nDone.", auto())
    assert content == "Let me check.\n\nDone."  # blank space followed by text is content again
    _, first_only = run(tokenizer, text, auto(parallel=False))
    assert [json.loads(c.arguments) for c in first_only] == [{"city": "Paris"}]


def test_without_tools_or_with_broken_calls_nothing_is_lost(tokenizer: MlxTokenizer) -> None:
    text = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    assert run(tokenizer, text, None) == (text, [])
    broken = "<tool_call>\n{not json}\n</tool_call> after"
    content, calls = run(tokenizer, broken, auto())
    assert calls == [] and content == broken
    cut = '<tool_call>\n{"name": "get_weather", "argu'  # max_tokens ended the call
    content, calls = run(tokenizer, cut, auto())
    assert calls == [] and content == cut


def test_stop_strings_still_apply(tokenizer: MlxTokenizer) -> None:
    content, calls = run(tokenizer, "Sure. STOP <tool_call>\n{}\n</tool_call>", auto(), stop=("STOP",))
    assert content == "Sure. " and calls == []
