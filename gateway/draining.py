"""Draining on SIGTERM / Ctrl-C: the server keeps its socket open and answers every new request with 503
(``Retry-After``, ``Connection: close``) while the requests it is running finish; it exits once none is left
or the grace period ends. ``/health`` answers 503 ``draining`` meanwhile, so a load balancer's health check
takes the replica out, and a balancer that retries on 503 (HAProxy's ``retry-on 503``) sends the refused
request to another replica: no client sees a refused connection while the replica drains."""

from __future__ import annotations

import msgspec
from litestar.types import ASGIApp, Receive, Scope, Send

from gateway.errors import ServiceUnavailable

__all__ = ["Drain"]

# Answered while draining (health checks and scrapes see the truth instead of a refusal).
ALWAYS_ANSWERED = frozenset({"/health", "/metrics"})


class Drain:
    """Whether the server drains, and how many HTTP requests are in flight (streams until their last byte)."""

    def __init__(self) -> None:
        self.draining = False
        self.in_flight = 0

    def middleware(self, app: ASGIApp) -> ASGIApp:
        async def drained(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] != "http":
                await app(scope, receive, send)
                return
            if self.draining and scope["path"] not in ALWAYS_ANSWERED:
                await _refuse(send)
                return
            self.in_flight += 1
            try:
                await app(scope, receive, send)
            finally:
                self.in_flight -= 1

        return drained


async def _refuse(send: Send) -> None:
    error = ServiceUnavailable("The server is shutting down; retry on another replica or shortly", retry_after=1)
    body = msgspec.json.encode(error.body())
    headers = {**error.headers(), "content-type": "application/json", "connection": "close"}
    await send(
        {
            "type": "http.response.start",
            "status": error.status_code,
            "headers": [(k.encode(), v.encode()) for k, v in [*headers.items(), ("content-length", str(len(body)))]],
        }
    )
    await send({"type": "http.response.body", "body": body, "more_body": False})
