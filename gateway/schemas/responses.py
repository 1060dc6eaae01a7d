"""The Responses API's wire shapes (``/v1/responses``) as msgspec Structs, after OpenAI's API reference.

Request Structs accept unknown fields, as on chat. Fields of OpenAI's request that this server cannot honour
yet (tools, reasoning, background, conversation, include, non-text parts, JSON output formats) are declared,
so that planning can answer a 400 naming them instead of silently ignoring them.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec

from gateway.limits import MAX_MESSAGES
from gateway.schemas.openai import CacheName, MaxTokens, PrefixCacheRef, Temperature

__all__ = [
    "DeletedResponse",
    "IncompleteDetails",
    "InputContentPart",
    "InputItem",
    "InputItemList",
    "InputMessageOut",
    "InputTokensDetails",
    "OutputMessage",
    "OutputText",
    "OutputTokensDetails",
    "Response",
    "ResponseContentPartEvent",
    "ResponseErrorBody",
    "ResponseEvent",
    "ResponseItemEvent",
    "ResponseTextDeltaEvent",
    "ResponseTextDoneEvent",
    "ResponseUsage",
    "ResponsesRequest",
    "TextConfig",
    "TextFormat",
]


class _Request(msgspec.Struct, kw_only=True):
    pass


class InputContentPart(_Request, kw_only=True):
    """A part of an input message: ``input_text`` (or ``output_text`` of a resent assistant turn). Other types
    (images, files, audio) are a 400 naming the part."""

    type: str
    text: str | None = None


class InputItem(_Request, kw_only=True):
    """An input item. Only messages for now (``type`` ``message`` or absent, as the easy input form sends);
    ``function_call`` and ``function_call_output`` items are a 400 naming the item."""

    type: str = "message"
    id: str | None = None
    role: Literal["user", "assistant", "system", "developer"] | None = None
    content: str | list[InputContentPart] | None = None
    status: str | None = None


class TextFormat(_Request, kw_only=True):
    type: str = "text"
    name: str | None = None
    schema_: dict[str, Any] | None = msgspec.field(default=None, name="schema")
    strict: bool | None = None


class TextConfig(_Request, kw_only=True):
    format: TextFormat | None = None
    verbosity: str | None = None


class ResponsesRequest(_Request, kw_only=True):
    model: str
    input: str | Annotated[list[InputItem], msgspec.Meta(max_length=MAX_MESSAGES)]
    instructions: str | None = None
    previous_response_id: str | None = None
    store: bool | None = True
    max_output_tokens: MaxTokens | None = None
    temperature: Temperature | None = None
    top_p: Annotated[float, msgspec.Meta(ge=0, le=1)] | None = None
    stream: bool | None = False
    metadata: dict[str, str] | None = None
    user: str | None = None
    text: TextConfig | None = None
    truncation: Literal["auto", "disabled"] | None = None
    parallel_tool_calls: bool | None = None
    # Ours: a named prefix cache to start from (SDKs send it through extra_body).
    prefix_cache: CacheName | PrefixCacheRef | None = None
    # OpenAI features this slice cannot honour: declared so that a request using one gets a 400 naming it.
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    reasoning: dict[str, Any] | None = None
    background: bool | None = None
    conversation: str | dict[str, Any] | None = None
    include: list[str] | None = None
    prompt: dict[str, Any] | None = None
    top_logprobs: int | None = None
    max_tool_calls: int | None = None


# ---- responses ------------------------------------------------------------------------------------


class _Response(msgspec.Struct, kw_only=True):
    pass


class OutputText(_Response, kw_only=True):
    type: Literal["output_text"] = "output_text"
    text: str
    annotations: list[Any] = []
    logprobs: list[Any] = []


class OutputMessage(_Response, kw_only=True):
    type: Literal["message"] = "message"
    id: str
    status: Literal["in_progress", "completed", "incomplete"]
    role: Literal["assistant"] = "assistant"
    content: list[OutputText]


class InputTokensDetails(_Response, kw_only=True):
    cached_tokens: int = 0


class OutputTokensDetails(_Response, kw_only=True):
    reasoning_tokens: int = 0


class ResponseUsage(_Response, kw_only=True):
    input_tokens: int
    input_tokens_details: InputTokensDetails
    output_tokens: int
    output_tokens_details: OutputTokensDetails
    total_tokens: int


class IncompleteDetails(_Response, kw_only=True):
    reason: Literal["max_output_tokens", "content_filter"]


class ResponseErrorBody(_Response, kw_only=True):
    code: str
    message: str


class _Reasoning(_Response, kw_only=True):
    effort: None = None
    summary: None = None


class _FormatText(_Response, kw_only=True):
    type: Literal["text"] = "text"


class _Text(_Response, kw_only=True):
    format: _FormatText = msgspec.field(default_factory=_FormatText)


class Response(_Response, kw_only=True):
    """A response, whole (``POST`` without ``stream``, ``GET``) or as the streamed events carry it."""

    id: str
    object: Literal["response"] = "response"
    created_at: int
    status: Literal["completed", "incomplete", "in_progress", "failed"]
    error: ResponseErrorBody | None = None
    incomplete_details: IncompleteDetails | None = None
    instructions: str | None = None
    max_output_tokens: int | None = None
    model: str
    output: list[OutputMessage]
    parallel_tool_calls: bool = True
    previous_response_id: str | None = None
    reasoning: _Reasoning = msgspec.field(default_factory=_Reasoning)
    store: bool = True
    temperature: float | None = None
    text: _Text = msgspec.field(default_factory=_Text)
    tool_choice: Literal["none", "auto"] = "auto"
    tools: list[Any] = []
    top_p: float | None = None
    truncation: Literal["auto", "disabled"] = "disabled"
    usage: ResponseUsage | None = None
    user: str | None = None
    metadata: dict[str, str] = {}


class DeletedResponse(_Response, kw_only=True):
    id: str
    object: Literal["response.deleted"] = "response.deleted"
    deleted: bool = True


class InputMessageOut(_Response, kw_only=True):
    """An input item as ``GET /v1/responses/{id}/input_items`` lists it."""

    type: Literal["message"] = "message"
    id: str
    status: Literal["completed"] = "completed"
    role: str
    content: list[dict[str, Any]]


class InputItemList(_Response, kw_only=True):
    object: Literal["list"] = "list"
    data: list[InputMessageOut]
    first_id: str | None
    last_id: str | None
    has_more: bool


# ---- streamed events (each with its `type` and `sequence_number`) ------------------------------------


class ResponseEvent(_Response, kw_only=True):
    """``response.created``, ``.in_progress``, ``.completed``, ``.incomplete``, ``.failed``."""

    type: str
    sequence_number: int
    response: Response


class ResponseItemEvent(_Response, kw_only=True):
    """``response.output_item.added`` / ``.done``."""

    type: str
    sequence_number: int
    output_index: int
    item: OutputMessage


class ResponseContentPartEvent(_Response, kw_only=True):
    """``response.content_part.added`` / ``.done``."""

    type: str
    sequence_number: int
    item_id: str
    output_index: int
    content_index: int
    part: OutputText


class ResponseTextDeltaEvent(_Response, kw_only=True):
    type: Literal["response.output_text.delta"] = "response.output_text.delta"
    sequence_number: int
    item_id: str
    output_index: int
    content_index: int
    delta: str
    logprobs: list[Any] = []


class ResponseTextDoneEvent(_Response, kw_only=True):
    type: Literal["response.output_text.done"] = "response.output_text.done"
    sequence_number: int
    item_id: str
    output_index: int
    content_index: int
    text: str
    logprobs: list[Any] = []
