"""The Responses API (``/v1/responses``) with the official openai SDK and raw httpx, against the real server."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from tests.servers import Server


def test_create_text(client: openai.OpenAI) -> None:
    r = client.responses.create(
        model="tiny", input="Say hello.", instructions="Be terse.", max_output_tokens=6, temperature=0
    )
    assert r.id.startswith("resp_") and r.object == "response" and r.model == "tiny"
    assert r.status in ("completed", "incomplete") and r.instructions == "Be terse."
    (item,) = r.output
    assert item.type == "message" and item.role == "assistant" and item.id.startswith("msg_")
    (part,) = item.content
    assert part.type == "output_text" and r.output_text == part.text
    assert r.usage is not None and 0 < r.usage.output_tokens <= 6
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens
    assert r.usage.input_tokens_details.cached_tokens == 0 and r.usage.output_tokens_details.reasoning_tokens == 0
    if r.usage.output_tokens == 6:
        assert r.status == "incomplete" and r.incomplete_details is not None
        assert r.incomplete_details.reason == "max_output_tokens"


def test_incomplete_at_max_output_tokens(server: Server) -> None:
    body = {"model": "tiny", "input": "Count.", "max_output_tokens": 1, "temperature": 0}
    r = httpx.post(f"{server.v1}/responses", json=body, timeout=60)
    assert r.status_code == 200, r.text
    doc = r.json()
    # One token is the whole budget unless it ended the turn (no `logit_bias` on /v1/responses to forbid that).
    assert doc["usage"]["output_tokens"] == 1
    assert doc["status"] == "incomplete" and doc["incomplete_details"] == {"reason": "max_output_tokens"}
    assert doc["output"][0]["status"] == "incomplete"
    assert doc["previous_response_id"] is None and doc["metadata"] == {} and doc["error"] is None


def test_stream_events_in_order(client: openai.OpenAI) -> None:
    whole = client.responses.create(model="tiny", input="Hi", max_output_tokens=8, temperature=0)
    stream = client.responses.create(model="tiny", input="Hi", max_output_tokens=8, temperature=0, stream=True)
    events = list(stream)
    types = [e.type for e in events]
    deltas = [e for e in events if e.type == "response.output_text.delta"]
    head = ["response.created", "response.in_progress", "response.output_item.added", "response.content_part.added"]
    tail = ["response.output_text.done", "response.content_part.done", "response.output_item.done"]
    assert types[:4] == head and types[4 : 4 + len(deltas)] == ["response.output_text.delta"] * len(deltas)
    assert types[4 + len(deltas) :] == [*tail, f"response.{whole.status}"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(d.delta for d in deltas)
    assert text == whole.output_text
    done = events[-1].response  # type: ignore[union-attr]
    assert done.output_text == text and done.usage is not None
    assert done.usage.output_tokens == whole.usage.output_tokens  # type: ignore[union-attr]
    assert len({e.item_id for e in deltas}) <= 1


def test_stream_helper(client: openai.OpenAI) -> None:
    with client.responses.stream(model="tiny", input="Hi", max_output_tokens=8, temperature=0) as stream:
        events = list(stream)
        deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
        last = events[-1]
        assert last.type in ("response.completed", "response.incomplete")
        assert last.response.output_text == "".join(deltas) and last.response.id.startswith("resp_")
        if last.type == "response.completed":  # the helper's final response comes only with this event
            assert stream.get_final_response().output_text == "".join(deltas)


def test_previous_response_id_chains(client: openai.OpenAI, server: Server) -> None:
    first = client.responses.create(model="tiny", input="My name is Ada.", max_output_tokens=5, temperature=0)
    second = client.responses.create(
        model="tiny", input="What is my name?", previous_response_id=first.id, max_output_tokens=5, temperature=0
    )
    alone = client.responses.create(model="tiny", input="What is my name?", max_output_tokens=5, temperature=0)
    assert second.previous_response_id == first.id
    assert first.usage is not None and second.usage is not None and alone.usage is not None
    assert second.usage.input_tokens > first.usage.input_tokens
    # The second prompt holds the first turn's input and output, then the new input.
    assert second.usage.input_tokens >= first.usage.input_tokens + first.usage.output_tokens + 1
    assert second.usage.input_tokens > alone.usage.input_tokens
    # The same conversation sent as chat: the same prompt.
    chat = client.chat.completions.create(
        model="tiny",
        messages=[
            {"role": "user", "content": "My name is Ada."},
            {"role": "assistant", "content": first.output_text},
            {"role": "user", "content": "What is my name?"},
        ],
        max_tokens=5,
        temperature=0,
    )
    assert chat.usage is not None and chat.usage.prompt_tokens == second.usage.input_tokens
    assert chat.choices[0].message.content == second.output_text


def test_get_delete_and_input_items(client: openai.OpenAI) -> None:
    r = client.responses.create(
        model="tiny",
        input=[
            {"role": "user", "content": "one"},
            {"role": "assistant", "content": [{"type": "output_text", "text": "two"}]},
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "three"}]},
        ],
        metadata={"k": "v"},
        max_output_tokens=4,
        temperature=0,
    )
    got = client.responses.retrieve(r.id)
    assert got.id == r.id and got.output_text == r.output_text and got.metadata == {"k": "v"}
    items = client.responses.input_items.list(r.id)
    texts = [i.content[0].text for i in items.data]  # type: ignore[union-attr]
    assert texts == ["three", "two", "one"]  # newest first, as OpenAI lists them
    asc = client.responses.input_items.list(r.id, order="asc", limit=2)
    assert [i.content[0].text for i in asc.data] == ["one", "two"] and asc.has_more  # type: ignore[union-attr]
    assert client.responses.delete(r.id) is None
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(r.id)


def test_store_false_is_not_retrievable(client: openai.OpenAI) -> None:
    r = client.responses.create(model="tiny", input="x", store=False, max_output_tokens=2)
    assert r.store is False
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(r.id)


def test_unknown_id_is_404(server: Server) -> None:
    for method, path in (
        ("GET", "/responses/resp_nope"),
        ("DELETE", "/responses/resp_nope"),
        ("GET", "/responses/resp_nope/input_items"),
    ):
        r = httpx.request(method, f"{server.v1}{path}", timeout=30)
        assert r.status_code == 404, (method, path, r.text)
        assert r.json() == {
            "error": {
                "message": "No response found with id 'resp_nope'",
                "type": "invalid_request_error",
                "param": None,
                "code": "response_not_found",
            }
        }
    r = httpx.post(
        f"{server.v1}/responses", json={"model": "tiny", "input": "x", "previous_response_id": "resp_nope"}, timeout=30
    )
    assert r.status_code == 404 and r.json()["error"]["param"] == "previous_response_id"


def test_another_tenants_response_is_404(auth_server: Server) -> None:
    alpha = openai.OpenAI(base_url=auth_server.v1, api_key="key-alpha", max_retries=0)
    beta = openai.OpenAI(base_url=auth_server.v1, api_key="key-beta", max_retries=0)
    r = alpha.responses.create(model="tiny", input="secret", max_output_tokens=2)
    with pytest.raises(openai.NotFoundError):
        beta.responses.retrieve(r.id)
    with pytest.raises(openai.NotFoundError):
        beta.responses.input_items.list(r.id)
    with pytest.raises(openai.NotFoundError):
        beta.responses.create(model="tiny", input="x", previous_response_id=r.id, max_output_tokens=2)
    with pytest.raises(openai.NotFoundError):
        beta.responses.delete(r.id)
    assert alpha.responses.retrieve(r.id).id == r.id


DEEP: dict[str, object] = {"type": "object"}
for _ in range(200):  # past the schemas' depth limit (gateway.limits.MAX_SCHEMA_DEPTH)
    DEEP = {"type": "object", "properties": {"a": DEEP}}


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"tools": [{"type": "web_search"}]}, "tools[0].type"),
        (
            {"tools": [{"type": "function", "name": "f"}, {"type": "code_interpreter", "container": "x"}]},
            "tools[1].type",
        ),
        ({"tools": [{"type": "function", "parameters": {"type": "object"}}]}, "tools[0].name"),
        (
            {"tools": [{"type": "function", "name": "f", "parameters": {"type": "nope"}}], "tool_choice": "required"},
            "tools",
        ),
        (
            {"tools": [{"type": "function", "name": "f"}, {"type": "function", "name": "g", "parameters": DEEP}]},
            "tools[1].parameters",
        ),
        ({"text": {"format": {"type": "json_schema", "name": "x", "schema": DEEP}}}, "text.format.schema"),
        (
            {"tools": [{"type": "function", "name": "f"}], "tool_choice": {"type": "function", "name": "g"}},
            "tool_choice",
        ),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": [{"type": "function", "name": "f"}], "tool_choice": {"type": "web_search_preview"}}, "tool_choice"),
        ({"tools": [{"type": "function", "name": "f"}], "tool_choice": "sometimes"}, "tool_choice"),
        ({"text": {"format": {"type": "grammar"}}}, "text.format.type"),
        ({"text": {"format": {"type": "json_schema", "schema": {"type": "object"}}}}, "text.format.name"),
        ({"text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "nope"}}}}, "text.format.schema"),
        ({"reasoning": {"effort": "high"}}, "reasoning"),
        ({"background": True}, "background"),
        ({"include": ["message.output_text.logprobs"]}, "include"),
        (
            {"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
            "input[0].content[0].type",
        ),
        ({"input": [{"type": "web_search_call", "id": "ws_1", "status": "completed"}]}, "input[0].type"),
        ({"input": [{"type": "function_call_output", "output": "1"}]}, "input[0].call_id"),
        ({"input": [{"type": "function_call", "call_id": "c", "arguments": "{}"}]}, "input[0].name"),
        (
            {
                "input": [
                    {"role": "user", "content": "x"},
                    {"type": "function_call", "call_id": "c", "name": "f", "arguments": "{x"},
                ]
            },
            "input[1].arguments",
        ),
        ({"previous_response_id": "resp_x", "prefix_cache": "c"}, "prefix_cache"),
        ({"max_output_tokens": 100000}, "max_output_tokens"),
    ],
)
def test_unsupported_fields_are_400(server: Server, extra: dict[str, object], param: str) -> None:
    body = {"model": "tiny", "input": "x", **extra}
    r = httpx.post(f"{server.v1}/responses", json=body, timeout=30)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error"


def test_built_in_tools_400_through_the_sdk(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as exc:
        client.responses.create(model="tiny", input="weather?", tools=[{"type": "web_search"}])
    assert exc.value.body["param"] == "tools[0].type"  # type: ignore[index]


# Function tools whose arguments are finite (enums, booleans): the random-weight model, forced by the grammar,
# closes them without the chat tests' logit_bias (which /v1/responses does not take).
WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "The weather in a city.",
    "parameters": {
        "type": "object",
        "properties": {
            "city": {"type": "string", "enum": ["Paris", "Oslo"]},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
        },
        "required": ["city", "unit"],
        "additionalProperties": False,
    },
    "strict": True,
}
FORCED = {
    "model": "tiny",
    "input": "What is the weather in Paris?",
    "tools": [WEATHER],
    "tool_choice": {"type": "function", "name": "get_weather"},
    "parallel_tool_calls": False,
    "max_output_tokens": 80,
    "temperature": 0,
}


def _sse(server: Server, body: dict[str, object]) -> list[dict[str, object]]:
    with httpx.stream("POST", f"{server.v1}/responses", json={**body, "stream": True}, timeout=60) as r:
        assert r.status_code == 200
        return [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]


def test_forced_function_call_shape(server: Server) -> None:
    r = httpx.post(f"{server.v1}/responses", json=FORCED, timeout=60)
    assert r.status_code == 200, r.text
    doc = r.json()
    assert doc["status"] == "completed" and doc["tool_choice"] == {"type": "function", "name": "get_weather"}
    assert doc["tools"] == [WEATHER] and doc["parallel_tool_calls"] is False
    (call,) = doc["output"]
    assert set(call) == {"type", "id", "call_id", "name", "arguments", "status"}
    assert call["type"] == "function_call" and call["id"].startswith("fc_") and call["call_id"].startswith("call_")
    assert call["name"] == "get_weather" and call["status"] == "completed"
    args = json.loads(call["arguments"])
    assert args["city"] in ("Paris", "Oslo") and args["unit"] in ("celsius", "fahrenheit")


def test_streamed_function_call_events(server: Server) -> None:
    whole = httpx.post(f"{server.v1}/responses", json=FORCED, timeout=60).json()
    events = _sse(server, FORCED)
    types = [e["type"] for e in events]
    n = types.count("response.function_call_arguments.delta")
    assert n > 0
    assert types == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        *["response.function_call_arguments.delta"] * n,
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    added, done = events[2]["item"], events[-2]["item"]
    assert added["type"] == "function_call" and added["arguments"] == "" and added["status"] == "in_progress"
    assert added["name"] == "get_weather" and done["id"] == added["id"] and done["status"] == "completed"
    deltas = [e for e in events if e["type"] == "response.function_call_arguments.delta"]
    assert all(e["item_id"] == added["id"] and e["output_index"] == 0 for e in deltas)
    arguments = "".join(str(e["delta"]) for e in deltas)
    assert events[-3]["arguments"] == arguments == done["arguments"] == whole["output"][0]["arguments"]
    assert events[-3]["name"] == "get_weather"
    final = events[-1]["response"]
    assert final["output"] == [done]  # type: ignore[index]


def test_function_call_items_in_the_input(client: openai.OpenAI, server: Server) -> None:
    call = {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"city": "Paris"}'}
    result = {"type": "function_call_output", "call_id": "call_1", "output": "sunny"}
    ask = {"role": "user", "content": "Weather in Paris?"}
    r = client.responses.create(
        model="tiny",
        input=[ask, call, result],
        tools=[WEATHER],
        max_output_tokens=3,
        temperature=0,  # type: ignore[list-item]
    )
    # The same conversation as chat: the call as the assistant's tool_calls, the output as a tool message.
    chat = client.chat.completions.create(
        model="tiny",
        messages=[
            ask,  # type: ignore[list-item]
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": call["arguments"]},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
        ],
        tools=[{"type": "function", "function": {k: v for k, v in WEATHER.items() if k != "type"}}],  # type: ignore[list-item]
        max_tokens=3,
        temperature=0,
    )
    assert r.usage is not None and chat.usage is not None
    assert r.usage.input_tokens == chat.usage.prompt_tokens and r.output_text == chat.choices[0].message.content
    items = httpx.get(f"{server.v1}/responses/{r.id}/input_items", params={"order": "asc"}, timeout=30).json()["data"]
    assert [i["type"] for i in items] == ["message", "function_call", "function_call_output"]
    assert items[1] | {"id": None} == {**call, "id": None, "status": "completed"}
    assert items[2]["output"] == "sunny" and items[2]["call_id"] == "call_1"


def test_tool_loop_over_previous_response_id(client: openai.OpenAI) -> None:
    """call -> function_call_output chained by previous_response_id -> an answer, prompted as chat would be."""
    first = client.responses.create(**FORCED)  # type: ignore[arg-type]
    (call,) = first.output
    assert call.type == "function_call"
    second = client.responses.create(
        model="tiny",
        previous_response_id=first.id,
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": "12 degrees"}],
        tools=[WEATHER],  # type: ignore[list-item]
        max_output_tokens=4,
        temperature=0,
    )
    assert second.status in ("completed", "incomplete") and second.output[0].type == "message"
    chat = client.chat.completions.create(
        model="tiny",
        messages=[
            {"role": "user", "content": FORCED["input"]},  # type: ignore[list-item]
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": call.call_id,
                        "type": "function",
                        "function": {"name": call.name, "arguments": call.arguments},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": call.call_id, "content": "12 degrees"},
        ],
        tools=[{"type": "function", "function": {k: v for k, v in WEATHER.items() if k != "type"}}],  # type: ignore[list-item]
        max_tokens=4,
        temperature=0,
    )
    assert second.usage is not None and chat.usage is not None
    assert second.usage.input_tokens == chat.usage.prompt_tokens
    assert second.output_text == chat.choices[0].message.content


def test_json_formats(server: Server) -> None:
    schema = {
        "type": "object",
        "properties": {"ok": {"type": "boolean"}, "unit": {"enum": ["c", "f"]}},
        "required": ["ok", "unit"],
        "additionalProperties": False,
    }
    fmt = {"type": "json_schema", "name": "verdict", "schema": schema, "strict": True}
    body = {"model": "tiny", "input": "JSON please", "max_output_tokens": 60, "temperature": 0, "text": {"format": fmt}}
    doc = httpx.post(f"{server.v1}/responses", json=body, timeout=60).json()
    assert doc["text"]["format"] == fmt and doc["status"] == "completed"
    assert set(json.loads(doc["output"][0]["content"][0]["text"])) == {"ok", "unit"}
    streamed = _sse(server, body)
    assert streamed[-1]["response"]["output"][0]["content"][0]["text"] == doc["output"][0]["content"][0]["text"]  # type: ignore[index]
    body["text"] = {"format": {"type": "json_object"}}
    doc = httpx.post(f"{server.v1}/responses", json=body, timeout=60).json()
    assert doc["text"]["format"] == {"type": "json_object"}
    if doc["status"] == "completed":  # an open object may not close within the budget on random weights
        assert isinstance(json.loads(doc["output"][0]["content"][0]["text"]), dict)
