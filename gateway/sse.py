"""Server-sent events, in one place: framing, ``data: [DONE]``, keep-alive comments, send timeouts.

Built on sse-starlette (Litestar 2's own ServerSentEvent has no pings or send timeout). A failure after
the first byte becomes one ``data: {"error": ...}`` event, then the stream ends without ``[DONE]``.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import cast

import msgspec
from litestar.types import ASGIApp
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.background import BackgroundTask

from gateway.errors import ServerError, api_error

__all__ = ["sse_response"]

logger = logging.getLogger(__name__)
_encoder = msgspec.json.Encoder()


def _event(data: str) -> ServerSentEvent:
    # OpenAI frames events with "\n\n"; sse-starlette's default is "\r\n".
    return ServerSentEvent(data=data, sep="\n")


async def _frames(chunks: AsyncIterator[msgspec.Struct], request_id: str) -> AsyncIterator[ServerSentEvent]:
    try:
        async for chunk in chunks:
            yield _event(_encoder.encode(chunk).decode())
    except Exception as exc:
        # As the app's exception handler answers it (gateway.errors), but as the stream's last event.
        error = api_error(exc)
        if error is None:
            logger.exception("[%s] stream failed", request_id)
            error = ServerError("The server failed mid-stream")
        else:
            logger.warning("[%s] stream failed: %s", request_id, error.message)
        yield _event(_encoder.encode(error.body()).decode())
        return
    yield _event("[DONE]")


def sse_response(
    chunks: AsyncIterator[msgspec.Struct],
    *,
    request_id: str,
    ping_seconds: float,
    send_timeout: float,
    headers: Mapping[str, str] | None = None,
    on_close: Callable[[], Awaitable[None]] | None = None,
) -> ASGIApp:
    """An ASGI response streaming ``chunks`` as OpenAI-style SSE."""
    response = EventSourceResponse(
        _frames(chunks, request_id),
        headers=dict(headers or {}),
        ping=ping_seconds,
        sep="\n",
        send_timeout=send_timeout,
        # Litestar shuts down on its own; sse-starlette's exit patch must not end streams early.
        shutdown_grace_period=0,
        # Runs however the response ends, also when the body never started (idempotent callers).
        background=BackgroundTask(on_close) if on_close else None,
    )
    # Starlette's and Litestar's ASGI type aliases differ only in their TypedDict spellings.
    return cast(ASGIApp, response)
