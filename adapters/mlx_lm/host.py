"""Building the mlx-lm engine from an :class:`~adapters.setup.EngineSetup`, and the engine process around it.

:func:`serve` builds the engine and serves the front ends (``adapters.remote``) over ZMQ sockets in a private
folder until SIGTERM, or until the process that started it is gone (``gateway.processes.engine_process`` runs it).

Ownership in the engine process:
- the engine thread ("mlx-engine") owns everything :class:`~adapters.mlx_lm.engine.MlxEngine` says it does,
  and the event sockets (one PUSH per front end): it sends each turn's events as one :class:`wire.Batch`;
- the main thread owns the command socket (PULL), the report sockets (one PUSH per front end), and ``_live``
  (the requests and builds by id, to cancel them). It turns commands into the engine's thread-safe calls and
  sends :class:`wire.Report` from the engine's published snapshot and lock-guarded counters.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import zmq

from adapters import wire
from adapters.base import Failed
from adapters.setup import EngineSetup

__all__ = ["EngineSetupError", "Host", "WireOutbox", "build_engine", "serve"]

logger = logging.getLogger(__name__)


class EngineSetupError(Exception):
    """A setting the engine cannot work with (the operator's to fix, not a bug): one line, exit status 1."""


def build_engine(setup: EngineSetup, outbox: WireOutbox | None = None) -> Any:  # MlxEngine, imported after the BLAS
    """The engine of ``setup``. The CPU BLAS is loaded here, before anything imports mlx."""
    from adapters.mlx_lm.blas import load_optimised_blas

    blas = load_optimised_blas(setup.blas)
    import mlx.core as mx

    from adapters.mlx_lm.engine import MlxEngine

    if mx.default_device() == mx.cpu:
        logger.info("device cpu, BLAS %s (%s), weights as float32", blas.name, blas.path or "bundled")
        if not blas.fast:
            logger.warning(
                "mlx is using its bundled reference BLAS: CPU matmul will be about 30x slower. "
                "Install the 'cpu' extra (pip install 'mlx-gateway[cpu]') to get MKL."
            )
    else:
        logger.info("device %s", mx.default_device())
    return MlxEngine(
        list(setup.models), _open_store(setup), setup.profile_path, outbox, setup.responses, adapters=setup.adapters
    )


def _open_store(setup: EngineSetup) -> Any:
    if setup.store is None:
        return None
    from prefix_caches import PrefixCacheStore

    store = PrefixCacheStore(Path(setup.store.root), setup.store.memory_budget_bytes, setup.store.quota_of)
    try:
        store.scan()
    except OSError as exc:
        raise EngineSetupError(setup.store.unusable(exc)) from exc
    if setup.store.sync_seconds > 0:
        store.watch(setup.store.sync_seconds)
    return store


class WireOutbox:
    """Events of every request, handed to their front ends once per turn of the engine loop (engine thread)."""

    def __init__(self, context: zmq.Context[Any]) -> None:
        self._context = context
        self._lock = threading.Lock()
        self._pending: dict[int, list[tuple[int, Any]]] = {}
        self._joining: list[tuple[int, str]] = []
        self._leaving: list[int] = []
        self._sockets: dict[int, zmq.Socket[Any]] = {}  # the engine thread's

    def join(self, front: int, address: str) -> None:
        with self._lock:
            self._joining.append((front, address))

    def leave(self, front: int) -> None:
        with self._lock:
            self._leaving.append(front)

    def emitter(self, front: int, ident: int) -> Callable[[Any], None]:
        def emit(event: Any) -> None:
            with self._lock:
                self._pending.setdefault(front, []).append((ident, event))

        return emit

    def channel(self) -> tuple[asyncio.Queue[Any], Any]:
        raise RuntimeError("the engine process has no event loop: requests come as commands")

    def flush(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, {}
            joining, self._joining = self._joining, []
            leaving, self._leaving = self._leaving, []
        for front in leaving:  # gone: what is still queued for it would hold the process's exit (its linger)
            sock = self._sockets.pop(front, None)
            if sock is not None:
                sock.close(linger=0)
        for front, address in joining:
            sock = self._context.socket(zmq.PUSH)
            sock.setsockopt(zmq.LINGER, 2000)
            sock.connect(address)
            self._sockets[front] = sock
        for front, events in pending.items():
            sock = self._sockets.get(front)
            if sock is not None:
                sock.send(wire.encode(wire.Batch(events=events)), copy=False)

    def close(self) -> None:
        for sock in self._sockets.values():
            sock.close()


class Host:
    """The engine process's main thread: commands in, reports out (see the module's docstring)."""

    def __init__(self, engine: Any, outbox: WireOutbox, context: zmq.Context[Any], folder: Path) -> None:
        self.engine = engine
        self.outbox = outbox
        self.context = context
        self.commands = context.socket(zmq.PULL)
        self.commands.bind(f"ipc://{folder}/engine")
        self.reports: dict[int, zmq.Socket[Any]] = {}
        self._live: weakref.WeakValueDictionary[tuple[int, int], Any] = weakref.WeakValueDictionary()
        self.stopping = False
        self._parent = os.getppid()
        self._store_changes = 0

    def serve(self) -> None:
        self.engine.start()
        try:
            self._loop()
        finally:
            self.engine.stop(wait=True)
            self._report_all()
            self.outbox.close()
            for sock in [self.commands, *self.reports.values()]:
                sock.close(linger=2000)

    def _loop(self) -> None:
        last_report = 0.0
        while not self.stopping and self.engine.alive and os.getppid() == self._parent:
            if self.commands.poll(int(wire.REPORT_SECONDS * 1000 / 2)):
                while True:
                    try:
                        data = self.commands.recv(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    try:
                        self._handle(wire.decode_command(data))
                    except Exception:  # a bug in one command must not take every request down with it
                        logger.exception("engine process: a command failed")
            if time.monotonic() - last_report >= wire.REPORT_SECONDS:
                self._report_all()
                last_report = time.monotonic()

    def _handle(self, command: wire.Command) -> None:
        engine = self.engine
        if isinstance(command, wire.Submit | wire.Build):
            emit = self.outbox.emitter(command.front, command.id)
            try:
                if isinstance(command, wire.Submit):
                    item = engine.enqueue(command.plan, emit)
                else:
                    item = engine.enqueue_build(command.job, emit)
            except Exception as exc:  # refused before it was queued: its one event says why (its class crosses)
                emit(Failed(exc))
                engine.wake()
                return
            self._live[(command.front, command.id)] = item
        elif isinstance(command, wire.Abort):
            item = self._live.pop((command.front, command.id), None)
            if item is not None:
                engine.cancel(item)
        elif isinstance(command, wire.Verify | wire.Warm | wire.LoadAdapter | wire.UnloadAdapter):
            self._call(command)
        elif isinstance(command, wire.Hello):
            self.outbox.join(command.front, command.address)
            sock = self.context.socket(zmq.PUSH)
            sock.setsockopt(zmq.LINGER, 2000)
            sock.connect(command.address)
            self.reports[command.front] = sock
            engine.wake()
            sock.send(wire.encode(self._report()))
        elif isinstance(command, wire.Bye):
            self.outbox.leave(command.front)
            engine.wake()
            sock = self.reports.pop(command.front, None)
            if sock is not None:
                sock.close(linger=0)
        elif isinstance(command, wire.ReportWanted):
            sock = self.reports.get(command.front)
            if sock is not None:
                sock.send(wire.encode(self._report()))
        elif isinstance(command, wire.RecordMiss):
            engine.record_miss(command.model, command.tenant)
        elif isinstance(command, wire.ForgetResponse):
            engine.forget_response(command.tenant, command.response_id)
        elif isinstance(command, wire.Forget | wire.Built):
            store = engine.prefix_store
            if store is not None and isinstance(command, wire.Forget):
                store.sync()  # the front end deleted it on disk: this store lets it go before the next command
            self._store_changes += 1
            self._report_all()  # every front end learns of it now

    def _call(self, command: wire.Verify | wire.Warm | wire.LoadAdapter | wire.UnloadAdapter) -> None:
        emit = self.outbox.emitter(command.front, command.id)
        try:
            if isinstance(command, wire.Verify):
                future = self.engine.verify(command.tenant, command.name)
                field = "verified"  # the Reply field that carries its answer
            elif isinstance(command, wire.Warm):
                future = self.engine.warm(command.tenant, command.name)
                field = "warmed"
            elif isinstance(command, wire.LoadAdapter):
                future = self.engine.adapter_loaded(command.spec)
                field = "adapter"
            else:
                future = self.engine.adapter_unloaded(command.name)
                field = "unloaded"
        except Exception as exc:  # an unknown cache, caches off: the error crosses with its class
            emit(wire.Reply(error=exc))
            self.engine.wake()
            return

        def done(f: Any) -> None:  # on the engine thread, which flushes at the end of its turn
            exc = f.exception()
            emit(wire.Reply(error=exc) if exc is not None else wire.Reply(**{field: f.result()}))

        future.add_done_callback(done)

    def _report(self) -> wire.Report:
        engine = self.engine
        store = engine.prefix_store
        models = []
        for info in engine.models():
            facts = None
            if info.ready:
                tokenizer = engine.tokenizer_if_ready(info.id)
                facts = tokenizer.facts() if tokenizer is not None else None
            models.append(wire.ModelFacts(info=info, tokenizer=facts))
        return wire.Report(
            pid=os.getpid(),
            alive=engine.alive,
            error=engine.crash_reason,
            snapshot=engine.snapshot(),
            stats=engine.stats.export(),
            models=models,
            cache_usage=[(m, t, u) for (m, t), u in store.usage().items()] if store else None,
            cache_stats=store.stats() if store else None,
            resident=store.resident_files() if store else [],
            statuses=[(t, n, st.state, st.reason) for t, n, st in store.statuses()] if store else [],
            store_changes=self._store_changes,
        )

    def _report_all(self) -> None:
        if not self.reports:
            return
        data = wire.encode(self._report())
        for sock in self.reports.values():
            sock.send(data)


def serve(setup: EngineSetup, folder: Path, ready: Callable[[str | None], None]) -> int:
    """Build the engine of ``setup`` and serve front ends on sockets in ``folder`` until SIGTERM or the parent
    process is gone; ``ready`` is told None once serving, or why the engine cannot be built."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's Ctrl-C reaches the whole group: the parent decides
    context: zmq.Context[Any] = zmq.Context()
    outbox = WireOutbox(context)
    try:
        engine = build_engine(setup, outbox)
    except EngineSetupError as exc:
        ready(str(exc))
        return 1
    host = Host(engine, outbox, context, folder)

    def stop(_signum: int, _frame: object) -> None:
        host.stopping = True

    signal.signal(signal.SIGTERM, stop)
    ready(None)
    host.serve()
    context.term()
    return 0
