"""Engine events to OpenAI responses: whole responses and streamed chunks, for both endpoints."""

from __future__ import annotations

from dataclasses import dataclass, field

import msgspec

from adapters.base import ChoiceFinished, Finished, TokenEvent, TokenLogprob, ToolCallOut
from gateway.planning import PlannedRequest
from gateway.schemas.openai import (
    ChatChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatLogprobs,
    ChatMessageOut,
    ChunkChoice,
    CompletionChoice,
    CompletionLogprobs,
    CompletionResponse,
    CompletionTokensDetails,
    Delta,
    DeltaFunctionCall,
    DeltaToolCall,
    FunctionCall,
    LogprobContent,
    PromptTokensDetails,
    ToolCall,
    TopLogprobEntry,
    Usage,
)

__all__ = ["ChunkEncoder", "ResponseEncoder", "usage_of"]

Chunk = ChatCompletionChunk | CompletionResponse


def usage_of(finished: list[Finished]) -> Usage:
    prompt = sum(f.prompt_tokens for f in finished)
    completion = sum(f.completion_tokens for f in finished)
    reasoning = [f.reasoning_tokens for f in finished if f.reasoning_tokens is not None]
    return Usage(
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=prompt + completion,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=sum(f.cached_tokens for f in finished)),
        completion_tokens_details=CompletionTokensDetails(reasoning_tokens=sum(reasoning))
        if reasoning
        else msgspec.UNSET,
    )


def _chat_logprobs(items: list[TokenLogprob]) -> ChatLogprobs:
    return ChatLogprobs(
        content=[
            LogprobContent(
                token=t.token,
                logprob=t.logprob,
                bytes=list(t.bytes),
                top_logprobs=[TopLogprobEntry(token=x.token, logprob=x.logprob, bytes=list(x.bytes)) for x in t.top],
            )
            for t in items
        ]
    )


def _completion_logprobs(items: list[TokenLogprob], offset: int, with_top: bool) -> CompletionLogprobs:
    offsets = []
    for t in items:
        offsets.append(offset)
        offset += len(t.token)
    return CompletionLogprobs(
        tokens=[t.token for t in items],
        token_logprobs=[t.logprob for t in items],
        top_logprobs=[{x.token: x.logprob for x in t.top} for t in items] if with_top else None,
        text_offset=offsets,
    )


@dataclass
class _Choice:
    text: list[str] = field(default_factory=list)
    reasoning: list[str] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    tool_calls: list[ToolCallOut] = field(default_factory=list)
    finish_reason: str | None = None
    offset: int = 0


def _message(c: _Choice) -> ChatMessageOut:
    """The assistant message; with tool calls, ``content`` is null unless the model also wrote text. A thinking
    model's reasoning is ``reasoning_content``, absent when it gave none."""
    content = "".join(c.text)
    reasoning = "".join(c.reasoning) or msgspec.UNSET
    if not c.tool_calls:
        return ChatMessageOut(content=content, reasoning_content=reasoning)
    calls = [ToolCall(id=t.id, function=FunctionCall(name=t.name, arguments=t.arguments)) for t in c.tool_calls]
    return ChatMessageOut(content=content if content.strip() else None, reasoning_content=reasoning, tool_calls=calls)


class ResponseEncoder:
    """Collects a request's events into one chat.completion or text_completion."""

    def __init__(self, planned: PlannedRequest, fingerprint: str) -> None:
        self._p = planned
        self._fingerprint = fingerprint
        count = len(planned.plans) * planned.n
        self._choices = [_Choice() for _ in range(count)]
        for i, echo in enumerate(planned.echo):
            for c in range(planned.n):
                self._choices[i * planned.n + c].text.append(echo)
        self._finished: list[Finished] = []

    def feed(self, prompt_index: int, event: TokenEvent | ChoiceFinished | Finished) -> None:
        if isinstance(event, Finished):
            self._finished.append(event)
            return
        choice = self._choices[prompt_index * self._p.n + event.choice]
        choice.text.append(event.text)
        if isinstance(event, TokenEvent):
            choice.reasoning.append(event.reasoning)
            choice.logprobs.extend(event.logprobs)
            choice.tool_calls.extend(event.tool_calls)
        else:
            choice.finish_reason = event.reason

    def build(self) -> ChatCompletion | CompletionResponse:
        p, usage = self._p, usage_of(self._finished)
        if p.kind == "chat":
            return ChatCompletion(
                id=p.id,
                created=p.created,
                model=p.model,
                system_fingerprint=self._fingerprint,
                usage=usage,
                choices=[
                    ChatChoice(
                        index=i,
                        message=_message(c),
                        logprobs=_chat_logprobs(c.logprobs) if p.logprobs else None,
                        finish_reason=c.finish_reason,
                    )
                    for i, c in enumerate(self._choices)
                ],
            )
        return CompletionResponse(
            id=p.id,
            created=p.created,
            model=p.model,
            system_fingerprint=self._fingerprint,
            usage=usage,
            choices=[
                CompletionChoice(
                    index=i,
                    text="".join(c.text),
                    logprobs=_completion_logprobs(c.logprobs, 0, p.top_logprobs > 0) if p.logprobs else None,
                    finish_reason=c.finish_reason,
                )
                for i, c in enumerate(self._choices)
            ],
        )


