"""A ``/v1/responses`` request as chat planning takes it, and a chat completion back as a Response.

``instructions`` + the stored conversation of ``previous_response_id`` + the new input become chat messages; the
chat planning (template, tokens, limits, prefix cache, tenant) does the rest, so every rule of chat applies.
Fields this server cannot honour yet are a 400 naming the field, never silently ignored.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Sequence

from gateway.errors import APIError, InvalidRequest
from gateway.schemas.openai import ChatCompletion, ChatCompletionRequest, ChatMessage, StreamOptions
from gateway.schemas.responses import (
    IncompleteDetails,
    InputMessageOut,
    InputTokensDetails,
    OutputMessage,
    OutputText,
    OutputTokensDetails,
    Response,
    ResponsesRequest,
    ResponseUsage,
)

__all__ = [
    "as_chat",
    "check_unsupported",
    "from_chat",
    "input_messages",
    "new_item_id",
    "new_response_id",
    "output_message",
    "rename_param",
    "response_of",
    "usage_of",
]


def new_response_id(previous: str | None = None) -> str:
    """``resp_`` and 32 hex digits. A continuation's first 16 digits are its conversation's (its first
    response's), so that a load balancer that hashes them (``gateway.haproxy_config``) sends every turn of a
    conversation to the replica that holds its KV."""
    own = uuid.uuid4().hex
    if previous is not None and re.fullmatch(r"resp_[0-9a-f]{32}", previous):
        return f"resp_{previous[5:21]}{own[16:]}"
    return f"resp_{own}"


def new_item_id() -> str:
    return f"msg_{uuid.uuid4().hex}"


def check_unsupported(req: ResponsesRequest) -> None:
    """A 400 naming the first field that would change OpenAI's answer in a way this server cannot follow yet."""
    if req.tools:
        raise InvalidRequest("'tools' are not supported on /v1/responses yet", param="tools")
    if req.tool_choice is not None and req.tool_choice not in ("none", "auto"):
        raise InvalidRequest("'tool_choice' names a tool, but the request has no 'tools'", param="tool_choice")
    fmt = req.text.format if req.text is not None else None
    if fmt is not None and fmt.type != "text":
        raise InvalidRequest(
            f"'text.format' of type '{fmt.type}' is not supported on /v1/responses yet; only 'text' is",
            param="text.format",
        )
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


def input_messages(req: ResponsesRequest) -> list[tuple[ChatMessage, InputMessageOut]]:
    """The request's input as chat messages, each with the item ``input_items`` lists."""
    if isinstance(req.input, str):
        parts = [{"type": "input_text", "text": req.input}]
        return [
            (ChatMessage(role="user", content=req.input), InputMessageOut(id=new_item_id(), role="user", content=parts))
        ]
    out = []
    for i, item in enumerate(req.input):
        if item.type != "message":
            raise InvalidRequest(
                f"Input items of type '{item.type}' are not supported on /v1/responses yet; only messages are",
                param=f"input[{i}].type",
            )
        if item.role is None:
            raise InvalidRequest("A message item needs a 'role'", param=f"input[{i}].role")
        if item.content is None:
            raise InvalidRequest("A message item needs 'content'", param=f"input[{i}].content")
        if isinstance(item.content, str):
            text, kind = item.content, "output_text" if item.role == "assistant" else "input_text"
            parts = [{"type": kind, "text": text}]
        else:
            texts, parts = [], []
            for j, part in enumerate(item.content):
                if part.type not in ("input_text", "output_text") or part.text is None:
                    raise InvalidRequest(
                        f"Content parts of type '{part.type}' are not supported by this model; only text is",
                        param=f"input[{i}].content[{j}].type",
                    )
                texts.append(part.text)
                parts.append({"type": part.type, "text": part.text})
            text = "".join(texts)
        message = ChatMessage(role=item.role, content=text)
        out.append((message, InputMessageOut(id=item.id or new_item_id(), role=item.role, content=parts)))
    return out


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
        prefix_cache=req.prefix_cache,
        user=req.user,
    )


_PARAMS = {"messages": "input", "max_completion_tokens": "max_output_tokens", "max_tokens": "max_output_tokens"}


def rename_param(exc: APIError) -> APIError:
    """A chat planning error with its ``param`` named as the Responses request names it."""
    if exc.param is not None:
        head, dot, rest = exc.param.partition(".")
        base = head.split("[", 1)[0]
        if base in _PARAMS:
            exc.param = _PARAMS[base] if base == "messages" else _PARAMS[base] + (dot + rest if dot else "")
    return exc


def output_message(item_id: str, text: str, incomplete: bool) -> OutputMessage:
    return OutputMessage(
        id=item_id, status="incomplete" if incomplete else "completed", content=[OutputText(text=text)]
    )


def usage_of(prompt: int, completion: int, cached: int) -> ResponseUsage:
    return ResponseUsage(
        input_tokens=prompt,
        input_tokens_details=InputTokensDetails(cached_tokens=cached),
        output_tokens=completion,
        output_tokens_details=OutputTokensDetails(),
        total_tokens=prompt + completion,
    )


def response_of(
    req: ResponsesRequest,
    response_id: str,
    created_at: int,
    *,
    status: str,
    output: list[OutputMessage] | None = None,
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
        tool_choice="none" if req.tool_choice == "none" else "auto",
        truncation=req.truncation or "disabled",
        parallel_tool_calls=req.parallel_tool_calls is not False,
        usage=usage,
        user=req.user,
        metadata=dict(req.metadata or {}),
    )


def from_chat(req: ResponsesRequest, response_id: str, created_at: int, completion: ChatCompletion) -> Response:
    """A whole chat completion as the Response it answers."""
    choice = completion.choices[0]
    incomplete = choice.finish_reason == "length"
    u = completion.usage
    return response_of(
        req,
        response_id,
        created_at,
        status="incomplete" if incomplete else "completed",
        output=[output_message(new_item_id(), choice.message.content or "", incomplete)],
        usage=usage_of(u.prompt_tokens, u.completion_tokens, u.prompt_tokens_details.cached_tokens),
    )
