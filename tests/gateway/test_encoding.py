"""The encoders on their own (no engine, no server): hand-made engine events in, OpenAI's exact JSON out, as a
whole response (``ResponseEncoder``) and as streamed chunks (``ChunkEncoder``)."""

from __future__ import annotations

from typing import Any, Literal

import msgspec

from adapters.base import (
    ChoiceFinished,
    Finished,
    Plan,
    SamplingParams,
    TokenEvent,
    TokenLogprob,
    ToolCallOut,
    TopLogprob,
)
from gateway.encoding import ChunkEncoder, ResponseEncoder, encode
from gateway.planning import PlannedRequest

FP = "fp_0123456789ab"

HI = TokenLogprob(
    token="Hi",
    token_id=5,
    logprob=-0.5,
    bytes=(72, 105),
    top=(TopLogprob(token="Hi", logprob=-0.5, bytes=(72, 105)), TopLogprob(token="Yo", logprob=-1.5, bytes=(89, 111))),
)
THERE = TokenLogprob(token=" there", token_id=6, logprob=-0.25, bytes=(32, 116, 104, 101, 114, 101))

HI_WIRE = {
    "token": "Hi",
    "logprob": -0.5,
    "bytes": [72, 105],
    "top_logprobs": [
        {"token": "Hi", "logprob": -0.5, "bytes": [72, 105]},
        {"token": "Yo", "logprob": -1.5, "bytes": [89, 111]},
    ],
}


def _planned(
    kind: Literal["chat", "completion"] = "chat",
    *,
    prompts: int = 1,
    n: int = 1,
    logprobs: bool = False,
    top_logprobs: int = 0,
    include_usage: bool = True,
    echo: tuple[str, ...] = (),
) -> PlannedRequest:
    plan = Plan(
        request_id="req-1",
        model="tiny",
        tenant="default",
        prompt_tokens=(1, 2, 3),
        sampling=SamplingParams(max_tokens=8, n=n, logprobs=logprobs, top_logprobs=top_logprobs),
    )
    return PlannedRequest(
        kind=kind,
        id="chatcmpl-1" if kind == "chat" else "cmpl-1",
        created=1700000000,
        model="tiny",
        plans=(plan,) * prompts,
        n=n,
        stream=True,
        include_usage=include_usage,
        logprobs=logprobs,
        top_logprobs=top_logprobs,
        echo=echo,
    )


def _wire(obj: msgspec.Struct) -> Any:
    """What a client receives: the encoder's output through the one JSON encoder."""
    return msgspec.json.decode(encode(obj))


def _chunk(choices: list[dict[str, Any]], usage: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": "tiny",
        "choices": choices,
        "system_fingerprint": FP,
        "usage": usage,
    }


def _delta(delta: dict[str, Any], *, index: int = 0, logprobs: Any = None, finish: str | None = None) -> dict[str, Any]:
    return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}


def _text(text: str, *, index: int = 0, logprobs: Any = None, finish: str | None = None) -> dict[str, Any]:
    return {
        "id": "cmpl-1",
        "object": "text_completion",
        "created": 1700000000,
        "model": "tiny",
        "choices": [{"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}],
        "system_fingerprint": FP,
        "usage": None,
    }


def _stream(encoder: ChunkEncoder, events: list[tuple[int, TokenEvent | ChoiceFinished | Finished]]) -> list[Any]:
    out = [_wire(c) for c in encoder.opening()]
    for index, event in events:
        out += [_wire(c) for c in encoder.feed(index, event)]
    return out


# ResponseEncoder: one chat.completion or text_completion.


def test_a_chat_completion_joins_text_keeps_logprobs_and_reports_cached_tokens() -> None:
    encoder = ResponseEncoder(_planned(logprobs=True, top_logprobs=2), FP)
    encoder.feed(0, TokenEvent(choice=0, text="Hi", token_ids=(5,), logprobs=(HI,)))
    encoder.feed(0, TokenEvent(choice=0, text="", token_ids=(7,)))  # held back: a possible stop string
    encoder.feed(0, ChoiceFinished(choice=0, reason="stop", text="!"))  # released at the end
    encoder.feed(0, Finished(prompt_tokens=3, completion_tokens=2, cached_tokens=2))
    assert _wire(encoder.build()) == {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1700000000,
        "model": "tiny",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Hi!", "refusal": None},
                "logprobs": {"content": [HI_WIRE], "refusal": None},
                "finish_reason": "stop",
            }
        ],
        "usage": {
            "prompt_tokens": 3,
            "completion_tokens": 2,
            "total_tokens": 5,
            "prompt_tokens_details": {"cached_tokens": 2},
        },
        "system_fingerprint": FP,
        "service_tier": None,
    }


