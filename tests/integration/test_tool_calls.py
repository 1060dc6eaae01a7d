"""OpenAI's tool-calling contract through the real server: the openai SDK (whole and streamed, assembled by
the SDK's own stream helper), LangChain ``bind_tools``, LlamaIndex ``OpenAILike`` as a function-calling
model, and tool results sent back through the chat template.

The tiny model's weights are random, so calls are made by forcing them (``tool_choice`` required or
named): the grammar admits only calls of the given functions with arguments valid for their schemas.
"""

from __future__ import annotations

import json
from typing import Literal

import httpx
import openai
import pytest
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI
from llama_index.core.tools import FunctionTool
from llama_index.llms.openai_like import OpenAILike
from pydantic import BaseModel, ConfigDict

from tests.integration.test_wire import assert_error
from tests.servers import Server


class WeatherArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")
    city: str
    unit: Literal["celsius", "fahrenheit"]


class AddArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")
    a: int
    b: int


ARGS = {"get_weather": WeatherArgs, "add": AddArgs}
TOOLS = [
    {"type": "function", "function": {"name": name, "description": f"{name}", "parameters": model.model_json_schema()}}
    for name, model in ARGS.items()
]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


def _check_calls(calls: list, names: set[str]) -> None:
    assert calls
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_")
        assert call.function.name in names
        ARGS[call.function.name].model_validate_json(call.function.arguments)


@pytest.mark.parametrize(
    ("tool_choice", "names"),
    [("required", {"get_weather", "add"}), ({"type": "function", "function": {"name": "add"}}, {"add"})],
)
def test_forced_calls_whole_and_streamed(client: openai.OpenAI, bias: dict, tool_choice: object, names: set) -> None:
    common = {
        "model": "tiny",
        "messages": ASK,
        "tools": TOOLS,
        "tool_choice": tool_choice,
        "parallel_tool_calls": False,
        "max_tokens": 120,
        "temperature": 0,
        "logit_bias": bias,
    }
    whole = client.chat.completions.create(**common)  # type: ignore[arg-type]
    choice = whole.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert choice.message.tool_calls is not None and len(choice.message.tool_calls) == 1
    _check_calls(choice.message.tool_calls, names)
    # Streamed: the SDK's helper joins the fragments by index into the same calls.
    with client.chat.completions.stream(**common) as stream:  # type: ignore[arg-type]
        final = stream.get_final_completion()
    streamed = final.choices[0]
    assert streamed.finish_reason == "tool_calls"
    assert [(c.function.name, c.function.arguments) for c in streamed.message.tool_calls or []] == [
        (c.function.name, c.function.arguments) for c in choice.message.tool_calls
    ]


