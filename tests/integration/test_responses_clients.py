"""Real clients of ``/v1/responses`` with function tools and formats, against the real server: the openai SDK
(``create``, the ``stream()`` helper, ``parse()``, a tool loop over ``previous_response_id``), the OpenAI Agents
SDK (``Runner.run`` with a function tool) and LangChain ``ChatOpenAI(use_responses_api=True)``.

The tiny model's weights are random: it calls a tool only when forced (``tool_choice`` required or named), and
closes JSON in time only when every value is finite (enums, booleans), since ``/v1/responses`` takes no
``logit_bias`` to help it (tests/closers.py); the grammar admits only valid calls and valid JSON.
"""

from __future__ import annotations

import asyncio
import json
from typing import Literal

import openai
import pytest
from agents import (
    Agent,
    ModelSettings,
    OpenAIResponsesModel,
    Runner,
    function_tool,
    set_default_openai_client,
    set_tracing_disabled,
)
from agents.items import ToolCallItem, ToolCallOutputItem
from langchain_core.messages import AIMessageChunk
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI
from pydantic import BaseModel, ConfigDict

from tests.integration.test_responses import FORCED, WEATHER
from tests.servers import Server


class Verdict(BaseModel):
    model_config = ConfigDict(extra="forbid")
    ok: bool
    unit: Literal["celsius", "fahrenheit"]


class WeatherArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")
    city: Literal["Paris", "Oslo"]
    unit: Literal["celsius", "fahrenheit"]


ADD = {
    "type": "function",
    "name": "add",
    "parameters": {
        "type": "object",
        "properties": {"a": {"enum": [1, 2, 3]}, "b": {"enum": [1, 2, 3]}},
        "required": ["a", "b"],
        "additionalProperties": False,
    },
}


@pytest.mark.parametrize(
    ("tool_choice", "names"),
    [("required", {"get_weather", "add"}), ({"type": "function", "name": "add"}, {"add"})],
)
def test_sdk_create_with_forced_tools(client: openai.OpenAI, tool_choice: object, names: set[str]) -> None:
    r = client.responses.create(
        model="tiny",
        input="What is the weather in Paris?",
        tools=[WEATHER, ADD],  # type: ignore[list-item]
        tool_choice=tool_choice,  # type: ignore[arg-type]
        parallel_tool_calls=False,
        max_output_tokens=80,
        temperature=0,
    )
    assert r.status == "completed" and r.output_text == ""
    (call,) = r.output
    assert call.type == "function_call" and call.name in names and call.id and call.id.startswith("fc_")
    args = json.loads(call.arguments)
    if call.name == "get_weather":
        WeatherArgs.model_validate(args)
    else:
        assert set(args) == {"a", "b"}


def test_sdk_stream_helper_with_function_call_events(client: openai.OpenAI) -> None:
    whole = client.responses.create(**FORCED)  # type: ignore[arg-type]
    with client.responses.stream(**{k: v for k, v in FORCED.items() if k != "stream"}) as stream:  # type: ignore[arg-type]
        events = list(stream)
        final = stream.get_final_response()
    deltas = [e.delta for e in events if e.type == "response.function_call_arguments.delta"]
    (done,) = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert "".join(deltas) == done.arguments
    (call,) = final.output
    assert call.type == "function_call" and call.name == "get_weather"
    assert call.arguments == done.arguments == whole.output[0].arguments  # type: ignore[union-attr]
    WeatherArgs.model_validate_json(call.arguments)


def test_sdk_stream_helper_with_text(client: openai.OpenAI) -> None:
    with client.responses.stream(model="tiny", input="Hi", max_output_tokens=6, temperature=0) as stream:
        events = list(stream)
        text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
        last = events[-1]
        assert last.type in ("response.completed", "response.incomplete") and last.response.output_text == text
        (item,) = last.response.output
        assert item.type == "message" and [e.output_index for e in events if hasattr(e, "output_index")] == [0] * (
            len(events) - 3
        )
        if last.type == "response.completed":  # the helper's final response comes only with this event
            assert stream.get_final_response().output_text == text


def test_sdk_parse_with_a_pydantic_text_format(client: openai.OpenAI) -> None:
    r = client.responses.parse(
        model="tiny", input="Is it warm? Answer as JSON.", text_format=Verdict, max_output_tokens=60, temperature=0
    )
    assert r.status == "completed"
    assert isinstance(r.output_parsed, Verdict)
    assert Verdict.model_validate_json(r.output_text) == r.output_parsed
    # Streamed, the helper parses the final text the same way.
    with client.responses.stream(
        model="tiny", input="Is it warm? Answer as JSON.", text_format=Verdict, max_output_tokens=60, temperature=0
    ) as stream:
        final = stream.get_final_response()
    assert final.output_parsed == r.output_parsed


