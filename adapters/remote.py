"""The engine in its own process, as a front end sees it: :class:`RemoteEngine` implements
:class:`adapters.base.Engine` with commands and events over ZMQ (:mod:`adapters.wire`). Nothing here imports mlx.

Ownership in a front-end process: the event loop owns ``_waiting`` (each open request's queue), ``_report``
(the engine's latest :class:`wire.Report`, replaced whole) and both sockets; worker threads only read the
report and the index. The prefix-cache index (:class:`FrontIndex`) is this process's own view of the store's
folder, as another replica's would be; what only the engine knows (resident KV, use counters, statuses it
set) comes from the report.

If the engine process dies, every open request gets one ``Failed`` event, ``health()`` says the engine is
down, and the server exits non-zero for its supervisor (``gateway.processes.server``).

Two ways to get one: :meth:`RemoteEngine.launch` starts the engine process and owns it (its folder, its stop);
:meth:`RemoteEngine.attach` joins an engine process that another process launched and owns (``--api-servers``:
every front-end process attaches under its own ``front`` id; the launcher's :attr:`RemoteEngine.address` says
where). An attached front end never stops the engine; it watches the engine's pid to learn of its death.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import json
import logging
import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import AsyncGenerator, AsyncIterator
from pathlib import Path
from typing import Any

import anyio.to_thread
import msgspec
import zmq
import zmq.asyncio

from adapters import wire
from adapters.base import (
    BuildEvent,
    EngineError,
    EngineEvent,
    EngineNotReady,
    Failed,
    Finished,
    ModelInfo,
    ModelUnavailable,
    Plan,
    PrefixBuild,
    PrefixBuilt,
    PrefixWarmed,
    PromptTokenizer,
    UnknownModel,
)
from adapters.setup import AdapterSpec, EngineSetup, StoreSetup
from adapters.snapshot import EngineSnapshot, health_report
from adapters.stats import EngineStats, StatsExport
from adapters.tokenizer import TokenizerFacts
from prefix_caches.errors import PrefixCacheError, PrefixCacheNotFound
from prefix_caches.manifest import Manifest
from prefix_caches.store import CacheStatus, CacheUsage, PrefixCacheStore

__all__ = ["EngineAddress", "EngineProcessError", "FrontIndex", "RemoteEngine"]

logger = logging.getLogger(__name__)

# How long a front end waits for a report it asked for before answering from the last one.
REFRESH_SECONDS = 1.0
# How long an attached front end's last message (its Bye) may take to leave when it closes.
BYE_SECONDS = 0.5


class EngineProcessError(Exception):
    """The engine process could not start; the message says why (one line for the operator)."""


class EngineAddress(msgspec.Struct, frozen=True, kw_only=True):
    """Where a running engine process takes front ends: its private socket folder and its pid."""

    folder: str
    pid: int


def _empty_report() -> wire.Report:
    return wire.Report(pid=0, alive=True, snapshot=EngineSnapshot(), stats=StatsExport(), models=[])


class FrontIndex(PrefixCacheStore):
    """The named caches as this front end plans with them: manifests and statuses read from the store's folder
    (scanned at start, re-read by ``sync``), never KV arrays. Deletes go to the disk here and the engine is
    told; use counters, residency and the engine's own statuses come from its latest report."""

    def __init__(self, store: StoreSetup, engine: RemoteEngine) -> None:
        super().__init__(Path(store.root), store.memory_budget_bytes, store.quota_of)
        self._engine = engine

    def delete(self, tenant: str, name: str) -> Manifest:
        manifest = super().delete(tenant, name)
        self._engine.tell(wire.Forget(tenant, name))
        return manifest

    def get(self, tenant: str, name: str) -> Manifest:
        try:
            return super().get(tenant, name)
        except PrefixCacheNotFound:
            if self._engine.attached is None or _on_event_loop():
                raise
            # One of several front ends: another may have built it a moment ago (its word reaches this index
            # within milliseconds). Off the event loop (planning runs in a worker thread) the folder is read once
            # more before a 404, so a client that built a cache can use it at once whichever front end it reaches.
            self.sync()
            return super().get(tenant, name)

    def status(self, tenant: str, name: str) -> CacheStatus:
        engine_says = self._engine.report.statuses
        for t, n, state, reason in engine_says:
            if t == tenant and n == name:
                return CacheStatus(state, reason)
        return super().status(tenant, name)

    def is_resident(self, manifest: Manifest) -> bool:
        return any(
            (t, n, sha) == (manifest.tenant, manifest.name, manifest.file_sha256)
            for t, n, sha in self._engine.report.resident
        )

    def usage(self) -> dict[tuple[str, str], CacheUsage]:
        return {(m, t): u for m, t, u in self._engine.report.cache_usage or []}

    def stats(self) -> dict[str, int]:
        return dict(self._engine.report.cache_stats or {})

    def record_miss(self, model: str, tenant: str) -> None:
        self._engine.record_miss(model, tenant)


