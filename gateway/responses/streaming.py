"""A streamed chat completion's chunks as the Responses API's typed output events, in OpenAI's order.

Each output item is opened (``response.output_item.added``), filled (text deltas in a content part, or function
call argument deltas) and closed (``...done`` events, then ``response.output_item.done``) before the next one
opens, so that clients that fill items by ``output_index`` (the openai SDK's stream helper) see each item whole.
A thinking model's reasoning becomes a ``reasoning`` item (``response.reasoning_text.delta`` events), text a message
item, and each tool call of the chunks (joined by their ``index``) a ``function_call`` item.
"""

from __future__ import annotations

from collections.abc import Iterator

import msgspec

from gateway.responses.planning import new_call_item_id, new_item_id, new_reasoning_id, output_message
from gateway.schemas.openai import ChatCompletionChunk
from gateway.schemas.responses import (
    FunctionCallItem,
    OutputItem,
    OutputMessage,
    OutputText,
    ReasoningItem,
    ReasoningText,
    ResponseContentPartEvent,
    ResponseFunctionCallArgumentsDeltaEvent,
    ResponseFunctionCallArgumentsDoneEvent,
    ResponseItemEvent,
    ResponseReasoningTextDeltaEvent,
    ResponseReasoningTextDoneEvent,
    ResponseTextDeltaEvent,
    ResponseTextDoneEvent,
)

__all__ = ["OutputEvents"]


class OutputEvents:
    """The output events of one response; ``output`` holds the items closed so far. It numbers every event of
    the stream (``seq()`` for the response's own events), so that ``sequence_number`` counts up without a gap."""

    def __init__(self) -> None:
        self._next = 0
        self.output: list[OutputItem] = []
        self._item: OutputMessage | FunctionCallItem | ReasoningItem | None = None  # the open item
        self._parts: list[str] = []  # its text, or its arguments, so far
        self._call_index: int | None = None  # the chunks' index of the open call

    def seq(self) -> int:
        self._next += 1
        return self._next - 1

    @property
    def _index(self) -> int:
        return len(self.output)

    def feed(self, chunk: ChatCompletionChunk) -> Iterator[msgspec.Struct]:
        """The events of one chunk (its only choice: ``n`` is 1 on ``/v1/responses``)."""
        for choice in chunk.choices:
            if isinstance(choice.delta.reasoning_content, str) and choice.delta.reasoning_content:
                yield from self._reasoning(choice.delta.reasoning_content)
            if isinstance(choice.delta.content, str) and choice.delta.content:
                yield from self._text(choice.delta.content)
            for call in choice.delta.tool_calls or ():
                if call.index != self._call_index:
                    yield from self._open_call(call.index, call.id or "", call.function.name or "")
                if isinstance(call.function.arguments, str) and call.function.arguments:
                    yield from self._arguments(call.function.arguments)

    def close(self, incomplete: bool) -> Iterator[msgspec.Struct]:
        """The open item's closing events; a response that produced nothing still has one (empty) message, as the
        whole response has."""
        if self._item is None and not self.output:
            yield from self._open_message()
        yield from self._close(incomplete)

    def _text(self, delta: str) -> Iterator[msgspec.Struct]:
        if not isinstance(self._item, OutputMessage):
            yield from self._close(False)
            yield from self._open_message()
        assert self._item is not None
        self._parts.append(delta)
        yield ResponseTextDeltaEvent(
            sequence_number=self.seq(), item_id=self._item.id, output_index=self._index, content_index=0, delta=delta
        )

    def _reasoning(self, delta: str) -> Iterator[msgspec.Struct]:
        if not isinstance(self._item, ReasoningItem):
            yield from self._close(False)
            item = ReasoningItem(id=new_reasoning_id(), content=[], status="in_progress")
            self._item, self._parts = item, []
            yield ResponseItemEvent(
                type="response.output_item.added", sequence_number=self.seq(), output_index=self._index, item=item
            )
        assert self._item is not None
        self._parts.append(delta)
        yield ResponseReasoningTextDeltaEvent(
            sequence_number=self.seq(), item_id=self._item.id, output_index=self._index, content_index=0, delta=delta
        )

    def _open_message(self) -> Iterator[msgspec.Struct]:
        item = output_message(new_item_id(), "", False)
        item.status, item.content = "in_progress", []
        self._item, self._parts = item, []
        yield ResponseItemEvent(
            type="response.output_item.added", sequence_number=self.seq(), output_index=self._index, item=item
        )
        yield ResponseContentPartEvent(
            type="response.content_part.added",
            sequence_number=self.seq(),
            item_id=item.id,
            output_index=self._index,
            content_index=0,
            part=OutputText(text=""),
        )

    def _open_call(self, index: int, call_id: str, name: str) -> Iterator[msgspec.Struct]:
        yield from self._close(False)
        item = FunctionCallItem(id=new_call_item_id(), call_id=call_id, name=name, arguments="", status="in_progress")
        self._item, self._parts, self._call_index = item, [], index
        yield ResponseItemEvent(
            type="response.output_item.added", sequence_number=self.seq(), output_index=self._index, item=item
        )

    def _arguments(self, delta: str) -> Iterator[msgspec.Struct]:
        assert self._item is not None
        self._parts.append(delta)
        yield ResponseFunctionCallArgumentsDeltaEvent(
            sequence_number=self.seq(), item_id=self._item.id, output_index=self._index, delta=delta
        )

    def _close(self, incomplete: bool) -> Iterator[msgspec.Struct]:
        item, index, whole = self._item, self._index, "".join(self._parts)
        if item is None:
            return
        where = {"item_id": item.id, "output_index": index}
        if isinstance(item, OutputMessage):
            done: OutputItem = output_message(item.id, whole, incomplete)
            yield ResponseTextDoneEvent(sequence_number=self.seq(), content_index=0, text=whole, **where)
            yield ResponseContentPartEvent(
                type="response.content_part.done",
                sequence_number=self.seq(),
                content_index=0,
                part=OutputText(text=whole),
                **where,
            )
        elif isinstance(item, ReasoningItem):
            # The answer follows: a reasoning item closed by the next item is whole (its block ended).
            done = ReasoningItem(
                id=item.id, content=[ReasoningText(text=whole)], status="incomplete" if incomplete else "completed"
            )
            yield ResponseReasoningTextDoneEvent(sequence_number=self.seq(), content_index=0, text=whole, **where)
        else:
            status = "incomplete" if incomplete else "completed"
            done = FunctionCallItem(id=item.id, call_id=item.call_id, name=item.name, arguments=whole, status=status)
            yield ResponseFunctionCallArgumentsDoneEvent(
                sequence_number=self.seq(), name=item.name, arguments=whole, **where
            )
        yield ResponseItemEvent(
            type="response.output_item.done", sequence_number=self.seq(), output_index=index, item=done
        )
        self.output.append(done)
        self._item, self._parts, self._call_index = None, [], None