class ChunkEncoder:
    """Turns a request's events into streamed chunks: role first, one stable id, finish, usage."""

    def __init__(self, planned: PlannedRequest, fingerprint: str) -> None:
        self._p = planned
        self._fingerprint = fingerprint
        self._offsets = [0] * (len(planned.plans) * planned.n)
        self._calls = [0] * len(self._offsets)  # tool calls streamed so far, per choice
        self._finished: list[Finished] = []

    def opening(self) -> list[Chunk]:
        """The role delta of every chat choice (OpenAI sends it before any content), or echoed prompts."""
        p = self._p
        if p.kind == "chat":
            return [
                self._chat(ChunkChoice(index=i, delta=Delta(role="assistant", content="")))
                for i in range(len(self._offsets))
            ]
        out: list[Chunk] = []
        for i, echo in enumerate(p.echo):
            for c in range(p.n):
                out.append(self._text(i * p.n + c, echo, None, None))
        return out

    def feed(self, prompt_index: int, event: TokenEvent | ChoiceFinished | Finished) -> list[Chunk]:
        if isinstance(event, Finished):
            self._finished.append(event)
            return []
        index = prompt_index * self._p.n + event.choice
        out: list[Chunk] = []
        if isinstance(event, TokenEvent):
            logprobs = list(event.logprobs)
            if event.reasoning and self._p.kind == "chat":
                # Its own delta, before the answer's: a token's logprobs go with the answer when it has text.
                lp = [] if event.text else logprobs
                out.append(self._chat_delta(index, Delta(reasoning_content=event.reasoning), lp))
                logprobs = logprobs if event.text else []
            if event.text or logprobs:
                out.append(self._content(index, event.text, logprobs))
            for call in event.tool_calls:
                out += self._tool_call(index, call)
            return out
        if event.text:
            out.append(self._content(index, event.text, []))
        if self._p.kind == "chat":
            out.append(self._chat(ChunkChoice(index=index, delta=Delta(), finish_reason=event.reason)))
        else:
            out.append(self._text(index, "", None, event.reason))
        return out

    def usage(self) -> Chunk:
        p, usage = self._p, usage_of(self._finished)
        if p.kind == "chat":
            return ChatCompletionChunk(
                id=p.id,
                created=p.created,
                model=p.model,
                choices=[],
                system_fingerprint=self._fingerprint,
                usage=usage,
            )
        return CompletionResponse(
            id=p.id, created=p.created, model=p.model, choices=[], system_fingerprint=self._fingerprint, usage=usage
        )

    def _content(self, index: int, text: str, logprobs: list[TokenLogprob]) -> Chunk:
        p = self._p
        if p.kind == "chat":
            return self._chat_delta(index, Delta(content=text), logprobs)
        lps = _completion_logprobs(logprobs, self._offsets[index], p.top_logprobs > 0) if p.logprobs else None
        return self._text(index, text, lps, None)

    def _tool_call(self, index: int, call: ToolCallOut) -> list[Chunk]:
        """One call as OpenAI streams it: a first fragment with id, type, name and empty arguments, then the
        arguments (clients join fragments by ``index``)."""
        k = self._calls[index]
        self._calls[index] += 1
        head = DeltaToolCall(
            index=k, id=call.id, type="function", function=DeltaFunctionCall(name=call.name, arguments="")
        )
        body = DeltaToolCall(index=k, function=DeltaFunctionCall(arguments=call.arguments))
        return [self._chat(ChunkChoice(index=index, delta=Delta(tool_calls=[d]))) for d in (head, body)]

    def _chat_delta(self, index: int, delta: Delta, logprobs: list[TokenLogprob]) -> ChatCompletionChunk:
        lp = _chat_logprobs(logprobs) if self._p.logprobs else None
        return self._chat(ChunkChoice(index=index, delta=delta, logprobs=lp))

    def _chat(self, choice: ChunkChoice) -> ChatCompletionChunk:
        p = self._p
        return ChatCompletionChunk(
            id=p.id, created=p.created, model=p.model, choices=[choice], system_fingerprint=self._fingerprint
        )

    def _text(self, index: int, text: str, logprobs: CompletionLogprobs | None, reason: str | None) -> Chunk:
        p = self._p
        self._offsets[index] += len(text)
        return CompletionResponse(
            id=p.id,
            created=p.created,
            model=p.model,
            system_fingerprint=self._fingerprint,
            choices=[CompletionChoice(index=index, text=text, logprobs=logprobs, finish_reason=reason)],
        )


def encode(obj: msgspec.Struct) -> bytes:
    return _encoder.encode(obj)


_encoder = msgspec.json.Encoder()
