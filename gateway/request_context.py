"""Each HTTP request's id and arrival time, for its whole life: set before routing, on every response.

The id is the client's ``x-request-id`` when it is sane (1-128 characters of ``A-Z a-z 0-9 . _ : -``),
else a new ``req_<32 hex>``; every response carries it back in ``x-request-id`` (errors and streams too),
and every log line written while serving the request carries it (:mod:`gateway.logs`).
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass

from litestar.types import ASGIApp, Message, Receive, Scope, Send

__all__ = [
    "RequestContext",
    "RequestInfo",
    "arrival",
    "current_request_id",
    "mark_planned",
    "planned",
    "request_id_from",
]

_SANE_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")
_HEADER = b"x-request-id"

# The id of the request being served (None outside one). A contextvar: each request runs in its own task,
# and tasks it starts (a stream's sender, planning in a worker thread) inherit it.
current_request_id: ContextVar[str | None] = ContextVar("current_request_id", default=None)
_arrived: ContextVar[float | None] = ContextVar("request_arrived", default=None)
_planned: ContextVar[float | None] = ContextVar("request_planned", default=None)


@dataclass(frozen=True)
class RequestInfo:
    """A finished request, as the metrics see it: its route template (never the raw path), method,
    status and seconds from arrival to the end of its response (a stream's last byte)."""

    route: str
    method: str
    status: int
    seconds: float


def request_id_from(value: str | None) -> str:
    """The client's id when it is sane; a new one otherwise (oversized or odd ids never reach the logs)."""
    if value is not None and _SANE_ID.fullmatch(value):
        return value
    return f"req_{uuid.uuid4().hex}"


def arrival() -> float:
    """``time.perf_counter()`` when the current request arrived (now, outside a request)."""
    arrived = _arrived.get()
    return time.perf_counter() if arrived is None else arrived


def mark_planned() -> None:
    """The current request's plan is ready (its tokens, prefix cache and limits decided)."""
    _planned.set(time.perf_counter())


def planned() -> float:
    """``time.perf_counter()`` when the current request was planned (its arrival if it was not)."""
    at = _planned.get()
    return arrival() if at is None else at


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return value.decode("latin-1")
    return None


class RequestContext:
    """ASGI middleware around the whole app (routing, its 404s and 405s included): sets the request's id
    and arrival time, adds ``x-request-id`` to its response, and reports the request when it ends."""

    def __init__(self, app: ASGIApp, on_finished: Callable[[RequestInfo], None] | None = None) -> None:
        self.app = app
        self.on_finished = on_finished

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = request_id_from(_header(scope, _HEADER))
        started = time.perf_counter()
        id_token, arrived_token = current_request_id.set(rid), _arrived.set(started)
        status = 500  # what uvicorn answers when the app fails before sending anything

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = [(k, v) for k, v in message.get("headers", ()) if k.lower() != _HEADER]
                headers.append((_HEADER, rid.encode()))
                message = {**message, "headers": headers}  # type: ignore[typeddict-item]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            if self.on_finished is not None:
                # Litestar's router writes the matched template into the scope; no match: one label for all.
                route = scope.get("path_template") or "unmatched"
                self.on_finished(RequestInfo(route, scope.get("method", ""), status, time.perf_counter() - started))
            current_request_id.reset(id_token)
            _arrived.reset(arrived_token)
