"""The Responses API's wire shapes (``/v1/responses``) as msgspec Structs, after OpenAI's API reference.

Request Structs accept unknown fields, as on chat. Fields of OpenAI's request that this server cannot honour
(built-in tools, reasoning, background, conversation, include, non-text parts) are declared, so that planning
can answer a 400 naming them instead of silently ignoring them. Output items, input items as listed and text
formats are tagged unions on ``type``, as OpenAI's are.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec

from gateway.limits import MAX_MESSAGES, MAX_TOOLS
from gateway.schemas.openai import CacheName, MaxTokens, PrefixCacheRef, Temperature

__all__ = [
    "DeletedResponse",
    "FunctionChoiceOut",
    "FunctionToolOut",
    "FormatJSONObject",
    "FormatJSONSchema",
    "FormatText",
    "FunctionCallItem",
    "FunctionCallOutputItem",
    "FunctionTool",
    "IncompleteDetails",
    "InputContentPart",
    "InputItem",
    "InputItemList",
    "InputItemOut",
    "InputMessageOut",
    "NamedFunctionChoice",
    "InputTokensDetails",
    "OutputItem",
    "OutputMessage",
    "OutputText",
    "OutputTokensDetails",
    "Response",
    "ResponseContentPartEvent",
    "ResponseErrorBody",
    "ResponseEvent",
    "ResponseFunctionCallArgumentsDeltaEvent",
    "ResponseFunctionCallArgumentsDoneEvent",
    "ResponseItemEvent",
    "ResponseTextDeltaEvent",
    "ResponseText",
    "ResponseTextDoneEvent",
    "ReasoningItem",
    "ReasoningText",
    "ResponseReasoningTextDeltaEvent",
    "ResponseReasoningTextDoneEvent",
    "ResponseUsage",
    "ResponsesRequest",
    "TextConfig",
    "TextFormat",
    "TextFormatOut",
    "ToolChoice",
]


class _Request(msgspec.Struct, kw_only=True):
    pass


class InputContentPart(_Request, kw_only=True):
    """A part of an input message: ``input_text`` (or ``output_text`` of a resent assistant turn). Other types
    (images, files, audio) are a 400 naming the part."""

    type: str
    text: str | None = None


class InputItem(_Request, kw_only=True):
    """An input item: a message (``type`` ``message`` or absent, as the easy input form sends), a
    ``function_call`` of an earlier turn or a ``function_call_output`` answering one. One flat Struct rather than
    a tagged union, because a message's ``type`` may be absent; planning checks each kind's fields and answers a
    400 naming the item for other types."""

    type: str = "message"
    id: str | None = None
    status: str | None = None
    # message
    role: Literal["user", "assistant", "system", "developer"] | None = None
    content: str | list[InputContentPart] | None = None
    # function_call (call_id, name, arguments) and function_call_output (call_id, output)
    call_id: str | None = None
    name: str | None = None
    arguments: str | None = None
    output: str | list[InputContentPart] | None = None


class FunctionTool(_Request, kw_only=True):
    """A tool in the Responses' flat form. ``type`` is any string so that a built-in tool (``web_search``, ...)
    is planning's 400 naming ``tools[i].type``, not a decoding error."""

    type: str
    name: str | None = None
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class NamedFunctionChoice(_Request, kw_only=True):
    """``tool_choice`` naming a function; other object forms (``allowed_tools``, built-ins) are a 400."""

    type: str
    name: str | None = None


ToolChoice = Literal["none", "auto", "required"] | NamedFunctionChoice


class TextFormat(_Request, kw_only=True):
    """``text``, ``json_object`` or ``json_schema`` (``name``, ``schema``, ``strict``): chat's ``response_format``
    flattened. Any other ``type`` is planning's 400."""

    type: str = "text"
    name: str | None = None
    description: str | None = None
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
    tools: Annotated[list[FunctionTool], msgspec.Meta(max_length=MAX_TOOLS)] | None = None
    tool_choice: ToolChoice | None = None
    # Ours: a named prefix cache to start from (SDKs send it through extra_body).
    prefix_cache: CacheName | PrefixCacheRef | None = None
    # OpenAI features this server cannot honour: declared so that a request using one gets a 400 naming it.
    reasoning: dict[str, Any] | None = None
    background: bool | None = None
    conversation: str | dict[str, Any] | None = None
    include: list[str] | None = None
    prompt: dict[str, Any] | None = None
    top_logprobs: int | None = None
    # Caps calls to built-in tools, which this server has none of: accepted, nothing to cap.
    max_tool_calls: int | None = None


# ---- responses ------------------------------------------------------------------------------------


class _Response(msgspec.Struct, kw_only=True):
    pass


class OutputText(_Response, kw_only=True):
    type: Literal["output_text"] = "output_text"
    text: str
    annotations: list[Any] = []
    logprobs: list[Any] = []


class OutputMessage(_Response, kw_only=True, tag_field="type", tag="message"):
    id: str
    status: Literal["in_progress", "completed", "incomplete"]
    role: Literal["assistant"] = "assistant"
    content: list[OutputText]


