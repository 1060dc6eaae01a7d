"""A thinking model's reasoning split from its answer: the splitter on text pieces, the rule that says
whether a prompt opened the block (with a real tokenizer that has think markers), and the split inside a
choice's text pipeline (stop strings and tool calls on the answer only)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlx_lm.tokenizer_utils import load as load_tokenizer

from adapters.base import ToolCalling
from adapters.mlx_lm.models import MlxTokenizer
from adapters.mlx_lm.reasoning import ReasoningSplit, reasoning_split
from adapters.mlx_lm.text import StopTextAssembler
from adapters.mlx_lm.tool_calls import ChoiceText
from tests.thinking_model import THINK_END_ID, THINK_START_ID, build_thinking_model


def split(pieces: list[str], *, opened: bool) -> tuple[str, str]:
    """(reasoning, answer) of ``pieces`` fed one at a time; every step's output is kept in order."""
    s = ReasoningSplit("<think>", "</think>", opened=opened)
    reasoning = answer = ""
    for piece in [*pieces, None]:
        r, a = s.add(piece) if piece is not None else s.finish()
        assert not (answer and r), "reasoning after the answer began"
        reasoning, answer = reasoning + r, answer + a
    return reasoning, answer


def test_prompt_opened_block_ends_at_the_marker() -> None:
    assert split(["Let me", " think.\n", "</think>", "\n\nThe answer."], opened=True) == (
        "Let me think.\n",
        "The answer.",
    )


@pytest.mark.parametrize(
    "pieces",
    [
        ["plan</think>answer"],  # marker inside one piece
        ["plan</", "think>answer"],  # split across pieces
        ["plan<", "/", "th", "ink", ">", "answer"],  # one character at a time, nearly
        ["plan", "</think>", "answer"],
    ],
)
def test_end_marker_split_across_pieces(pieces: list[str]) -> None:
    assert split(pieces, opened=True) == ("plan", "answer")


def test_partial_marker_is_held_then_released_as_reasoning() -> None:
    s = ReasoningSplit("<think>", "</think>", opened=True)
    assert s.add("a </th") == ("a ", "")  # "</th" may begin the marker: held
    assert s.add("ings") == ("</things", "")  # it did not
    assert s.finish() == ("", "")


def test_block_never_closed_is_all_reasoning() -> None:
    assert split(["thinking", " still </thi"], opened=True) == ("thinking still </thi", "")


def test_text_after_the_block_keeps_its_inner_blank_space() -> None:
    assert split(["x</think>", "\n\n", "  ", "a\n\nb "], opened=True) == ("x", "a\n\nb ")


def test_a_second_end_marker_is_answer_text() -> None:
    assert split(["x</think>y</think>z"], opened=True) == ("x", "y</think>z")


@pytest.mark.parametrize(
    "pieces",
    [["<think>", "plan", "</think>", "answer"], ["\n<thi", "nk>plan</th", "ink>answer"], ["<think>plan</think>answer"]],
)
def test_model_opens_the_block_itself(pieces: list[str]) -> None:
    assert split(pieces, opened=False) == ("plan", "answer")


@pytest.mark.parametrize(
    ("pieces", "answer"),
    [
        (["Hello <think>x</think>"], "Hello <think>x</think>"),  # not at the start: answer text
        (["  ", "\n<thi"], "  \n<thi"),  # a partial marker at the end: released as it came
        (["<", "b>bold"], "<b>bold"),
        ([], ""),
    ],
)
def test_no_block_opened_everything_is_answer(pieces: list[str], answer: str) -> None:
    assert split(pieces, opened=False) == ("", answer)


@pytest.fixture(scope="module")
def thinking(models_dir: Path) -> MlxTokenizer:
    path = build_thinking_model(models_dir)
    wrapper = load_tokenizer(path)
    return MlxTokenizer(wrapper, len(wrapper))


@pytest.fixture(scope="module")
def tiny(models_dir: Path) -> MlxTokenizer:
    from adapters.mlx_lm.presets import build_model

    wrapper = load_tokenizer(build_model("tiny", models_dir=models_dir))
    return MlxTokenizer(wrapper, len(wrapper))


def test_the_rule_on_real_prompts(thinking: MlxTokenizer, tiny: MlxTokenizer) -> None:
    wrapper = thinking.wrapper
    assert wrapper.has_thinking and wrapper.think_end_tokens == (THINK_END_ID,)
    text = thinking.text.render_chat([{"role": "user", "content": "Hi"}], add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n<think>\n")
    prompt = thinking.encode(text)
    assert prompt[-2] == THINK_START_ID
    opened = reasoning_split(wrapper, prompt)
    assert opened is not None and opened.in_block
    # A closed block (Qwen3 with thinking off renders an empty one): the model may still open one.
    closed = reasoning_split(wrapper, thinking.encode(text + "\n</think>\n\n"))
    assert closed is not None and closed.phase == "opening"
    # A long conversation: only the tail is read, and a block opened long before does not count.
    assert reasoning_split(wrapper, [THINK_START_ID] + [5] * 100).phase == "opening"  # type: ignore[union-attr]
    # A model without think markers does not think.
    assert reasoning_split(tiny.wrapper, tiny.encode("<think>\n")) is None


def run_choice(
    tok: MlxTokenizer, text: str, *, stop: tuple[str, ...] = (), tools: ToolCalling | None = None
) -> tuple[str, str, list, int]:
    """Feed ``text``'s tokens through a choice's pipeline whose prompt opened the block: (reasoning, answer,
    tool calls, tokens counted as reasoning)."""
    choice = ChoiceText(
        StopTextAssembler(tok.detokenizer(), stop, ReasoningSplit("<think>", "</think>", opened=True)),
        tools,
        tok.wrapper,
    )
    reasoning, answer, calls, thinking = "", "", [], 0
    for token in tok.encode(text):
        answer += choice.add(token)
        thinking += choice.thinking
        reasoning += choice.take_reasoning()
        calls += choice.take_calls()
        if choice.stopped:
            break
    answer += choice.finish()
    return reasoning + choice.take_reasoning(), answer, calls + list(choice.take_calls()), thinking


def test_stop_strings_apply_to_the_answer_only(thinking: MlxTokenizer) -> None:
    reasoning, answer, _, _ = run_choice(thinking, "Step one. Step two.</think>Done. Step three.", stop=("Step",))
    assert (reasoning, answer) == ("Step one. Step two.", "Done. ")


def test_reasoning_tokens_are_counted_through_the_end_marker(thinking: MlxTokenizer) -> None:
    text = "a b c</think>d e"
    _, _, _, counted = run_choice(thinking, text)
    tokens = thinking.encode(text)
    assert counted == tokens.index(THINK_END_ID) + 1


def test_tool_calls_are_parsed_from_the_answer_not_the_reasoning(thinking: MlxTokenizer) -> None:
    tools = ToolCalling(
        ({"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}},),
        "auto",
        ("get_weather",),
    )
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    reasoning, answer, calls, _ = run_choice(thinking, f"I should call it.</think>\n\n{call}", tools=tools)
    assert reasoning == "I should call it." and answer == ""
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("get_weather", {"city": "Paris"})]
