"""gateway.responses.streaming: chat chunks with text and several tool calls as output items in order (the tiny
model never writes text before a call by itself, so the chunks are made here)."""

from __future__ import annotations

import msgspec

from gateway.responses.streaming import OutputEvents
from gateway.schemas.openai import ChatCompletionChunk, ChunkChoice, Delta, DeltaFunctionCall, DeltaToolCall


def _chunk(delta: Delta) -> ChatCompletionChunk:
    return ChatCompletionChunk(id="c", created=0, model="m", choices=[ChunkChoice(index=0, delta=delta)])


def _call(index: int, arguments: str, call_id: str | None = None, name: str | None = None) -> Delta:
    function = DeltaFunctionCall(name=name or msgspec.UNSET, arguments=arguments)
    head = {"id": call_id, "type": "function"} if call_id else {}
    return Delta(tool_calls=[DeltaToolCall(index=index, function=function, **head)])


def test_text_then_two_calls_are_three_items_in_order() -> None:
    out = OutputEvents()
    assert out.seq() == 0
    deltas = [
        Delta(role="assistant", content=""),
        Delta(content="Let me "),
        Delta(content="check."),
        _call(0, "", "call_a", "f"),
        _call(0, '{"x": '),
        _call(0, "1}"),
        _call(1, "", "call_b", "g"),
        _call(1, "{}"),
    ]
    events = [msgspec.to_builtins(e) for d in deltas for e in out.feed(_chunk(d))]
    events += [msgspec.to_builtins(e) for e in out.close(False)]
    assert [e["sequence_number"] for e in events] == list(range(1, len(events) + 1))
    assert [(e["type"], e.get("output_index")) for e in events] == [
        ("response.output_item.added", 0),
        ("response.content_part.added", 0),
        ("response.output_text.delta", 0),
        ("response.output_text.delta", 0),
        ("response.output_text.done", 0),
        ("response.content_part.done", 0),
        ("response.output_item.done", 0),
        ("response.output_item.added", 1),
        ("response.function_call_arguments.delta", 1),
        ("response.function_call_arguments.delta", 1),
        ("response.function_call_arguments.done", 1),
        ("response.output_item.done", 1),
        ("response.output_item.added", 2),
        ("response.function_call_arguments.delta", 2),
        ("response.function_call_arguments.done", 2),
        ("response.output_item.done", 2),
    ]
    message, first, second = (msgspec.to_builtins(i) for i in out.output)
    assert message["type"] == "message" and message["content"][0]["text"] == "Let me check."
    assert first == {
        "type": "function_call",
        "id": first["id"],
        "call_id": "call_a",
        "name": "f",
        "arguments": '{"x": 1}',
        "status": "completed",
    }
    assert second["call_id"] == "call_b" and second["arguments"] == "{}" and second["name"] == "g"
    assert events[10]["name"] == "f" and events[10]["arguments"] == '{"x": 1}'


def test_nothing_produced_is_one_empty_message_and_incomplete_marks_the_open_item() -> None:
    out = OutputEvents()
    types = [e.type for e in out.close(True)]  # type: ignore[attr-defined]
    assert types[0] == "response.output_item.added" and types[-1] == "response.output_item.done"
    (item,) = out.output
    assert msgspec.to_builtins(item)["status"] == "incomplete"
    out = OutputEvents()
    list(out.feed(_chunk(_call(0, '{"x": ', "call_a", "f"))))
    list(out.close(True))
    assert msgspec.to_builtins(out.output[0])["status"] == "incomplete"
