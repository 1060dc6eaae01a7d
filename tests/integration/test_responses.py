"""The Responses API (``/v1/responses``) with the official openai SDK and raw httpx, against the real server."""

from __future__ import annotations

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
        ({"input": [{"type": "reasoning", "summary": []}]}, "input[0].type"),
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
