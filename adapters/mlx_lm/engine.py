"""The mlx-lm engine: one thread owns every MLX call, the models and all caches.

Requests arrive through a queue as :class:`Plan` objects; the thread runs a step loop over the active
requests (one prefill chunk or one decode step per request per turn, round-robin) and sends typed
events back to each request's asyncio queue with ``call_soon_threadsafe``. A request that fails is
failed alone; the loop keeps serving.

Ownership: the engine thread ("mlx-engine") owns ``_active``, ``_batched``, ``_batchers``, the model slots'
states, ``prefixes`` (automatic reuse included) and every MLX array. Other threads put items in ``_inbox``,
set a request's ``cancelled`` flag, read ``stats`` (lock-guarded) and read ``_snapshot``: an immutable
:class:`~adapters.snapshot.EngineSnapshot` the engine thread rebuilds after every turn of its loop. Tests may
set ``fault_hook`` (one attribute, read once per step) and read ``prefixes.prefill_seconds_per_token``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import copy
import ctypes
import ctypes.util
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Generator, Iterator, Sequence
from typing import Any

import mlx.core as mx
from mlx_lm.models.cache import KVCache

from adapters.base import (
    AdapterExists,
    AdapterRefused,
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
    UnknownModel,
    kv_bytes_at_most,
)
from adapters.mlx_lm.batching import Batcher, SequenceOut
from adapters.mlx_lm.choices import accept, choice_text, end_choice
from adapters.mlx_lm.models import SOURCE_ERRORS, LoadedModel, MlxTokenizer, ModelSpec, load_steps
from adapters.mlx_lm.outbox import EventOutbox, Outbox
from adapters.mlx_lm.prefill import prefill_chunk
from adapters.mlx_lm.prefix_kv import new_manifest
from adapters.mlx_lm.prefix_path import PrefixPath
from adapters.mlx_lm.response_kv import ResponseKV
from adapters.mlx_lm.sampling import ChoiceSampler, choice_keys
from adapters.mlx_lm.served_adapters import ServedAdapters
from adapters.mlx_lm.work import Build, Call, Choice, ModelSlot, Request, log_extra
from adapters.setup import AdapterSpec, ResponseKVSetup
from adapters.snapshot import EngineSnapshot, MemoryUse, ModelHealth, ReuseUse, health_report
from adapters.stats import EngineStats
from prefix_caches import kv
from prefix_caches.errors import InvalidKVSettings, PrefixCacheError, PrefixCacheUnusable
from prefix_caches.names import cache_paths
from prefix_caches.store import PrefixCacheStore, file_sha256

__all__ = ["MlxEngine"]


def _nothing() -> None:
    return None


def _trim_heap() -> None:
    """Return the C heap's free pages to the system (glibc's ``malloc_trim``; nothing elsewhere)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return
    trim(0)


logger = logging.getLogger(__name__)