def _on_event_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def _refusal(error: Exception) -> bool:
    """An error the engine's checks raise before queueing (an engine in this process raises it from the call)."""
    return isinstance(error, UnknownModel | EngineNotReady | ModelUnavailable | PrefixCacheError)


class RemoteEngine:
    """Implements :class:`adapters.base.Engine` on an engine process (``launch``, then ``start`` on the loop)."""

    def __init__(self, setup: EngineSetup, command: list[str], *, attach: EngineAddress | None = None) -> None:
        self._setup = setup
        self._command = command
        self._attached = attach
        # 0700: only this user can connect. An attached front end uses its launcher's folder, and leaves it.
        self._folder = Path(attach.folder) if attach else Path(tempfile.mkdtemp(prefix="mlx-gateway-"))
        self._process: subprocess.Popen[bytes] | None = None
        self._index = FrontIndex(setup.store, self) if setup.store is not None else None
        self._specs = {m.name for m in setup.models}
        self.report = _empty_report()
        self._stats = EngineStats()
        self._stats_of: StatsExport | None = None
        self._tokenizers: dict[str, tuple[TokenizerFacts, PromptTokenizer]] = {}
        self._loading: set[str] = set()
        self._tokenizer_errors: dict[str, str] = {}
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Queue[Any]] = {}
        self._asked: list[asyncio.Future[None]] = []
        self._dead: str | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._context: zmq.asyncio.Context | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._store_changes = 0  # the report's count of folder changes this front end's index has read
        self.front = 0

    # ---- lifetime -----------------------------------------------------------------------------

    @classmethod
    def attach(cls, setup: EngineSetup, address: EngineAddress, front: int) -> RemoteEngine:
        """A front end, numbered ``front`` (unique among the engine's front ends), of the engine process at
        ``address``, which another process launched; then ``start`` it on the loop."""
        engine = cls(setup, [], attach=address)
        engine.front = front
        engine._open_index()
        return engine

    def _open_index(self) -> None:
        store = self._setup.store
        if self._index is None or store is None:
            return
        try:
            self._index.scan()
        except OSError as exc:
            raise EngineProcessError(store.unusable(exc)) from exc
        if store.sync_seconds > 0:
            self._index.watch(store.sync_seconds)

    def launch(self, timeout: float = 600.0) -> None:
        """Start the engine process and wait until it serves (models load after); EngineProcessError if it
        cannot (an unusable cache folder, say: its one line)."""
        assert self._attached is None, "an attached front end does not launch the engine"
        self._open_index()
        self._process = subprocess.Popen(
            [*self._command, str(self._folder)], stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )
        assert self._process.stdin is not None and self._process.stdout is not None
        self._process.stdin.write(msgspec.json.encode(self._setup))
        self._process.stdin.close()
        line = self._process.stdout.readline()
        self._process.stdout.close()
        try:
            answer = json.loads(line) if line else {"error": "the engine process exited before it served"}
        except ValueError:
            answer = {"error": f"the engine process said {line[:200]!r}"}
        if answer.get("error"):
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._process.wait(timeout)
            self.close()
            raise EngineProcessError(str(answer["error"]))
        logger.info("engine process %d serving", self._process.pid)

    @property
    def pid(self) -> int | None:
        if self._attached is not None:
            return self._attached.pid
        return self._process.pid if self._process is not None else None

    @property
    def attached(self) -> EngineAddress | None:
        """The engine process this front end attached to (one of several), or None (it launched its own)."""
        return self._attached

    @property
    def address(self) -> EngineAddress:
        """Where other front ends attach to the engine process this one launched."""
        assert self._process is not None, "launch() first"
        return EngineAddress(folder=str(self._folder), pid=self._process.pid)

    def exit_status(self) -> int | None:
        """The launched engine process's exit status (reaping it), or None while it runs."""
        return self._process.poll() if self._process is not None else None

    def start(self) -> None:
        """Connect this front end (on the server's event loop)."""
        self._loop = asyncio.get_running_loop()
        self._context = zmq.asyncio.Context()
        self._events = self._context.socket(zmq.PULL)
        address = f"ipc://{self._folder}/front-{self.front}"
        self._events.bind(address)
        self._commands = self._context.socket(zmq.PUSH)
        self._commands.setsockopt(zmq.LINGER, 0)
        self._commands.connect(f"ipc://{self._folder}/engine")
        self.tell(wire.Hello(self.front, address))
        self._tasks = [self._loop.create_task(self._read()), self._loop.create_task(self._watch())]

    def stop(self, *, wait: bool = True, timeout: float = 60.0) -> None:
        """Ask the engine process to stop (it fails what still runs, and those events arrive here); with
        ``wait``, until it exited. An attached front end fails its own open requests and aborts them in the
        engine, which serves on for the others."""
        if self._attached is not None:
            if self._loop is not None and not self._loop.is_closed():
                # Maybe from a signal handler: the loop's state is changed on the loop, between its callbacks.
                self._loop.call_soon_threadsafe(self._fail_open, "The server is stopping")
            if wait:
                self.close()
            return
        process = self._process
        if process is None:
            return
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
        if not wait:
            return
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            logger.error("the engine process did not stop within %.0fs; killing it", timeout)
            process.kill()
            process.wait()
        self.close()

    def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        if self._context is not None:
            if self._attached is not None and self._dead is None:
                # The engine serves on: it lets go of this front end's sockets (the linger delivers the Bye). A
                # blocking twin of the socket: this may run after the event loop ended.
                commands = zmq.Socket.shadow(self._commands.underlying)
                with contextlib.suppress(zmq.ZMQError):
                    commands.send(wire.encode(wire.Bye(self.front)), zmq.NOBLOCK)
                commands.setsockopt(zmq.LINGER, int(BYE_SECONDS * 1000))
                self._commands.close()
            self._context.destroy(linger=0)
            self._context = None
        if self._index is not None:
            self._index.close()
        if self._attached is None:
            shutil.rmtree(self._folder, ignore_errors=True)

    def _fail_open(self, reason: str) -> None:
        """Every open request of this front end gets one Failed, and the engine is told to drop it."""
        failure = Failed(EngineError(reason))
        for ident, queue in self._waiting.items():
            queue.put_nowait(failure)
            if self._dead is None and self._context is not None:
                self.tell(wire.Abort(self.front, ident))

    # ---- what the engine reports --------------------------------------------------------------

    def models(self) -> list[ModelInfo]:
        """A model is ready here once the engine serves it and this front end has its tokenizer."""
        return [
            m.info if self._has_tokenizer(m) else dataclasses.replace(m.info, ready=False) for m in self.report.models
        ]

    def _has_tokenizer(self, m: wire.ModelFacts) -> bool:
        cached = self._tokenizers.get(m.info.parent or m.info.id)  # an adapter speaks as its base model
        return m.tokenizer is not None and cached is not None and cached[0] == m.tokenizer

    def tokenizer(self, model: str) -> PromptTokenizer:
        # An adapter speaks as its base model.
        model = next((m.info.parent for m in self.report.models if m.info.id == model and m.info.parent), model)
        if model not in self._specs:
            raise UnknownModel(model)
        facts = self._model(model)
        cached = self._tokenizers.get(model)
        if cached is None or cached[0] != facts:
            raise EngineNotReady(f"The model '{model}' is still loading (its tokenizer, here); retry shortly")
        return cached[1]

    def _load_tokenizers(self, report: wire.Report) -> None:
        """Load each newly ready model's tokenizer on a worker thread (it takes a second, not the event loop)."""
        for m in report.models:
            facts = m.tokenizer
            if facts is None or m.info.id in self._loading or m.info.parent:
                continue
            cached = self._tokenizers.get(m.info.id)
            if cached is not None and cached[0] == facts:
                continue
            self._loading.add(m.info.id)
            self._tasks.append(asyncio.get_running_loop().create_task(self._load_tokenizer(m.info.id, facts)))

    async def _load_tokenizer(self, model: str, facts: TokenizerFacts) -> None:
        from adapters.tokenizer import TextTokenizer

        try:
            tokenizer = await anyio.to_thread.run_sync(TextTokenizer.load, facts)
            self._tokenizers[model] = (facts, tokenizer)
        except Exception:
            logger.exception("model %s: its tokenizer could not be loaded in the HTTP process", model)
            self._tokenizer_errors[model] = "its tokenizer could not be loaded in the HTTP process"
        finally:
            self._loading.discard(model)

    def _model(self, model: str) -> Any:
        if self._dead is not None:
            raise ModelUnavailable(f"The engine is not running: {self._dead}")
        health = dict(self.report.snapshot.models).get(model)
        if model in self._tokenizer_errors:
            raise ModelUnavailable(f"The model '{model}' cannot serve: {self._tokenizer_errors[model]}")
        if health is not None and health.state == "failed":
            raise ModelUnavailable(
                f"The model '{model}' failed to load ({health.error}); retrying will not help until the server's "
                "operator fixes it and restarts the server"
            )
        facts = next((m.tokenizer for m in self.report.models if m.info.id == model and m.info.ready), None)
        if facts is None:
            stage = health.stage if health is not None else "starting"
            raise EngineNotReady(f"The model '{model}' is still loading ({stage}); retry shortly")
        return facts

    @property
    def prefix_store(self) -> FrontIndex | None:
        return self._index

    @property
    def stats(self) -> EngineStats:
        if self._stats_of is not self.report.stats:
            self._stats, self._stats_of = EngineStats.restored(self.report.stats), self.report.stats
        return self._stats

    @property
    def alive(self) -> bool:
        return self._dead is None and self.report.alive

    def health(self) -> dict[str, object]:
        report = self.report
        out = health_report(self.alive, self._dead or report.error, report.snapshot, self.stats, report.cache_stats)
        out["engine_pid"] = self.pid
        models = out["models"]
        assert isinstance(models, dict)
        for m in report.models:  # ready for the engine, not yet here: still loading, as a client sees it
            shown = models.get(m.info.id)
            if m.info.ready and not self._has_tokenizer(m) and isinstance(shown, dict):
                if m.info.id in self._tokenizer_errors:
                    models[m.info.id] = {**shown, "state": "failed", "error": self._tokenizer_errors[m.info.id]}
                else:
                    models[m.info.id] = {**shown, "state": "loading", "stage": "loading the tokenizer (HTTP process)"}
        return out

    async def refresh(self) -> None:
        if self._dead is not None or self._loop is None:
            return
        future: asyncio.Future[None] = self._loop.create_future()
        self._asked.append(future)
        self.tell(wire.ReportWanted(self.front))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(future), REFRESH_SECONDS)

    # ---- commands -------------------------------------------------------------------------------

    def tell(self, command: wire.Command) -> None:
        """Send ``command`` (from the event loop, or from a worker thread through it)."""
        loop = self._loop
        if loop is None:
            return
        data = wire.encode(command)
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            self._commands.send(data)
        else:
            loop.call_soon_threadsafe(self._commands.send, data)

    def record_miss(self, model: str, tenant: str) -> None:
        self.tell(wire.RecordMiss(model, tenant))

    def forget_response(self, tenant: str, response_id: str) -> None:
        self.tell(wire.ForgetResponse(tenant, response_id))

    def response_kv_bytes(self) -> dict[str, int]:
        return self.report.snapshot.response_kv.tenant_bytes

    async def _events_of(self, ident: int, command: wire.Command) -> AsyncGenerator[Any, None]:
        queue: asyncio.Queue[Any] = asyncio.Queue()
        self._waiting[ident] = queue
        try:
            if self._dead is not None:
                raise ModelUnavailable(f"The engine is not running: {self._dead}")
            self.tell(command)
            while True:
                yield await queue.get()
        finally:
            del self._waiting[ident]

    async def submit(self, plan: Plan) -> AsyncIterator[EngineEvent]:
        ident = next(self._ids)
        async for event in self._run(ident, wire.Submit(self.front, ident, plan), Finished | Failed):
            yield event

    async def build_prefix(self, job: PrefixBuild) -> AsyncIterator[BuildEvent]:
        ident = next(self._ids)
        async for event in self._run(ident, wire.Build(self.front, ident, job), PrefixBuilt | Failed):
            if isinstance(event, PrefixBuilt) and self._index is not None:
                # The engine saved it: this front end's index reads it before the client hears of it, and the
                # other front ends (several API servers) are told to.
                await anyio.to_thread.run_sync(self._index.sync)
                if self._attached is not None:
                    self.tell(wire.Built(self.front))
            yield event

    async def _run(self, ident: int, command: wire.Submit | wire.Build, last: Any) -> AsyncIterator[Any]:
        """``command``'s events up to the one of type ``last``. A refusal before queueing (the first event) is
        raised, as an engine in this process raises it; a caller that stops early aborts the work in the engine."""
        ended, first = False, True
        events = self._events_of(ident, command)
        try:
            async for event in events:
                if first and isinstance(event, Failed) and _refusal(event.error):
                    ended = True
                    raise event.error
                first = False
                ended = isinstance(event, last)
                yield event
                if ended:
                    return
        finally:
            await events.aclose()
            if not ended and self._dead is None:
                self.tell(wire.Abort(self.front, ident))

    async def load_adapter(self, spec: AdapterSpec) -> ModelInfo:
        reply = await self._ask(wire.LoadAdapter(self.front, next(self._ids), spec))
        assert reply.adapter is not None
        await self.refresh()  # lists it from now on
        return reply.adapter

    async def unload_adapter(self, name: str) -> bool:
        reply = await self._ask(wire.UnloadAdapter(self.front, next(self._ids), name))
        if reply.unloaded:  # the engine deleted the caches built under it: every front end re-reads the folder
            self.tell(wire.Built(self.front))
        await self.refresh()
        return bool(reply.unloaded)

    async def _ask(self, command: wire.Verify | wire.Warm | wire.LoadAdapter | wire.UnloadAdapter) -> wire.Reply:
        events = self._events_of(command.id, command)
        try:
            async for event in events:
                if isinstance(event, Failed):
                    raise event.error
                if isinstance(event, wire.Reply):
                    if event.error is not None:
                        raise event.error
                    return event
        finally:
            await events.aclose()
        raise ModelUnavailable("The engine is not running")

    async def verify_prefix(self, tenant: str, name: str) -> dict[str, object]:
        reply = await self._ask(wire.Verify(self.front, next(self._ids), tenant, name))
        return dict(reply.verified or {})

    async def warm_prefix(self, tenant: str, name: str) -> PrefixWarmed:
        reply = await self._ask(wire.Warm(self.front, next(self._ids), tenant, name))
        assert reply.warmed is not None
        return reply.warmed

    # ---- the event loop's tasks -----------------------------------------------------------------

    async def _read(self) -> None:
        while True:
            message = wire.decode_message(await self._events.recv())
            if isinstance(message, wire.Report):
                self.report = message
                self._load_tokenizers(message)
                if self._index is not None and message.store_changes != self._store_changes:
                    self._store_changes = message.store_changes
                    task = asyncio.get_running_loop().create_task(self._resync(self._index))
                    self._tasks.append(task)
                    task.add_done_callback(self._tasks.remove)
                asked, self._asked = self._asked, []
                for future in asked:
                    if not future.done():
                        future.set_result(None)
                continue
            for ident, event in message.events:
                queue = self._waiting.get(ident)
                if queue is not None:
                    queue.put_nowait(event)

    def _ended(self) -> tuple[str, bool] | None:
        """How the engine process ended and whether that was an error, or None while it runs."""
        if self._attached is not None:
            try:
                # its launcher reaps it within 0.1 s of its end (gateway.processes.api_servers)
                os.kill(self._attached.pid, 0)
            except ProcessLookupError:
                return f"the engine process {self._attached.pid} ended", True
            except PermissionError:  # a process of another user took its pid: gone all the same
                return f"the engine process {self._attached.pid} ended", True
            return None
        process = self._process
        if process is None or process.poll() is None:
            return None
        code = process.returncode
        how = f"killed by signal {-code}" if code < 0 else f"exit status {code}"
        return f"the engine process {process.pid} ended ({how})", code != 0

    async def _resync(self, index: FrontIndex) -> None:
        await anyio.to_thread.run_sync(index.sync)

    async def _watch(self) -> None:
        """The engine process's death ends every open request at once (one Failed each)."""
        if self._process is None and self._attached is None:
            return
        while (ended := self._ended()) is None:
            await asyncio.sleep(0.1)
        self._dead, failed = ended
        if failed:
            logger.error("%s", self._dead)
        failure = Failed(ModelUnavailable(f"The engine stopped: {self._dead}"))
        for queue in self._waiting.values():
            queue.put_nowait(failure)
        for future in self._asked:
            if not future.done():
                future.set_result(None)
