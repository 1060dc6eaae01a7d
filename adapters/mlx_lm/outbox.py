"""Events from the engine thread to the requests' event loops."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from typing import Any, Protocol

__all__ = ["EventOutbox", "Outbox"]


class EventOutbox(Protocol):
    """Where the engine thread's events go at the end of each turn: this process's event loops (:class:`Outbox`)
    or the engine process's front ends (``adapters.mlx_lm.host.WireOutbox``)."""

    def channel(self) -> tuple[asyncio.Queue[Any], Any]: ...

    def flush(self) -> None: ...


class Outbox:
    """Events from the engine thread to the requests' event loops, handed over once per turn of the engine
    loop: one ``call_soon_threadsafe`` per event loop per turn instead of one per token. Each hand-off
    writes to the loop's wake-up socket and lets the HTTP thread take the GIL; at batch 64 one per token
    meant 64 of them between two decode steps."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue[Any], Any]]] = {}

    def channel(self) -> tuple[asyncio.Queue[Any], Any]:
        """For a coroutine on its event loop: a queue, and the engine thread's function that puts into it."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Any] = asyncio.Queue()

        def emit(event: Any) -> None:
            with self._lock:
                self._pending.setdefault(loop, []).append((events, event))

        return events, emit

    def flush(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, {}
        for loop, items in pending.items():
            with contextlib.suppress(RuntimeError):  # the loop closed (shutdown): nobody is listening
                loop.call_soon_threadsafe(_deliver, items)


def _deliver(items: list[tuple[asyncio.Queue[Any], Any]]) -> None:
    for events, event in items:
        events.put_nowait(event)