class MlxEngine:
    """Implements :class:`adapters.base.Engine` on mlx-lm."""

    def __init__(
        self,
        specs: list[ModelSpec],
        store: PrefixCacheStore | None = None,
        profile_path: str | None = None,
        outbox: EventOutbox | None = None,
        responses: ResponseKVSetup | None = None,
        load: Callable[[ModelSpec], Generator[str, None, LoadedModel]] = load_steps,
        adapters: Sequence[AdapterSpec] = (),
    ) -> None:
        """Build the engine (its thread starts with :meth:`start`).

        Args:
            specs: the models, loaded on the engine thread in turns, each serving as soon as it is ready.
            store: the prefix-cache store (None: prefix caches off).
            profile_path: where the engine loop's cProfile output goes (None: not profiled).
            outbox: where events go at the end of each turn (default: requests' event loops here).
            responses: stored responses' KV settings.
            load: how a model loads, one stage per ``next()`` (:func:`load_steps`; tests hold a model back).
            adapters: the configured adapters, each loaded once its base model is.
        """
        self._slots = {s.name: ModelSlot(s) for s in specs}
        self._configured_adapters = tuple(adapters)
        # The engine thread's own; other threads read the published views and infos (replaced, never changed).
        self.adapters = ServedAdapters()
        self._views: dict[str, LoadedModel] = {}
        self._adapter_infos: tuple[ModelInfo, ...] = ()
        self._load_steps = load
        self._store = store
        self._inbox: queue.SimpleQueue[Request | Build | Call | None] = queue.SimpleQueue()
        # Where events go at the end of each turn: requests' event loops here, or the engine process's
        # front ends (adapters.mlx_lm.host).
        self._outbox = outbox or Outbox()
        self._active: deque[Request | Build] = deque()
        self._thread = threading.Thread(target=self._profiled_run, name="mlx-engine", daemon=True)
        self.profile_path = profile_path
        self._stopping = threading.Event()
        self._crashed: str | None = None
        self._memory = MemoryUse()
        self._started = time.time()
        # Request outcomes, decode-step times, batch steps: /health and /metrics both read these.
        self.stats = EngineStats()
        # Balanced mode: one continuous batch per model; uid -> (request, choice).
        self._batchers: dict[str, Batcher] = {}
        self._batched: dict[int, tuple[Request, Choice]] = {}
        # The sequential path (strict mode, quantised or sliding-window KV): KV bytes its running requests
        # hold, each counted at its longest; a request starts only when it fits the model's budget.
        self._sequential_kv: dict[str, int] = {}
        # Named prefix caches, automatic reuse, cold-cache decisions; builds queue onto the turns.
        responses = responses or ResponseKVSetup()
        kept = ResponseKV(responses.memory_bytes, responses.budget_of, responses.ttl_seconds)
        self.prefixes = PrefixPath(store, self.stats, lambda build: self._active.append(build), kept)
        self.device = "unknown"
        # Fault injection, for tests: called on the engine thread with a sequential request's plan before each
        # of its steps (a prefill chunk or a decode step); what it raises fails that request alone, as a
        # failing MLX call would. None (nothing called) in service.
        self.fault_hook: Callable[[Plan], None] | None = None
        self._snapshot = EngineSnapshot()
        self._trimmed = True  # nothing freed yet to give back
        self._publish()

    # ---- the HTTP side's interface -------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def stop(self, *, wait: bool = True, timeout: float = 60.0) -> None:
        """Stop the engine thread (idempotent): it finishes its current MLX call, fails the requests still
        running and exits. Waiting for it means MLX is never torn down under a running thread at exit."""
        self._stopping.set()
        self._inbox.put(None)
        if not wait:
            return
        if self._thread.is_alive():
            self._thread.join(timeout=timeout)
            if self._thread.is_alive():
                logger.error("the engine thread did not stop within %.0fs", timeout)
        if self._store is not None:
            self._store.flush()  # hit counters and last-used times

    def models(self) -> list[ModelInfo]:
        """The models that serve or will serve: a model that failed to load is not listed."""
        out = []
        for name, slot in self._slots.items():
            if slot.state == "failed":
                continue
            loaded = slot.loaded
            out.append(
                ModelInfo(
                    id=name,
                    created=loaded.created if loaded else int(self._started),
                    owned_by="mlx-gateway",
                    context_length=loaded.context_length if loaded else 0,
                    ready=slot.state == "ready",
                    source=slot.spec.source,
                    fingerprint=loaded.fingerprint if loaded else "",
                    kv_bytes_per_token=loaded.kv_bytes_per_token if loaded else 0,
                    kv_budget=loaded.kv_budget if loaded else 0,
                    batched=loaded is not None and self._batches(loaded),
                )
            )
        return out + list(self._adapter_infos)

    def tokenizer(self, model: str) -> MlxTokenizer:
        return self._ready(model).tokenizer

    def tokenizer_if_ready(self, model: str) -> MlxTokenizer | None:
        view = self._views.get(model)
        if view is not None:
            return view.tokenizer
        slot = self._slots.get(model)
        return slot.loaded.tokenizer if slot is not None and slot.loaded is not None else None

    def loaded(self, model: str) -> LoadedModel:
        return self._ready(model)

    @property
    def prefix_store(self) -> PrefixCacheStore | None:
        return self._store

    # Commands: any thread. ``emit`` is called on the engine thread (or here, for an error at once) with
    # each event; the outbox hands them over at the end of the turn.

    def enqueue(self, plan: Plan, emit: Callable[[Any], None]) -> Request:
        """Queue ``plan``; raises UnknownModel, EngineNotReady or ModelUnavailable before queueing."""
        request = Request(plan, self._ready(plan.model), emit)
        self._inbox.put(request)
        return request

    def enqueue_build(self, job: PrefixBuild, emit: Callable[[Any], None]) -> Build:
        loaded = self._ready(job.model)
        if self._store is None:
            raise EngineError("prefix caches are not enabled")
        if job.kv_bits and loaded.head_dim % job.kv_group_size:
            raise InvalidKVSettings(
                f"kv_group_size {job.kv_group_size} must divide the model's head dimension ({loaded.head_dim})"
            )
        manifest = new_manifest(
            loaded,
            job.tenant,
            job.name,
            job.source,
            list(job.tokens),
            job.prompt,
            [dict(m) for m in job.messages] if job.messages is not None else None,
            job.kv_bits,
            job.kv_group_size,
        )
        build = Build(manifest, loaded, emit, request_id=job.request_id, replace=job.replace)
        self._inbox.put(build)
        return build

    def cancel(self, item: Request | Build) -> None:
        """The client went away before ``item`` ended: it leaves the engine at its next turn."""
        if item.cancelled.is_set():
            return
        item.cancelled.set()
        self._inbox.put(Call(lambda: self._saw_cancel(item), None))  # also wakes the engine if it blocks

    def _saw_cancel(self, item: Request | Build) -> None:
        """Engine thread, between two turns: the decode steps from here to the request's leaving are its lag
        (a step already running when the client left cannot be stopped, and is not counted)."""
        if isinstance(item, Request) and item.cancel_seen is None:
            item.cancel_seen = self.stats.decode_steps(item.model.base_name)

    def _cancel_lag(self, request: Request) -> int:
        if request.cancel_seen is None:
            return 0  # dropped before the engine thread took the cancellation from its inbox
        return self.stats.decode_steps(request.model.base_name) - request.cancel_seen

    def wake(self) -> None:
        """Make the engine thread finish its turn (and hand over its events) if it blocks on its inbox."""
        self._inbox.put(Call(_nothing, None))

    def call(self, fn: Callable[[], Any]) -> concurrent.futures.Future[Any]:
        """Run ``fn`` on the engine thread (it owns every MLX array) between two turns."""
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        self._inbox.put(Call(fn, future))
        return future

    def verify(self, tenant: str, name: str) -> concurrent.futures.Future[dict[str, Any]]:
        """Integrity of a stored cache: digests of its resident arrays and its file (on the engine thread)."""
        store = self._enabled_store()
        manifest = store.get(tenant, name)

        def check() -> dict[str, Any]:
            try:
                cache, _ = store.arrays(manifest)
                resident = kv.arrays_sha256(cache)
            except PrefixCacheUnusable as exc:
                return {"ok": False, "reason": str(exc)}
            arrays_path, _ = cache_paths(store.root, tenant, name)
            on_disk = file_sha256(arrays_path)
            return {"ok": on_disk == manifest.file_sha256, "arrays_sha256": resident, "file_sha256": on_disk}

        return self.call(check)

    def warm(self, tenant: str, name: str) -> concurrent.futures.Future[PrefixWarmed]:
        """Load a stored cache's KV into memory: the same load (checksum once per file version, then resident
        under the LRU budget) a request naming a cold cache does."""
        store = self._enabled_store()
        manifest = store.get(tenant, name)

        def load() -> PrefixWarmed:
            started = time.perf_counter()
            cache, was_resident = store.arrays(manifest)
            seconds = time.perf_counter() - started
            return PrefixWarmed(was_resident, store.is_resident(manifest), seconds, kv.cache_nbytes(cache))

        return self.call(load)

    async def load_adapter(self, spec: AdapterSpec) -> ModelInfo:
        return await asyncio.wrap_future(self.adapter_loaded(spec))

    async def unload_adapter(self, name: str) -> bool:
        return await asyncio.wrap_future(self.adapter_unloaded(name))

    def adapter_loaded(self, spec: AdapterSpec) -> concurrent.futures.Future[ModelInfo]:
        """Serve ``spec`` (on the engine thread, between two turns); its model entry.

        Raises (through the future): UnknownModel (no such base model), EngineNotReady (still loading),
        AdapterExists, AdapterRefused.
        """

        def load() -> ModelInfo:
            if spec.name in self._slots:
                raise AdapterExists(f"'{spec.name}' is a model served here: an adapter needs a name of its own")
            self._add_adapter(spec)
            return next(i for i in self._adapter_infos if i.id == spec.name)

        return self.call(load)

    def adapter_unloaded(self, name: str) -> concurrent.futures.Future[bool]:
        """Stop serving adapter ``name`` (whether it was served): new requests naming it get a 404, running
        ones finish on it, and then its weights go. The KV computed under it goes at once: its named prefix
        caches (every tenant's), automatic reuse and stored responses' KV."""

        def unload() -> bool:
            served = self.adapters.remove(name)
            if served is None:
                return False
            self._publish_adapters()
            fingerprint = served.view.fingerprint
            self.prefixes.reuse.forget_model(fingerprint)
            self.prefixes.responses.forget_model(fingerprint)
            if self._store is not None:
                for manifest in self._store.all():
                    if manifest.model == name:
                        with contextlib.suppress(PrefixCacheError):
                            self._store.delete(manifest.tenant, manifest.name)
                            logger.info("prefix cache %s/%s removed with its adapter", manifest.tenant, manifest.name)
            self._release_adapters()
            return True

        return self.call(unload)

    def _add_adapter(self, spec: AdapterSpec) -> None:
        """Engine thread: load ``spec`` onto its (ready) base model and publish it."""
        slot = self._slots.get(spec.base)
        if slot is None or slot.state == "failed":
            raise AdapterRefused(f"the base model '{spec.base}' is not served here")
        if slot.loaded is None:
            raise EngineNotReady(f"The model '{spec.base}' is still loading ({slot.stage}); retry shortly")
        served = self.adapters.add(spec, slot.loaded)
        self._publish_adapters()
        self.prefixes.check_stored(served.view)

    def _publish_adapters(self) -> None:
        self._views = {s.spec.name: s.view for s in self.adapters.all()}
        self._adapter_infos = tuple(self.adapters.infos(self._batches))

    def _release_adapters(self) -> None:
        """Free unloaded adapters' weights once no request runs on them."""
        if not self.adapters.draining:
            return
        running = [r.model for r in self._active] + [r.model for r, _ in self._batched.values()]
        if self.adapters.release(running):
            self._record_memory()

    def _enabled_store(self) -> PrefixCacheStore:
        if self._store is None:
            raise EngineError("prefix caches are not enabled")
        return self._store

    # The async interface (adapters.base.Engine), for an engine in the server's own process.

    async def submit(self, plan: Plan) -> AsyncIterator[EngineEvent]:
        events, emit = self._outbox.channel()
        request = self.enqueue(plan, emit)
        ended = False
        try:
            while True:
                event = await events.get()
                yield event
                if isinstance(event, Finished | Failed):
                    ended = True
                    return
        finally:
            if not ended:
                self.cancel(request)

    async def build_prefix(self, job: PrefixBuild) -> AsyncIterator[BuildEvent]:
        events, emit = self._outbox.channel()
        build = self.enqueue_build(job, emit)
        try:
            while True:
                event = await events.get()
                yield event
                if isinstance(event, PrefixBuilt | Failed):
                    return
        finally:
            build.cancelled.set()

    async def verify_prefix(self, tenant: str, name: str) -> dict[str, Any]:
        return await asyncio.wrap_future(self.verify(tenant, name))

    async def warm_prefix(self, tenant: str, name: str) -> PrefixWarmed:
        return await asyncio.wrap_future(self.warm(tenant, name))

    async def refresh(self) -> None:
        """Nothing to wait for: ``health()`` and ``stats`` read this process's own latest state."""

    def record_miss(self, model: str, tenant: str) -> None:
        if self._store is not None:
            self._store.record_miss(model, tenant)

    def forget_response(self, tenant: str, response_id: str) -> None:
        self.call(lambda: self.prefixes.responses.forget(tenant, response_id))

    def response_kv_bytes(self) -> dict[str, int]:
        return self._snapshot.response_kv.tenant_bytes

    def snapshot(self) -> EngineSnapshot:
        """The engine's state as its thread last published it (immutable; any thread)."""
        return self._snapshot

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self._crashed is None

    @property
    def crash_reason(self) -> str | None:
        return self._crashed

    def health(self) -> dict[str, Any]:
        """What ``/health`` shows of the engine: the latest snapshot, with the counters' totals."""
        return health_report(
            self.alive, self._crashed, self._snapshot, self.stats, self._store.stats() if self._store else None
        )

    def _publish(self) -> None:
        """Build and publish the snapshot (engine thread; once at construction, before the thread starts)."""
        requests = {id(r) for r, _ in self._batched.values()}
        batchers = list(self._batchers.values())
        reuse = self.prefixes.reuse
        self._snapshot = EngineSnapshot(
            device=self.device,
            active_requests=len(self._active) + len(requests),
            batched_sequences=len(self._batched),
            waiting_sequences=sum(b.waiting for b in batchers),
            preempted_sequences=sum(b.preempted for b in batchers),
            automatic_reuse=ReuseUse(entries=reuse.entry_count(), hits=reuse.hits),
            response_kv=self.prefixes.responses.usage(),
            memory=self._memory,
            models=tuple(
                (
                    name,
                    ModelHealth(
                        state=s.state,
                        error=s.error,
                        stage=s.stage if s.state == "loading" else None,
                        load_seconds=s.load_seconds,
                        dtype=s.loaded.dtype if s.loaded else None,
                        weights=s.loaded.weights if s.loaded else None,
                        isolation_mode=s.spec.isolation_mode,
                    ),
                )
                for name, s in self._slots.items()
            ),
        )

    def _ready(self, model: str) -> LoadedModel:
        view = self._views.get(model)
        if view is not None:
            self._ready(view.base_name)  # the engine runs, its base model serves
            return view
        slot = self._slots.get(model)
        if slot is None:
            raise UnknownModel(model)
        if self._crashed is not None or not self._thread.is_alive() or self._stopping.is_set():
            # Refused once stopping: a request queued after the loop failed the rest would wait forever.
            raise ModelUnavailable(f"The engine is not running: {self._crashed or 'stopped'}")
        if slot.state == "failed":
            raise ModelUnavailable(
                f"The model '{model}' failed to load ({slot.error}); retrying will not help until the server's "
                "operator fixes it and restarts the server"
            )
        if slot.state == "loading" or slot.loaded is None:
            raise EngineNotReady(f"The model '{model}' is still loading ({slot.stage}); retry shortly")
        return slot.loaded

    # ---- the engine thread ---------------------------------------------------------------------

    def _profiled_run(self) -> None:
        """The engine loop, under cProfile when MLX_GATEWAY_PROFILE names an output file."""
        if not self.profile_path:
            self._run()
            return
        import cProfile

        profiler = cProfile.Profile()
        try:
            profiler.runcall(self._run)
        finally:
            profiler.dump_stats(self.profile_path)

    def _run(self) -> None:
        try:
            self.device = str(mx.default_device())
            if mx.default_device() != mx.cpu:
                # MLX keeps freed buffers for reuse; under churning batch shapes that hoard ran a GPU out of
                # memory (seen on an H200 at 64 streams). Bound it. (On CPU mlx's default bound is 32 MB; a
                # 1 GiB one doubled the server's resident memory in the soak benchmark.)
                mx.set_cache_limit(4 * 1024**3)
            # Models load one stage per turn of the loop, taking turns: each serves as soon as it is ready,
            # whatever the others still have to do.
            loading = deque(self._load(slot) for slot in self._slots.values())
            worked = False
            while not self._stopping.is_set():
                if loading:
                    stages = loading.popleft()
                    if next(stages, None) is None:
                        self._record_memory()
                    else:
                        loading.append(stages)
                # Nothing to do, or nothing that can progress (every batched sequence waiting): block on the
                # inbox, which a new request, a call or a cancellation wakes; never spin.
                self._admit(block=not self._active and not loading and not worked)
                self._hand_new_to_batches()
                worked = False
                if self._batched:
                    worked = self._batch_turn()
                if self._active:
                    self._turn()
                self._outbox.flush()
                self._release_adapters()
                self._publish()
            self._fail_all("The server is stopping")
        except BaseException as exc:
            self._crashed = f"{type(exc).__name__}: {exc}"
            logger.exception("the engine loop crashed")
            self._fail_all("The engine stopped")
            raise
        finally:
            self._outbox.flush()
            self._publish()

    def _fail_all(self, reason: str) -> None:
        """Every request and build still in the engine, or waiting in its inbox, gets ``reason``."""
        waiting: list[Request | Build] = []
        with contextlib.suppress(queue.Empty):
            while True:
                item = self._inbox.get_nowait()
                if isinstance(item, Call):
                    if item.future is not None:
                        item.future.set_exception(EngineError(reason))
                elif item is not None:
                    waiting.append(item)
        batched = {id(r): r for r, _ in self._batched.values()}
        for request in [*self._active, *batched.values(), *waiting]:
            request.emit(Failed(EngineError(reason)))
            if isinstance(request, Request):
                self.stats.request_done(request.plan.model, "failed")
        self._active.clear()
        self._batched.clear()

    def _load(self, slot: ModelSlot) -> Iterator[str]:
        """Load one model, one stage per ``next()``; a model that fails is marked so and the others go on."""
        name = slot.spec.name
        started = time.perf_counter()
        try:
            stages = self._load_steps(slot.spec)
            while True:
                try:
                    slot.stage = next(stages)
                except StopIteration as done:
                    loaded: LoadedModel = done.value
                    break
                logger.info("model %s: %s (%.1fs)", name, slot.stage, time.perf_counter() - started)
                yield slot.stage
            if self._store is not None:
                slot.stage = "calibrating prefill"
                logger.info("model %s: %s (%.1fs)", name, slot.stage, time.perf_counter() - started)
                yield slot.stage
                self.prefixes.calibrate(loaded)
            slot.loaded, slot.state = loaded, "ready"
            slot.load_seconds = round(time.perf_counter() - started, 2)
            logger.info("model %s: ready after %.1fs", name, slot.load_seconds)
            self.prefixes.check_stored(loaded)
            for spec in self._configured_adapters:
                if spec.base == name:
                    try:
                        self._add_adapter(spec)
                    except AdapterRefused as exc:  # the operator's to fix; the base model and others serve
                        logger.error("adapter %s not served: %s", spec.name, exc)
                    except Exception:  # nor does an unexpected failure take its base model down
                        logger.exception("adapter %s not served", spec.name)
        except Exception as exc:  # a bad model must not take the others down
            slot.state, slot.error = "failed", f"{type(exc).__name__}: {exc}"
            if isinstance(exc, SOURCE_ERRORS):  # the operator's to fix, not a bug: one line
                logger.error("model %s failed to load: %s", name, slot.error)
            else:
                logger.exception("model %s failed to load", name)

    def _admit(self, *, block: bool) -> None:
        try:
            item = self._inbox.get(timeout=1.0) if block else self._inbox.get_nowait()
        except queue.Empty:
            if block:
                self._idle()
            return
        self._trimmed = False
        while item is not None:
            if isinstance(item, Call) and item.future is None:
                item.fn()  # a wake-up, or a note from another thread (a cancellation seen)
            elif isinstance(item, Call):
                try:
                    item.future.set_result(item.fn())
                except Exception as exc:
                    item.future.set_exception(exc)
            else:
                self._active.append(item)
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _idle(self) -> None:
        """A second with nothing to do: flush the store's counters and give freed memory back."""
        if self._store is not None:
            self._store.flush()
        if mx.get_cache_memory() > 0:
            mx.clear_cache()
        if not self._trimmed:
            # glibc keeps freed heap pages (its mmap threshold rises with the sizes it has seen freed): after a
            # burst of large batches the server's RSS stayed 1.4x its size before (tests/integration/test_abuse.py).
            _trim_heap()
            self._trimmed = True
        self._record_memory()

    def _record_memory(self) -> None:
        self._memory = MemoryUse(
            active_memory=mx.get_active_memory(),
            peak_memory=mx.get_peak_memory(),
            cache_memory=mx.get_cache_memory(),
        )

    def _turn(self) -> None:
        request = self._active.popleft()
        if isinstance(request, Build):
            self.prefixes.build_turn(request)
            return
        if request.cancelled.is_set():
            logger.info("request %s cancelled", request.plan.request_id, extra=log_extra(request.plan))
            self._unreserve(request)
            self.stats.request_done(request.plan.model, "cancelled", self._cancel_lag(request))
            return
        if not self._reserve(request):
            self._active.append(request)  # it waits for KV room; the requests running free it
            return
        try:
            done = self._step(request)
        except Exception as exc:
            self._fail(request, exc)
            return
        if done:
            self.prefixes.keep_response(request, request.choices[0].cache)  # before Finished: a follow-up finds it
            self._finish(request)
        else:
            self._active.append(request)

    def _fail(self, request: Request, exc: Exception, log: bool = True) -> None:
        """One request failed: it alone gets the error; the engine goes on."""
        if log:
            logger.exception("request %s failed", request.plan.request_id, exc_info=exc, extra=log_extra(request.plan))
        request.emit(Failed(EngineError(f"{type(exc).__name__}: {exc}")))
        self._unreserve(request)
        self.stats.request_done(request.plan.model, "failed")

    def _finish(self, request: Request) -> None:
        plan = request.plan
        request.emit(
            Finished(
                len(plan.prompt_tokens),
                request.completion_tokens,
                request.cached_tokens,
                request.queued_at,
                request.scheduled_at,
                request.first_token_at,
                request.reasoning_tokens,
            )
        )
        self._unreserve(request)
        self.stats.request_done(plan.model, "completed")
        self._record_memory()

    def _reserve(self, request: Request) -> bool:
        """Whether a sequential request may run: it already holds its KV, or its choices at their longest
        fit what the model's running requests leave of the budget (or nothing else runs)."""
        loaded = request.model
        if request.kv_reserved or request.batched or not loaded.kv_budget:
            return True
        plan = request.plan
        sampling = plan.sampling
        need = sampling.n * kv_bytes_at_most(len(plan.prompt_tokens), sampling.max_tokens, loaded.kv_bytes_per_token)
        held = self._sequential_kv.get(loaded.base_name, 0)
        if held and held + need > loaded.kv_budget:
            return False
        request.kv_reserved = max(1, need)
        self._sequential_kv[loaded.base_name] = held + request.kv_reserved
        return True

    def _unreserve(self, request: Request) -> None:
        if request.kv_reserved:
            name = request.model.base_name
            self._sequential_kv[name] = self._sequential_kv.get(name, 0) - request.kv_reserved
            request.kv_reserved = 0

    # ---- balanced mode: continuous batching -----------------------------------------------------

    @staticmethod
    def _batches(loaded: LoadedModel) -> bool:
        """Whether the model's requests decode in its batch (balanced and performance modes)."""
        if loaded.spec.isolation_mode == "strict":
            return False
        if loaded.spec.kv_bits is not None:
            return False  # quantised caches cannot merge into a batch: they run in their own group
        return loaded.batchable  # not e.g. a sliding-window cache: slots hold plain KV only

    def _try_batch(self, request: Request) -> bool:
        """Hand a new request to its model's batch, if its mode and caches allow. True if handed."""
        loaded = request.model
        if not self._batches(loaded) or request.choices or request.cache is not None:
            return False
        self.prefixes.attach(request)
        cache: list[Any] = request.cache or []
        if any(type(c) is not KVCache for c in cache):
            return False  # e.g. a q4/q8 prefix cache: the sequential path serves it
        batcher = self._batchers.get(loaded.base_name)
        if batcher is None:  # one batch per base model: its adapters' rows decode in it, each with its own
            base = self._slots[loaded.base_name].loaded
            assert base is not None
            batcher = Batcher(base, base.spec.max_running, base.kv_budget or None)
            self._batchers[loaded.base_name] = batcher
        params = request.plan.sampling
        prompt = request.plan.prompt_tokens
        uids = batcher.insert(
            list(prompt[request.prefilled :]),
            cache,
            params,
            prompt,
            keep_cache=self._keeps_cache(request),
            tenant=request.plan.tenant,
            model=loaded,
        )
        request.cache = None
        request.batched = True
        for i, uid in enumerate(uids):
            choice = Choice(i, None, None, choice_text(request), uid=uid)
            request.choices.append(choice)
            self._batched[uid] = (request, choice)
        return True

    def _hand_new_to_batches(self) -> None:
        """Move every new balanced-mode request into its batch at once: arrivals that come together are
        prefilled together (one prompt step for all, not one per arrival)."""
        if not any(isinstance(r, Request) and not r.choices and r.cache is None for r in self._active):
            return
        # A snapshot: attaching a prefix may queue a rebuild onto _active while we go.
        items, self._active = list(self._active), deque()
        keep: deque[Request | Build] = deque()
        for item in items:
            if isinstance(item, Request) and not item.cancelled.is_set():
                try:
                    if self._try_batch(item):
                        continue
                except Exception as exc:
                    self._fail(item, exc)
                    continue
            keep.append(item)
        self._active.extendleft(reversed(keep))

    def _batch_turn(self) -> bool:
        """One step of every busy batch; whether any of them did something (prefill, decode or a read)."""
        worked = self._drop_cancelled_batched()
        for name, batcher in list(self._batchers.items()):
            if not batcher.busy:
                continue
            try:
                started = time.perf_counter()

                def early(firsts: list[SequenceOut], batcher: Batcher = batcher) -> None:
                    self._deliver(batcher, firsts)
                    self._outbox.flush()  # a lone request's first token leaves before the next step is built

                outs = batcher.step(early)
                for tokens, seconds in batcher.prefill_timings:
                    self.prefixes.record_prefill(batcher.loaded, tokens, seconds)
                seconds = time.perf_counter() - started
                if not batcher.worked:
                    continue  # every sequence waits (for slots or KV room): no step to count
                worked = True
                self.stats.batch_step(name, len(outs) + batcher.early_count, seconds)
                if outs and batcher.decoded:  # the step's decode time, without the prefill chunk it carried
                    prefill = sum(s for _, s in batcher.prefill_timings)
                    self.stats.decode_step(name, "batch", max(0.0, seconds - prefill))
            except Exception as exc:  # a batch failure fails the requests in it, not the engine
                logger.exception("batch step failed for model %s", name)
                self._fail_batch(name, exc)
                continue
            self._deliver(batcher, outs)
        return worked

    def _deliver(self, batcher: Batcher, outs: list[SequenceOut]) -> None:
        """Hand a batch's tokens to their requests: events, choices that end, requests that finish."""
        for out in outs:
            entry = self._batched.get(out.uid)
            if entry is None:
                continue
            request, choice = entry
            if choice.done:
                continue
            accept(request, choice, out.sampled)
            if not choice.done and out.finish_reason is not None:
                choice.done = True  # the batch ended it (its own length/EOS bookkeeping)
                end_choice(request, choice, out.finish_reason)
            if choice.done:
                if choice.index == 0:
                    self.prefixes.keep_for_reuse(request, out.cache)
                    self.prefixes.keep_recomputed(request, out.cache)
                    self.prefixes.keep_response(request, out.cache)
                self._batched.pop(out.uid, None)
                if out.finish_reason is None:
                    batcher.remove([out.uid])  # a stop string: the batch would go on
                if all(c.done for c in request.choices):
                    self._finish(request)

    @staticmethod
    def _keeps_cache(request: Request) -> bool:
        """Whether the first choice's KV outlives it: a recomputed prefix, a stored response, or automatic reuse."""
        kv = request.plan.response_kv
        return (
            request.recomputing is not None
            or (kv is not None and kv.keep_as is not None)
            or (request.model.spec.isolation_mode == "performance" and request.plan.prefix is None)
        )

    def _drop_cancelled_batched(self) -> bool:
        """Take cancelled requests' sequences out of their batches; whether there were any."""
        cancelled = {id(r): r for r, _ in self._batched.values() if r.cancelled.is_set()}
        for request in cancelled.values():
            uids = [c.uid for c in request.choices if c.uid in self._batched]
            self._batchers[request.model.base_name].remove(uids)
            for uid in uids:
                self._batched.pop(uid, None)
            logger.info("request %s cancelled", request.plan.request_id, extra=log_extra(request.plan))
            self.stats.request_done(request.plan.model, "cancelled", self._cancel_lag(request))
        return bool(cancelled)

    def _fail_batch(self, name: str, exc: Exception) -> None:
        failed = {id(r): r for r, _ in self._batched.values() if r.model.base_name == name}
        for request in failed.values():
            self._fail(request, exc, log=False)  # the batch's failure is logged once, above
        self._batched = {u: e for u, e in self._batched.items() if e[0].model.base_name != name}
        batcher = self._batchers.pop(name)
        with contextlib.suppress(Exception):
            batcher.close()

    def _step(self, request: Request) -> bool:
        """Run one prefill chunk or one decode step. Returns True when the request is finished."""
        if request.cache is None and not request.choices:
            self.prefixes.attach(request)
        if self.fault_hook is not None:
            self.fault_hook(request.plan)
        if not request.choices:
            logits = self._prefill_chunk(request)
            if logits is not None:
                self.prefixes.keep_recomputed(request, request.cache)
                self._start_choices(request, logits)
        else:
            started = time.perf_counter()
            for choice in request.choices:
                if not choice.done:
                    assert choice.cache is not None and choice.sampler is not None
                    logits = request.model.forward([choice.last], choice.cache)
                    accept(request, choice, choice.sampler(logits))
            self.stats.decode_step(request.model.base_name, "sequential", time.perf_counter() - started)
        return all(c.done for c in request.choices) if request.choices else False

    def _prefill_chunk(self, request: Request) -> mx.array | None:
        """Feed the next chunk of the prompt (:func:`prefill_chunk`); the last position's logits after the
        final one. One chunk per turn: the other requests' steps run between two chunks."""
        assert request.cache is not None
        part = prefill_chunk(request.model, request.plan.prompt_tokens, request.cache, request.prefilled)
        request.prefilled = part.done
        if part.seconds is not None:
            self.prefixes.record_prefill(request.model, part.tokens, part.seconds)
        return part.logits if part.finished else None

    def _start_choices(self, request: Request, logits: mx.array) -> None:
        plan, loaded = request.plan, request.model
        params = plan.sampling
        keys = choice_keys(params.seed, params.n)
        assert request.cache is not None
        for i in range(params.n):
            # Each choice decodes into a cache of its own; generation mutates caches in place.
            cache = request.cache if i == params.n - 1 else copy.deepcopy(request.cache)
            grammars = loaded.tokenizer.grammars if params.constraint is not None else None
            sampler = ChoiceSampler(params, loaded.vocab_size, keys[i], plan.prompt_tokens, grammars)
            request.choices.append(Choice(i, cache, sampler, choice_text(request)))
        request.cache = None
        for choice in request.choices:
            assert choice.sampler is not None
            accept(request, choice, choice.sampler(logits))
