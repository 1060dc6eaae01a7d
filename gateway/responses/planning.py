"""A ``/v1/responses`` request as chat planning takes it, and a chat completion back as a Response.

``instructions`` + the stored conversation of ``previous_response_id`` + the new input become chat messages
(``function_call`` items an assistant message's ``tool_calls``, ``function_call_output`` items ``tool``
messages); function ``tools``, ``tool_choice`` and ``text.format`` become chat's ``tools``, ``tool_choice`` and
``response_format``. The chat planning (template, tokens, limits, tools, grammar, prefix cache, tenant) does the
rest, so every rule of chat applies, and its errors name the Responses field (:func:`rename_param`). Fields this
server cannot honour are a 400 naming the field, never silently ignored.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Sequence

import msgspec

from gateway.errors import APIError, InvalidRequest
from gateway.schemas.openai import (
    ChatCompletion,
    ChatCompletionRequest,
    ChatMessage,
    FunctionCallIn,
    FunctionDef,
    FunctionName,
    JSONSchemaFormat,
    NamedToolChoice,
    ResponseFormat,
    ResponseFormatJSONObject,
    ResponseFormatJSONSchema,
    StreamOptions,
    ToolCallIn,
    ToolChoice,
    ToolDef,
    Usage,
)
from gateway.schemas.responses import (
    FormatJSONObject,
    FormatJSONSchema,
    FormatText,
    FunctionCallItem,
    FunctionCallOutputItem,
    FunctionChoiceOut,
    FunctionToolOut,
    IncompleteDetails,
    InputContentPart,
    InputItem,
    InputItemOut,
    InputMessageOut,
    InputTokensDetails,
    OutputItem,
    OutputMessage,
    OutputText,
    OutputTokensDetails,
    ReasoningItem,
    ReasoningText,
    Response,
    ResponsesRequest,
    ResponseText,
    ResponseUsage,
    TextFormatOut,
)

__all__ = [
    "as_chat",
    "assistant_message",
    "check_unsupported",
    "from_chat",
    "input_messages",
    "new_call_item_id",
    "new_item_id",
    "new_reasoning_id",
    "new_response_id",
    "output_message",
    "rename_param",
    "response_of",
    "usage_from_chat",
    "usage_of",
]


def new_reasoning_id() -> str:
    return f"rs_{uuid.uuid4().hex}"


def new_response_id(previous: str | None = None) -> str:
    """``resp_`` and 32 hex digits. A continuation's first 16 digits are its conversation's (its first
    response's), so that a load balancer that hashes them (``gateway.replicas.haproxy_config``) sends every turn of a
    conversation to the replica that holds its KV."""
    own = uuid.uuid4().hex
    if previous is not None and re.fullmatch(r"resp_[0-9a-f]{32}", previous):
        return f"resp_{previous[5:21]}{own[16:]}"
    return f"resp_{own}"


def new_item_id() -> str:
    return f"msg_{uuid.uuid4().hex}"


def new_call_item_id() -> str:
    return f"fc_{uuid.uuid4().hex}"


def check_unsupported(req: ResponsesRequest) -> None:
    """A 400 naming the first field that would change OpenAI's answer in a way this server cannot follow."""
    for i, tool in enumerate(req.tools or ()):
        if tool.type != "function":
            raise InvalidRequest(
                f"Tools of type '{tool.type}' are not supported: this server has no built-in tools, only 'function'",
                param=f"tools[{i}].type",
            )
        if not tool.name:
            raise InvalidRequest("A function tool needs a 'name'", param=f"tools[{i}].name")
    choice = req.tool_choice
    if not isinstance(choice, str | None):
        if choice.type != "function":
            raise InvalidRequest(
                f"'tool_choice' of type '{choice.type}' is not supported; only 'none', 'auto', 'required' or "
                "a function ({'type': 'function', 'name': ...})",
                param="tool_choice",
            )
        if not choice.name:
            raise InvalidRequest("A 'tool_choice' naming a function needs its 'name'", param="tool_choice.name")
    fmt = req.text.format if req.text is not None else None
    if fmt is not None:
        if fmt.type not in ("text", "json_object", "json_schema"):
            raise InvalidRequest(
                f"'text.format' of type '{fmt.type}' is not supported; only 'text', 'json_object' and 'json_schema'",
                param="text.format.type",
            )
        if fmt.type == "json_schema" and not fmt.name:
            raise InvalidRequest("A 'json_schema' text format needs a 'name'", param="text.format.name")
        if fmt.type == "json_schema" and fmt.schema_ is None:
            raise InvalidRequest("A 'json_schema' text format needs a 'schema'", param="text.format.schema")
    if req.text is not None and req.text.verbosity not in (None, "medium"):
        raise InvalidRequest("'text.verbosity' is not supported by this model", param="text.verbosity")
    if req.reasoning and any(v is not None for v in req.reasoning.values()):
        raise InvalidRequest("'reasoning': this model is not a reasoning model", param="reasoning")
    if req.background:
        raise InvalidRequest("'background' responses are not supported", param="background")
    if req.conversation is not None:
        raise InvalidRequest("'conversation' is not supported: use 'previous_response_id'", param="conversation")
    if req.include:
        raise InvalidRequest(f"'include' values are not supported: {', '.join(req.include)}", param="include")
    if req.prompt is not None:
        raise InvalidRequest("Reusable 'prompt' templates are not supported", param="prompt")
    if req.top_logprobs:
        raise InvalidRequest("'top_logprobs' is not supported on /v1/responses yet", param="top_logprobs")
    if req.previous_response_id is not None and req.prefix_cache is not None:
        raise InvalidRequest("'previous_response_id' and 'prefix_cache' cannot be used together", param="prefix_cache")


def _texts(parts: Sequence[InputContentPart], param: str) -> tuple[str, list[dict[str, str]]]:
    """Text parts joined, and the parts as ``input_items`` lists them; other parts are a 400 naming them."""
    texts, listed = [], []
    for j, part in enumerate(parts):
        if part.type not in ("input_text", "output_text") or part.text is None:
            raise InvalidRequest(
                f"Content parts of type '{part.type}' are not supported by this model; only text is",
                param=f"{param}[{j}].type",
            )
        texts.append(part.text)
        listed.append({"type": part.type, "text": part.text})
    return "".join(texts), listed


def _message(i: int, item: InputItem) -> tuple[ChatMessage, InputMessageOut]:
    if item.role is None:
        raise InvalidRequest("A message item needs a 'role'", param=f"input[{i}].role")
    if item.content is None:
        raise InvalidRequest("A message item needs 'content'", param=f"input[{i}].content")
    if isinstance(item.content, str):
        text, kind = item.content, "output_text" if item.role == "assistant" else "input_text"
        parts = [{"type": kind, "text": text}]
    else:
        text, parts = _texts(item.content, f"input[{i}].content")
    return ChatMessage(role=item.role, content=text), InputMessageOut(
        id=item.id or new_item_id(), role=item.role, content=parts
    )


def _required(i: int, item: InputItem, field: str) -> str:
    value = getattr(item, field)
    if not isinstance(value, str) or (field != "arguments" and not value):
        raise InvalidRequest(f"A '{item.type}' item needs '{field}'", param=f"input[{i}].{field}")
    return value


def _function_call(i: int, item: InputItem) -> tuple[ToolCallIn, FunctionCallItem]:
    call_id, name, arguments = (_required(i, item, f) for f in ("call_id", "name", "arguments"))
    # Checked here, where the item's index is known: chat planning would name the message it became.
    try:
        json.loads(arguments or "{}")
    except (json.JSONDecodeError, RecursionError) as exc:
        raise InvalidRequest(f"'arguments' must be JSON text: {exc}", param=f"input[{i}].arguments") from None
    call = ToolCallIn(id=call_id, function=FunctionCallIn(name=name, arguments=arguments))
    listed = FunctionCallItem(id=item.id or new_call_item_id(), call_id=call_id, name=name, arguments=arguments)
    return call, listed


def _function_output(i: int, item: InputItem) -> tuple[ChatMessage, FunctionCallOutputItem]:
    call_id = _required(i, item, "call_id")
    if item.output is None:
        raise InvalidRequest("A 'function_call_output' item needs 'output'", param=f"input[{i}].output")
    output = item.output if isinstance(item.output, str) else _texts(item.output, f"input[{i}].output")[0]
    listed = FunctionCallOutputItem(id=item.id or f"fco_{uuid.uuid4().hex}", call_id=call_id, output=output)
    return ChatMessage(role="tool", content=output, tool_call_id=call_id), listed


def input_messages(req: ResponsesRequest) -> tuple[list[ChatMessage], list[InputItemOut]]:
    """The request's input as chat messages, and its items as ``input_items`` lists them.

    Consecutive ``function_call`` items become one assistant message with several ``tool_calls``, joined to the
    assistant message just before them if it has none: chat's form of one turn that said something and called.
    """
    if isinstance(req.input, str):
        parts = [{"type": "input_text", "text": req.input}]
        return [ChatMessage(role="user", content=req.input)], [
            InputMessageOut(id=new_item_id(), role="user", content=parts)
        ]
    messages: list[ChatMessage] = []
    items: list[InputItemOut] = []
    for i, item in enumerate(req.input):
        if item.type == "message":
            message, listed = _message(i, item)
            messages.append(message)
        elif item.type == "function_call":
            call, listed = _function_call(i, item)
            last = messages[-1] if messages else None
            if last is None or last.role != "assistant":
                messages.append(ChatMessage(role="assistant", content=None, tool_calls=[call]))
            elif last.tool_calls is None:
                last.tool_calls = [call]
            else:
                last.tool_calls.append(call)
        elif item.type == "function_call_output":
            message, listed = _function_output(i, item)
            messages.append(message)
        elif item.type == "reasoning":
            # A client managing its own context resends the reasoning it was given; templates leave earlier turns'
            # thinking out, and so does this server.
            continue
        else:
            raise InvalidRequest(
                f"Input items of type '{item.type}' are not supported; only messages, 'function_call', "
                "'function_call_output' and 'reasoning'",
                param=f"input[{i}].type",
            )
        items.append(listed)
    return messages, items


def _chat_tools(req: ResponsesRequest) -> list[ToolDef] | None:
    """Function tools in chat's nested form, in the same order (chat's ``tools[i]`` is the request's)."""
    if not req.tools:
        return None
    return [
        ToolDef(
            type="function",
            function=FunctionDef(
                name=t.name or "", description=t.description, parameters=t.parameters, strict=t.strict
            ),
        )
        for t in req.tools
    ]


def _chat_tool_choice(req: ResponsesRequest) -> ToolChoice | None:
    choice = req.tool_choice
    if choice is None or isinstance(choice, str):
        return choice
    return NamedToolChoice(type="function", function=FunctionName(name=choice.name or ""))


def _response_format(req: ResponsesRequest) -> ResponseFormat | None:
    fmt = req.text.format if req.text is not None else None
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return ResponseFormatJSONObject()
    schema = JSONSchemaFormat(name=fmt.name or "", description=fmt.description, schema_=fmt.schema_, strict=fmt.strict)
    return ResponseFormatJSONSchema(json_schema=schema)


def as_chat(req: ResponsesRequest, history: Sequence[ChatMessage], new: Sequence[ChatMessage]) -> ChatCompletionRequest:
    """The chat request to plan: ``instructions`` first (never carried over), then the chain, then the input."""
    system = [ChatMessage(role="system", content=req.instructions)] if req.instructions else []
    return ChatCompletionRequest(
        model=req.model,
        messages=[*system, *history, *new],
        max_completion_tokens=req.max_output_tokens,
        temperature=req.temperature,
        top_p=req.top_p,
        stream=bool(req.stream),
        stream_options=StreamOptions(include_usage=True) if req.stream else None,
        tools=_chat_tools(req),
        tool_choice=_chat_tool_choice(req),
        parallel_tool_calls=req.parallel_tool_calls,
        response_format=_response_format(req),
        prefix_cache=req.prefix_cache,
        user=req.user,
    )


# Chat's names for the Responses' fields: (chat prefix, Responses prefix), the first that matches wins.
_PARAMS = (
    ("messages", "input"),  # messages are not items one to one (instructions, history, joined calls)
    ("max_completion_tokens", "max_output_tokens"),
    ("max_tokens", "max_output_tokens"),
    ("response_format.json_schema.schema", "text.format.schema"),
    ("response_format", "text.format"),
    ("tool_choice.function.name", "tool_choice.name"),
)


def rename_param(exc: APIError) -> APIError:
    """A chat planning error with its ``param`` named as the Responses request names it."""
    param = exc.param
    if param is None:
        return exc
    if param.startswith("tools[") and ".function." in param:
        exc.param = param.replace(".function.", ".", 1)  # tools[i].function.parameters -> tools[i].parameters
        return exc
    for chat, ours in _PARAMS:
        if param == chat or param.startswith((chat + ".", chat + "[")):
            exc.param = ours if chat == "messages" else ours + param[len(chat) :]
            return exc
    return exc


def output_message(item_id: str, text: str, incomplete: bool) -> OutputMessage:
    return OutputMessage(
        id=item_id, status="incomplete" if incomplete else "completed", content=[OutputText(text=text)]
    )


def assistant_message(output: Sequence[OutputItem]) -> ChatMessage:
    """A response's output as the assistant message a continuation resends: its text, and its function calls as
    ``tool_calls`` (so that a ``function_call_output`` in the next request answers a call the template saw)."""
    text = "".join(part.text for item in output if isinstance(item, OutputMessage) for part in item.content)
    calls = [
        ToolCallIn(id=item.call_id, function=FunctionCallIn(name=item.name, arguments=item.arguments))
        for item in output
        if isinstance(item, FunctionCallItem)
    ]
    if not calls:
        return ChatMessage(role="assistant", content=text)
    return ChatMessage(role="assistant", content=text or None, tool_calls=calls)


def usage_from_chat(u: Usage) -> ResponseUsage:
    """A chat completion's usage as the Responses API counts it."""
    details = u.completion_tokens_details
    reasoning = 0 if isinstance(details, msgspec.UnsetType) else details.reasoning_tokens
    return usage_of(u.prompt_tokens, u.completion_tokens, u.prompt_tokens_details.cached_tokens, reasoning)


def usage_of(prompt: int, completion: int, cached: int, reasoning: int = 0) -> ResponseUsage:
    return ResponseUsage(
        input_tokens=prompt,
        input_tokens_details=InputTokensDetails(cached_tokens=cached),
        output_tokens=completion,
        output_tokens_details=OutputTokensDetails(reasoning_tokens=reasoning),
        total_tokens=prompt + completion,
    )


def _format_out(req: ResponsesRequest) -> TextFormatOut:
    fmt = req.text.format if req.text is not None else None
    if fmt is None or fmt.type == "text":
        return FormatText()
    if fmt.type == "json_object":
        return FormatJSONObject()
    return FormatJSONSchema(
        name=fmt.name or "",
        schema_=fmt.schema_ or {},
        description=msgspec.UNSET if fmt.description is None else fmt.description,
        strict=msgspec.UNSET if fmt.strict is None else fmt.strict,
    )


def _tool_choice_out(req: ResponsesRequest) -> str | FunctionChoiceOut:
    choice = req.tool_choice
    if choice is None:
        return "auto"
    if isinstance(choice, str):
        return choice
    return FunctionChoiceOut(name=choice.name or "")


def response_of(
    req: ResponsesRequest,
    response_id: str,
    created_at: int,
    *,
    status: str,
    output: list[OutputItem] | None = None,
    usage: ResponseUsage | None = None,
) -> Response:
    """The Response object: the request's settings echoed, as OpenAI does."""
    return Response(
        id=response_id,
        created_at=created_at,
        status=status,  # type: ignore[arg-type]
        incomplete_details=IncompleteDetails(reason="max_output_tokens") if status == "incomplete" else None,
        instructions=req.instructions,
        max_output_tokens=req.max_output_tokens,
        model=req.model,
        output=output or [],
        previous_response_id=req.previous_response_id,
        store=req.store is not False,
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        text=ResponseText(format=_format_out(req)),
        tool_choice=_tool_choice_out(req),  # type: ignore[arg-type]
        tools=[
            FunctionToolOut(name=t.name or "", description=t.description, parameters=t.parameters, strict=t.strict)
            for t in req.tools or ()
        ],
        truncation=req.truncation or "disabled",
        parallel_tool_calls=req.parallel_tool_calls is not False,
        usage=usage,
        user=req.user,
        metadata=dict(req.metadata or {}),
    )


def from_chat(req: ResponsesRequest, response_id: str, created_at: int, completion: ChatCompletion) -> Response:
    """A whole chat completion as the Response it answers: its text as a message item (none when the turn only
    called functions), then a ``function_call`` item for each tool call."""
    choice = completion.choices[0]
    incomplete = choice.finish_reason == "length"
    calls = choice.message.tool_calls or []
    output: list[OutputItem] = []
    if isinstance(choice.message.reasoning_content, str) and choice.message.reasoning_content:
        text = choice.message.reasoning_content
        output.append(ReasoningItem(id=new_reasoning_id(), content=[ReasoningText(text=text)]))
    if choice.message.content or not calls:
        output.append(output_message(new_item_id(), choice.message.content or "", incomplete))
    output += [
        FunctionCallItem(
            id=new_call_item_id(),
            call_id=call.id,
            name=call.function.name,
            arguments=call.function.arguments,
            status="incomplete" if incomplete else "completed",
        )
        for call in calls
    ]
    return response_of(
        req,
        response_id,
        created_at,
        status="incomplete" if incomplete else "completed",
        output=output,
        usage=usage_from_chat(completion.usage),
    )