def test_a_chat_tool_call_has_null_content_its_reasoning_apart_and_no_logprobs_unasked() -> None:
    encoder = ResponseEncoder(_planned(), FP)
    encoder.feed(0, TokenEvent(choice=0, text="", token_ids=(1,), reasoning="Need the weather."))
    call = ToolCallOut(id="call_1", name="get_weather", arguments='{"city": "Paris"}')
    encoder.feed(0, TokenEvent(choice=0, text="\n", token_ids=(2, 3), tool_calls=(call,)))
    encoder.feed(0, ChoiceFinished(choice=0, reason="tool_calls"))
    encoder.feed(0, Finished(prompt_tokens=10, completion_tokens=3, reasoning_tokens=1))
    body = _wire(encoder.build())
    assert body["choices"] == [
        {
            "index": 0,
            "message": {
                "role": "assistant",
                "content": None,  # only whitespace besides the call
                "reasoning_content": "Need the weather.",
                "refusal": None,
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                    }
                ],
            },
            "logprobs": None,
            "finish_reason": "tool_calls",
        }
    ]
    assert body["usage"] == {
        "prompt_tokens": 10,
        "completion_tokens": 3,
        "total_tokens": 13,
        "prompt_tokens_details": {"cached_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 1},
    }


def test_a_completion_orders_choices_by_prompt_then_choice_and_sums_usage_over_prompts() -> None:
    """Two prompts, n=2: choice ``i`` of prompt ``p`` is ``p * n + i``; events of the prompts interleave."""
    encoder = ResponseEncoder(_planned("completion", prompts=2, n=2, echo=("A:", "B:")), FP)
    for prompt, choice, text in [(1, 1, "d"), (0, 0, "a"), (1, 0, "c"), (0, 1, "b")]:
        encoder.feed(prompt, TokenEvent(choice=choice, text=text, token_ids=(9,)))
    for prompt in (1, 0):
        for choice in (0, 1):
            encoder.feed(prompt, ChoiceFinished(choice=choice, reason="length" if prompt else "stop"))
        encoder.feed(prompt, Finished(prompt_tokens=3, completion_tokens=2, cached_tokens=prompt))
    body = _wire(encoder.build())
    assert body["object"] == "text_completion" and body["id"] == "cmpl-1"
    assert [(c["index"], c["text"], c["finish_reason"], c["logprobs"]) for c in body["choices"]] == [
        (0, "A:a", "stop", None),
        (1, "A:b", "stop", None),
        (2, "B:c", "length", None),
        (3, "B:d", "length", None),
    ]
    assert body["usage"] == {
        "prompt_tokens": 6,
        "completion_tokens": 4,
        "total_tokens": 10,
        "prompt_tokens_details": {"cached_tokens": 1},
    }


def test_a_completions_logprobs_give_offsets_and_top_logprobs_as_a_map() -> None:
    encoder = ResponseEncoder(_planned("completion", logprobs=True, top_logprobs=2), FP)
    encoder.feed(0, TokenEvent(choice=0, text="Hi", token_ids=(5,), logprobs=(HI,)))
    encoder.feed(0, TokenEvent(choice=0, text=" there", token_ids=(6,), logprobs=(THERE,)))
    encoder.feed(0, ChoiceFinished(choice=0, reason="length"))
    encoder.feed(0, Finished(prompt_tokens=3, completion_tokens=2))
    [choice] = _wire(encoder.build())["choices"]
    assert choice == {
        "index": 0,
        "text": "Hi there",
        "logprobs": {
            "tokens": ["Hi", " there"],
            "token_logprobs": [-0.5, -0.25],
            "top_logprobs": [{"Hi": -0.5, "Yo": -1.5}, {}],
            "text_offset": [0, 2],
        },
        "finish_reason": "length",
    }


# ChunkEncoder: chat.completion.chunk and text_completion chunks.


def test_a_chat_stream_is_role_then_content_then_finish_then_usage() -> None:
    encoder = ChunkEncoder(_planned(logprobs=True, top_logprobs=2), FP)
    chunks = _stream(
        encoder,
        [
            (0, TokenEvent(choice=0, text="Hi", token_ids=(5,), logprobs=(HI,))),
            (0, TokenEvent(choice=0, text="", token_ids=(7,))),  # held back: nothing to send
            (0, ChoiceFinished(choice=0, reason="stop", text="!")),
            (0, Finished(prompt_tokens=3, completion_tokens=2, cached_tokens=2)),
        ],
    )
    assert chunks == [
        _chunk([_delta({"role": "assistant", "content": ""})]),
        _chunk([_delta({"content": "Hi"}, logprobs={"content": [HI_WIRE], "refusal": None})]),
        _chunk([_delta({"content": "!"}, logprobs={"content": [], "refusal": None})]),
        _chunk([_delta({}, finish="stop")]),
    ]
    assert _wire(encoder.usage()) == _chunk(
        [],
        usage={
            "prompt_tokens": 3,
            "completion_tokens": 2,
            "total_tokens": 5,
            "prompt_tokens_details": {"cached_tokens": 2},
        },
    )


def test_streamed_reasoning_comes_in_its_own_delta_before_the_answer_with_the_logprobs_on_the_answer() -> None:
    encoder = ChunkEncoder(_planned(logprobs=True), FP)
    chunks = _stream(
        encoder,
        [
            (0, TokenEvent(choice=0, text="", token_ids=(4,), logprobs=(THERE,), reasoning="Hmm.")),
            (0, TokenEvent(choice=0, text="Hi", token_ids=(5,), logprobs=(HI,), reasoning=" ok")),
        ],
    )
    there = {"token": " there", "logprob": -0.25, "bytes": [32, 116, 104, 101, 114, 101], "top_logprobs": []}
    assert chunks[1:] == [
        _chunk([_delta({"reasoning_content": "Hmm."}, logprobs={"content": [there], "refusal": None})]),
        _chunk([_delta({"reasoning_content": " ok"}, logprobs={"content": [], "refusal": None})]),
        _chunk([_delta({"content": "Hi"}, logprobs={"content": [HI_WIRE], "refusal": None})]),
    ]


def test_streamed_tool_calls_are_a_head_then_arguments_indexed_per_choice() -> None:
    """OpenAI's shape: the first fragment has id, type, name and empty arguments; the next only the arguments;
    a choice's second call is index 1; the last chunk says ``tool_calls``."""
    encoder = ChunkEncoder(_planned(n=2, include_usage=False), FP)
    first = ToolCallOut(id="call_a", name="f", arguments='{"x": 1}')
    second = ToolCallOut(id="call_b", name="g", arguments="{}")
    chunks = _stream(
        encoder,
        [
            (0, TokenEvent(choice=1, text="", token_ids=(1,), tool_calls=(first, second))),
            (0, ChoiceFinished(choice=1, reason="tool_calls")),
            (0, ChoiceFinished(choice=0, reason="stop")),
        ],
    )

    def call(index: int, **fields: Any) -> dict[str, Any]:
        return _delta({"tool_calls": [{"index": index, **fields}]}, index=1)

    assert chunks == [
        _chunk([_delta({"role": "assistant", "content": ""}, index=0)]),
        _chunk([_delta({"role": "assistant", "content": ""}, index=1)]),
        _chunk([call(0, id="call_a", type="function", function={"name": "f", "arguments": ""})]),
        _chunk([call(0, function={"arguments": '{"x": 1}'})]),
        _chunk([call(1, id="call_b", type="function", function={"name": "g", "arguments": ""})]),
        _chunk([call(1, function={"arguments": "{}"})]),
        _chunk([_delta({}, index=1, finish="tool_calls")]),
        _chunk([_delta({}, index=0, finish="stop")]),
    ]


def test_a_completion_stream_echoes_first_and_counts_text_offsets_across_chunks() -> None:
    encoder = ChunkEncoder(_planned("completion", logprobs=True, top_logprobs=1, echo=("Say:",)), FP)
    chunks = _stream(
        encoder,
        [
            (0, TokenEvent(choice=0, text="Hi", token_ids=(5,), logprobs=(HI,))),
            (0, TokenEvent(choice=0, text=" there", token_ids=(6,), logprobs=(THERE,))),
            (0, ChoiceFinished(choice=0, reason="length")),
            (0, Finished(prompt_tokens=3, completion_tokens=2, cached_tokens=3, reasoning_tokens=0)),
        ],
    )
    assert chunks == [
        _text("Say:"),
        _text(
            "Hi",
            logprobs={
                "tokens": ["Hi"],
                "token_logprobs": [-0.5],
                "top_logprobs": [{"Hi": -0.5, "Yo": -1.5}],
                "text_offset": [4],
            },
        ),
        _text(
            " there",
            logprobs={"tokens": [" there"], "token_logprobs": [-0.25], "top_logprobs": [{}], "text_offset": [6]},
        ),
        _text("", finish="length"),
    ]
    usage = _wire(encoder.usage())
    assert usage["choices"] == [] and usage["object"] == "text_completion"
    assert usage["usage"] == {
        "prompt_tokens": 3,
        "completion_tokens": 2,
        "total_tokens": 5,
        "prompt_tokens_details": {"cached_tokens": 3},
        "completion_tokens_details": {"reasoning_tokens": 0},
    }
