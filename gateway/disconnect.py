"""Clients that leave before their answer: the work done for them is cancelled, streamed or not.

A handler that answers at the end (a non-streamed completion, a prefix-cache build) has nothing to send
while it waits for a place in the queue, for the engine's tokens or for a build, so nothing would tell it
that its client has gone. The ASGI server does, through ``receive()``: once the request's body has been
read, the next ``receive()`` returns ``{"type": "http.disconnect"}`` when the connection closes (uvicorn's
h11 and httptools protocols alike; Litestar reads only the body and leaves later messages to the app).
:func:`unless_client_leaves` runs the handler's work as a task beside a watcher of ``receive()`` and cancels
the task when the client leaves. The cancellation unwinds through the work's own ``finally`` blocks: the
engine's async generators set their request's (or build's) cancel flag, which the engine thread acts on
within one step, and the admission slot gives back its place and the tenant's counters.

A streamed answer is watched by sse-starlette once it is sent (:mod:`gateway.sse`); until then (queued, or
waiting for the engine to admit a prompt that names a prefix cache) this module watches it too.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import TypeVar

from litestar import Request
from litestar.types import Receive

from gateway.errors import APIError, ClientLeft

__all__ = ["unless_client_leaves"]

logger = logging.getLogger(__name__)

T = TypeVar("T")


async def _client_left(receive: Receive) -> None:
    """Return when the client disconnects. Called after the body was read: nothing else arrives but that."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def unless_client_leaves(request: Request, work: Coroutine[object, None, T]) -> T:
    """Await ``work`` unless the client disconnects first; then cancel it and raise :class:`ClientLeft`.

    Args:
        request: the request being served; its body must have been read already (handlers that take
            ``data`` have), else this would take its body's messages.
        work: the handler's work, started here as a task (it inherits the request's context: its id).

    Returns:
        What ``work`` returned; when it ended in an error, that error is raised.

    Raises:
        ClientLeft: the client went away first (logged once, at INFO).
    """
    task = asyncio.create_task(work)
    watcher = asyncio.create_task(_client_left(request.receive))
    left = False
    try:
        await asyncio.wait((task, watcher), return_when=asyncio.FIRST_COMPLETED)
        if task.done():  # first, or in the same turn as the client left: its answer is sent (or dropped)
            return task.result()
        watcher.result()  # the client left (were receive() to fail, its error is raised instead)
        left = True
        logger.info("client left before its answer: %s %s cancelled", request.method, request.url.path)
        raise ClientLeft("The client closed the connection before its answer was ready")
    finally:
        # Neither outlives the handler, and the work's cleanup (the engine's cancel flags, the admission
        # slot) is done before the handler returns. Cancelling a finished task does nothing.
        watcher.cancel()
        task.cancel()
        await asyncio.wait((watcher, task))
        if left:
            _settled(task)


def _settled(task: asyncio.Task[T]) -> None:
    """A work task that ended in an error of its own while it was being cancelled: logged, not lost."""
    if task.cancelled():
        return
    error = task.exception()  # also marks it retrieved (asyncio would warn of it otherwise)
    if error is not None and not isinstance(error, APIError):
        logger.error("the request's work failed while it was cancelled", exc_info=error)