class FunctionCallItem(_Response, kw_only=True, tag_field="type", tag="function_call"):
    """A function call: an output item, and an input item as ``input_items`` lists it. ``call_id`` is what the
    ``function_call_output`` answering it names (chat's tool call id); ``id`` is the item's own."""

    id: str
    call_id: str
    name: str
    arguments: str  # JSON text, as OpenAI sends it
    status: Literal["in_progress", "completed", "incomplete"] = "completed"


class ReasoningText(_Response, kw_only=True):
    type: Literal["reasoning_text"] = "reasoning_text"
    text: str


class ReasoningItem(_Response, kw_only=True, tag_field="type", tag="reasoning"):
    """A thinking model's reasoning (its ``<think>`` block), as its own output item before the answer: the text
    in ``content``; no ``summary`` (this server writes none) and nothing encrypted."""

    id: str
    summary: list[Any] = []
    content: list[ReasoningText]
    status: Literal["in_progress", "completed", "incomplete"] = "completed"


OutputItem = OutputMessage | FunctionCallItem | ReasoningItem


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


class FormatText(_Response, kw_only=True, tag_field="type", tag="text"):
    pass


class FormatJSONObject(_Response, kw_only=True, tag_field="type", tag="json_object"):
    pass


class FormatJSONSchema(_Response, kw_only=True, tag_field="type", tag="json_schema"):
    name: str
    schema_: dict[str, Any] = msgspec.field(name="schema")
    description: str | msgspec.UnsetType = msgspec.UNSET
    strict: bool | msgspec.UnsetType = msgspec.UNSET


TextFormatOut = FormatText | FormatJSONObject | FormatJSONSchema


class ResponseText(_Response, kw_only=True):
    format: TextFormatOut = msgspec.field(default_factory=FormatText)
    verbosity: Literal["medium"] = "medium"


class FunctionToolOut(_Response, kw_only=True):
    """A function tool as the Response echoes it."""

    type: Literal["function"] = "function"
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class FunctionChoiceOut(_Response, kw_only=True):
    type: Literal["function"] = "function"
    name: str


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
    output: list[OutputItem]
    parallel_tool_calls: bool = True
    previous_response_id: str | None = None
    reasoning: _Reasoning = msgspec.field(default_factory=_Reasoning)
    store: bool = True
    temperature: float | None = None
    text: ResponseText = msgspec.field(default_factory=ResponseText)
    tool_choice: Literal["none", "auto", "required"] | FunctionChoiceOut = "auto"
    tools: list[FunctionToolOut] = []
    top_p: float | None = None
    truncation: Literal["auto", "disabled"] = "disabled"
    usage: ResponseUsage | None = None
    user: str | None = None
    metadata: dict[str, str] = {}


class DeletedResponse(_Response, kw_only=True):
    id: str
    object: Literal["response.deleted"] = "response.deleted"
    deleted: bool = True


class InputMessageOut(_Response, kw_only=True, tag_field="type", tag="message"):
    """An input message as ``GET /v1/responses/{id}/input_items`` lists it."""

    id: str
    status: Literal["completed"] = "completed"
    role: str
    content: list[dict[str, Any]]


class FunctionCallOutputItem(_Response, kw_only=True, tag_field="type", tag="function_call_output"):
    """A ``function_call_output`` input item as ``input_items`` lists it."""

    id: str
    call_id: str
    output: str
    status: Literal["completed"] = "completed"


InputItemOut = InputMessageOut | FunctionCallItem | FunctionCallOutputItem


class InputItemList(_Response, kw_only=True):
    object: Literal["list"] = "list"
    data: list[InputItemOut]
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
    item: OutputItem


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


class ResponseReasoningTextDeltaEvent(_Response, kw_only=True):
    type: Literal["response.reasoning_text.delta"] = "response.reasoning_text.delta"
    sequence_number: int
    item_id: str
    output_index: int
    content_index: int
    delta: str


class ResponseReasoningTextDoneEvent(_Response, kw_only=True):
    type: Literal["response.reasoning_text.done"] = "response.reasoning_text.done"
    sequence_number: int
    item_id: str
    output_index: int
    content_index: int
    text: str


class ResponseTextDoneEvent(_Response, kw_only=True):
    type: Literal["response.output_text.done"] = "response.output_text.done"
    sequence_number: int
    item_id: str
    output_index: int
    content_index: int
    text: str
    logprobs: list[Any] = []


class ResponseFunctionCallArgumentsDeltaEvent(_Response, kw_only=True):
    type: Literal["response.function_call_arguments.delta"] = "response.function_call_arguments.delta"
    sequence_number: int
    item_id: str
    output_index: int
    delta: str


class ResponseFunctionCallArgumentsDoneEvent(_Response, kw_only=True):
    type: Literal["response.function_call_arguments.done"] = "response.function_call_arguments.done"
    sequence_number: int
    item_id: str
    output_index: int
    name: str
    arguments: str