def test_sdk_tool_loop_over_previous_response_id(client: openai.OpenAI) -> None:
    first = client.responses.create(**FORCED)  # type: ignore[arg-type]
    calls = [item for item in first.output if item.type == "function_call"]
    assert len(calls) == 1
    results = {"get_weather": lambda args: f"{args['city']}: 12 degrees {args['unit']}"}
    outputs = [
        {"type": "function_call_output", "call_id": c.call_id, "output": results[c.name](json.loads(c.arguments))}
        for c in calls
    ]
    answer = client.responses.create(
        model="tiny",
        previous_response_id=first.id,
        input=outputs,  # type: ignore[arg-type]
        tools=[WEATHER],  # type: ignore[list-item]
        max_output_tokens=6,
        temperature=0,
    )
    assert answer.previous_response_id == first.id and answer.output[0].type == "message"
    assert first.usage is not None and answer.usage is not None
    assert answer.usage.input_tokens > first.usage.input_tokens + first.usage.output_tokens


def test_agents_sdk_runs_a_function_tool(server: Server) -> None:
    ran: list[tuple[str, str]] = []

    @function_tool
    def get_weather(city: Literal["Paris", "Oslo"], unit: Literal["celsius", "fahrenheit"]) -> str:
        """The weather in a city."""
        ran.append((city, unit))
        return f"{city}: 12 degrees {unit}"

    client = openai.AsyncOpenAI(base_url=server.v1, api_key="unused", max_retries=0)
    set_default_openai_client(client, use_for_tracing=False)
    set_tracing_disabled(True)
    model = OpenAIResponsesModel(model="tiny", openai_client=client)
    settings = ModelSettings(tool_choice="required", temperature=0, max_tokens=60, parallel_tool_calls=False)

    async def run() -> None:
        # Ends on the tool's output: the tool ran, its result is the run's answer.
        agent = Agent(
            name="weather",
            instructions="Answer with the weather.",
            tools=[get_weather],
            model=model,
            model_settings=settings,
            tool_use_behavior="stop_on_first_tool",
        )
        result = await Runner.run(agent, "What is the weather in Paris?", max_turns=2)
        assert len(ran) == 1 and result.final_output == f"{ran[0][0]}: 12 degrees {ran[0][1]}"
        # The model answers after the tool (tool_choice resets to auto after a call, as the SDK does by default):
        # the function_call and its output go back as input items.
        agent = agent.clone(tool_use_behavior="run_llm_again")
        result = await Runner.run(agent, "What is the weather in Oslo?", max_turns=3)
        assert len(ran) == 2 and isinstance(result.final_output, str)
        kinds = [type(item) for item in result.new_items]
        assert ToolCallItem in kinds and ToolCallOutputItem in kinds
        await client.close()

    asyncio.run(run())


def _langchain(server: Server, **kwargs: object) -> ChatOpenAI:
    return ChatOpenAI(
        base_url=server.v1,
        api_key="unused",  # type: ignore[arg-type]
        model="tiny",
        temperature=0,
        max_retries=0,
        use_responses_api=True,
        **kwargs,  # type: ignore[arg-type]
    )


def test_langchain_invoke_and_stream(server: Server) -> None:
    llm = _langchain(server, max_tokens=6)
    reply = llm.invoke("Say hello.")
    assert isinstance(reply.text, str) and reply.response_metadata.get("id", "").startswith("resp_")
    chunks = list(llm.stream("Say hello."))
    merged = chunks[0]
    for c in chunks[1:]:
        merged += c  # type: ignore[assignment]
    assert merged.text == reply.text


def test_langchain_bind_tools(server: Server) -> None:
    @tool
    def get_weather(city: Literal["Paris", "Oslo"], unit: Literal["celsius", "fahrenheit"]) -> str:
        """The weather in a city."""
        return "sunny"

    bound = _langchain(server, max_tokens=80).bind_tools(
        # strict: additionalProperties false, so that the grammar admits no extra (unbounded) property.
        [get_weather],
        tool_choice="get_weather",
        parallel_tool_calls=False,
        strict=True,
    )
    reply = bound.invoke("Weather in Paris?")
    assert [c["name"] for c in reply.tool_calls] == ["get_weather"]
    WeatherArgs.model_validate(reply.tool_calls[0]["args"])
    chunks = list(bound.stream("Weather in Paris?"))
    merged = chunks[0]
    for c in chunks[1:]:
        merged += c  # type: ignore[assignment]
    assert isinstance(merged, AIMessageChunk)
    assert [c["name"] for c in merged.tool_calls] == ["get_weather"]
    assert merged.tool_calls[0]["args"] == reply.tool_calls[0]["args"]