def test_streamed_fragments_have_openai_shape(server: Server, bias: dict) -> None:
    body = {
        "model": "tiny",
        "messages": ASK,
        "tools": TOOLS,
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
        "max_tokens": 120,
        "temperature": 0,
        "logit_bias": bias,
        "stream": True,
    }
    with httpx.stream("POST", f"{server.v1}/chat/completions", json=body, timeout=60) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    fragments = [c["choices"][0]["delta"]["tool_calls"] for c in events if c["choices"][0]["delta"].get("tool_calls")]
    head, *rest = [f for group in fragments for f in group]
    assert head["index"] == 0 and head["type"] == "function" and head["id"].startswith("call_")
    assert head["function"] == {"name": "get_weather", "arguments": ""}
    assert rest and all(set(f) == {"index", "function"} and set(f["function"]) == {"arguments"} for f in rest)
    WeatherArgs.model_validate_json("".join(f["function"]["arguments"] for f in rest))
    assert events[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_parallel_calls_when_allowed(client: openai.OpenAI, bias: dict) -> None:
    no_eos = {**bias, "0": -100, "2": -100}  # after each call the grammar allows EOS or another call
    r = client.chat.completions.create(
        model="tiny",
        messages=ASK,
        tools=TOOLS,
        tool_choice="required",
        max_tokens=200,
        temperature=0,
        logit_bias=no_eos,
    )
    calls = r.choices[0].message.tool_calls or []
    assert len(calls) >= 2 and r.choices[0].finish_reason == "length"
    _check_calls(calls, set(ARGS))


def test_tool_results_go_back_through_the_template(client: openai.OpenAI) -> None:
    call = {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": '{"a": 2, "b": 3}'}}
    history = [*ASK, {"role": "assistant", "content": None, "tool_calls": [call]}]
    without = client.chat.completions.create(model="tiny", messages=history, tools=TOOLS, max_tokens=4)
    result = {"role": "tool", "tool_call_id": "call_1", "content": "5"}
    answered = client.chat.completions.create(model="tiny", messages=[*history, result], tools=TOOLS, max_tokens=4)
    assert without.usage is not None and answered.usage is not None
    assert answered.usage.prompt_tokens > without.usage.prompt_tokens


def test_tool_choice_none_and_auto_give_text(client: openai.OpenAI) -> None:
    for choice in ("none", "auto"):
        r = client.chat.completions.create(
            model="tiny", messages=ASK, tools=TOOLS, tool_choice=choice, max_tokens=8, temperature=0
        )
        assert r.choices[0].finish_reason in ("stop", "length") and not r.choices[0].message.tool_calls


@pytest.mark.parametrize(
    ("change", "param"),
    [
        ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"tools": None, "tool_choice": "required"}, "tool_choice"),
        (
            {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "nope"}}}]},
            "tools",
        ),
        ({"tools": [TOOLS[0], TOOLS[0]]}, "tools"),
        (
            {
                "messages": [
                    *ASK,
                    {"role": "assistant", "tool_calls": [{"id": "c", "function": {"name": "f", "arguments": "{x"}}]},
                ]
            },
            "messages[1].tool_calls[0].function.arguments",
        ),
    ],
)
def test_bad_tool_requests_are_400(server: Server, change: dict, param: str) -> None:
    body = {"model": "tiny", "messages": ASK, "tools": TOOLS, "tool_choice": "required", "max_tokens": 4, **change}
    body = {k: v for k, v in body.items() if v is not None}
    r = httpx.post(f"{server.v1}/chat/completions", json=body, timeout=30)
    err = assert_error(r, 400, "invalid_request_error", None)
    assert err["param"] == param, err


def test_langchain_bind_tools(server: Server, bias: dict) -> None:
    @tool
    def get_weather(city: str, unit: Literal["celsius", "fahrenheit"]) -> str:
        """The weather in a city."""
        return "sunny"

    llm = ChatOpenAI(
        base_url=server.v1,
        api_key="unused",
        model="tiny",
        temperature=0,
        max_tokens=120,
        max_retries=0,
        extra_body={"logit_bias": bias},
    )
    bound = llm.bind_tools([get_weather], tool_choice="get_weather", parallel_tool_calls=False)
    reply = bound.invoke("Weather in Paris?")
    assert [c["name"] for c in reply.tool_calls] == ["get_weather"]
    # LangChain's schema allows extra properties (no additionalProperties: false); the required ones are there.
    assert {"city", "unit"} <= set(reply.tool_calls[0]["args"])
    chunks = list(bound.stream("Weather in Paris?"))
    merged = chunks[0]
    for c in chunks[1:]:
        merged += c  # type: ignore[assignment]
    assert [c["name"] for c in merged.tool_calls] == ["get_weather"]  # type: ignore[attr-defined]
    assert merged.tool_calls[0]["args"] == reply.tool_calls[0]["args"]  # type: ignore[attr-defined]


def test_llamaindex_function_calling_model(server: Server, bias: dict) -> None:
    def add(a: int, b: int) -> int:
        """Add two integers."""
        return a + b

    llm = OpenAILike(
        api_base=server.v1,
        api_key="unused",
        model="tiny",
        is_chat_model=True,
        is_function_calling_model=True,
        max_tokens=120,
        temperature=0,
        context_window=8192,
        max_retries=0,
        additional_kwargs={"logit_bias": bias, "parallel_tool_calls": False},
    )
    response = llm.chat_with_tools([FunctionTool.from_defaults(fn=add)], user_msg="Add 2 and 3", tool_required=True)
    calls = llm.get_tool_calls_from_response(response, error_on_no_tool_call=True)
    assert [c.tool_name for c in calls] == ["add"]
    assert set(calls[0].tool_kwargs) == {"a", "b"} and all(isinstance(v, int) for v in calls[0].tool_kwargs.values())
