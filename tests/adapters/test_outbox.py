"""The engine's outboxes: events batched per turn of the engine loop and handed over at its end, to each
request's event loop (adapters/mlx_lm/outbox.py) or, in the engine process, to each front end's socket as one
``wire.Batch`` (adapters/mlx_lm/host.py's WireOutbox). No model: the engine thread is played by a thread here."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq

from adapters import wire
from adapters.base import Finished, Started, TokenEvent
from adapters.mlx_lm.host import WireOutbox
from adapters.mlx_lm.outbox import Outbox


def on_thread(fn: Callable[[], object]) -> None:
    """Run ``fn`` on another thread (as the engine thread emits and flushes) and wait for it."""
    thread = threading.Thread(target=fn)
    thread.start()
    thread.join()


def token(i: int) -> TokenEvent:
    return TokenEvent(0, f"t{i}", (i,))


# ---- Outbox: requests' event loops in this process --------------------------------------------------


def test_events_wait_for_the_end_of_the_turn_then_arrive_in_order() -> None:
    outbox = Outbox()

    async def go() -> list[Any]:
        events, emit = outbox.channel()
        on_thread(lambda: [emit(e) for e in (Started(0), token(1), token(2))])
        await asyncio.sleep(0.01)
        assert events.empty()  # emitted, not yet handed over
        on_thread(outbox.flush)
        return [await asyncio.wait_for(events.get(), 1) for _ in range(3)]

    assert asyncio.run(go()) == [Started(0), token(1), token(2)]


def test_one_hand_off_per_event_loop_per_turn(monkeypatch: pytest.MonkeyPatch) -> None:
    """Many requests' events on one loop: one ``call_soon_threadsafe`` a turn, each queue getting its own."""
    outbox = Outbox()

    async def go() -> tuple[int, list[list[Any]]]:
        loop = asyncio.get_running_loop()
        calls: list[object] = []
        original = loop.call_soon_threadsafe

        def counted(callback: Callable[..., object], *args: Any) -> asyncio.Handle:
            calls.append(callback)
            return original(callback, *args)

        monkeypatch.setattr(loop, "call_soon_threadsafe", counted)
        channels = [outbox.channel() for _ in range(4)]

        def turn() -> None:
            for step in range(3):
                for i, (_, emit) in enumerate(channels):
                    emit(token(10 * i + step))
            outbox.flush()

        on_thread(turn)
        received = [[await asyncio.wait_for(q.get(), 1) for _ in range(3)] for q, _ in channels]
        on_thread(outbox.flush)  # nothing pending: no hand-off
        await asyncio.sleep(0.01)
        return len(calls), received

    calls, received = asyncio.run(go())
    assert calls == 1
    assert received == [[token(10 * i + step) for step in range(3)] for i in range(4)]


def test_each_event_loop_gets_its_own_events() -> None:
    """Two event loops (two HTTP threads): one flush hands each its requests' events."""
    outbox = Outbox()
    emits: dict[str, Callable[[Any], None]] = {}
    got: dict[str, list[Any]] = {}
    ready = threading.Barrier(3)
    flushed = threading.Event()

    def http_thread(name: str) -> None:
        async def go() -> None:
            events, emits[name] = outbox.channel()
            ready.wait()
            await asyncio.get_running_loop().run_in_executor(None, flushed.wait)
            got[name] = [await asyncio.wait_for(events.get(), 1) for _ in range(2)]

        asyncio.run(go())

    threads = [threading.Thread(target=http_thread, args=(n,)) for n in ("a", "b")]
    for t in threads:
        t.start()
    ready.wait()
    emits["a"](token(1))
    emits["b"](token(2))
    emits["a"](Finished(3, 1))
    emits["b"](Finished(3, 1))
    outbox.flush()
    flushed.set()
    for t in threads:
        t.join(5)
    assert got == {"a": [token(1), Finished(3, 1)], "b": [token(2), Finished(3, 1)]}


def test_a_closed_event_loop_is_skipped() -> None:
    """Shutdown: a request's loop has closed; the flush drops its events and still serves the others."""
    outbox = Outbox()

    async def gone() -> Callable[[Any], None]:
        return outbox.channel()[1]

    emit_gone = asyncio.run(gone())  # its loop is closed once asyncio.run returns

    async def go() -> Any:
        events, emit = outbox.channel()

        def turn() -> None:
            emit_gone(token(1))
            emit(token(2))
            outbox.flush()

        on_thread(turn)
        return await asyncio.wait_for(events.get(), 1)

    assert asyncio.run(go()) == token(2)


# ---- WireOutbox: the engine process's front ends ---------------------------------------------------


@pytest.fixture
def context() -> Iterator[zmq.Context[Any]]:
    ctx: zmq.Context[Any] = zmq.Context()
    yield ctx
    ctx.term()


def front_end(context: zmq.Context[Any], folder: Path, name: str) -> tuple[zmq.Socket[Any], str]:
    """A front end's event socket (PULL), bound where the engine process connects to it."""
    sock = context.socket(zmq.PULL)
    sock.setsockopt(zmq.LINGER, 0)
    address = f"ipc://{folder}/{name}"
    sock.bind(address)
    return sock, address


def received(sock: zmq.Socket[Any]) -> list[wire.Batch]:
    """Every batch waiting on ``sock``."""
    out = []
    while sock.poll(200):
        message = wire.decode_message(sock.recv())
        assert isinstance(message, wire.Batch)
        out.append(message)
    return out


def test_a_turns_events_go_to_each_front_end_as_one_batch(context: zmq.Context[Any], tmp_path: Path) -> None:
    outbox = WireOutbox(context)
    one, one_address = front_end(context, tmp_path, "one")
    two, two_address = front_end(context, tmp_path, "two")
    try:
        outbox.join(1, one_address)
        outbox.join(2, two_address)
        a, b, c = outbox.emitter(1, 7), outbox.emitter(1, 8), outbox.emitter(2, 7)

        def turn() -> None:
            a(Started(0))
            c(Started(2))
            b(Started(0))
            a(token(1))
            c(Finished(3, 0))
            outbox.flush()

        on_thread(turn)  # the engine thread: joins take effect, then the turn's events leave
        assert received(one) == [wire.Batch(events=[(7, Started(0)), (8, Started(0)), (7, token(1))])]
        assert received(two) == [wire.Batch(events=[(7, Started(2)), (7, Finished(3, 0))])]
        on_thread(outbox.flush)  # an empty turn sends nothing
        assert received(one) == [] and received(two) == []
    finally:
        outbox.close()
        one.close()
        two.close()


def test_a_front_end_that_left_gets_nothing_more(context: zmq.Context[Any], tmp_path: Path) -> None:
    outbox = WireOutbox(context)
    sock, address = front_end(context, tmp_path, "front")
    try:
        outbox.join(1, address)
        emit = outbox.emitter(1, 1)
        emit(token(1))
        on_thread(outbox.flush)
        assert received(sock) == [wire.Batch(events=[(1, token(1))])]
        emit(token(2))  # queued before it left: dropped with its socket
        outbox.leave(1)
        on_thread(outbox.flush)
        assert received(sock) == []
    finally:
        outbox.close()
        sock.close()


def test_the_engine_process_has_no_event_loop_channels(context: zmq.Context[Any]) -> None:
    with pytest.raises(RuntimeError, match="no event loop"):
        WireOutbox(context).channel()
