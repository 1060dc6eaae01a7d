"""The mlx-lm engine: one thread owns every MLX call, the models and all caches.

Requests arrive through a queue as :class:`Plan` objects; the thread runs a step loop over the active
requests (one prefill chunk or one decode step per request per turn, round-robin) and sends typed
events back to each request's asyncio queue with ``call_soon_threadsafe``. A request that fails is
failed alone; the loop keeps serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
from mlx_lm.generate import maybe_quantize_kv_cache

from adapters.base import (
    ChoiceFinished,
    EngineError,
    EngineEvent,
    EngineNotReady,
    Failed,
    Finished,
    ModelInfo,
    Plan,
    TokenEvent,
    TokenLogprob,
    TopLogprob,
    UnknownModel,
)
from adapters.mlx_lm.models import LoadedModel, MlxTokenizer, ModelSpec, load_model
from adapters.mlx_lm.sampling import ChoiceSampler, SampledToken, choice_keys
from adapters.mlx_lm.text import StopTextAssembler

__all__ = ["MlxEngine"]

logger = logging.getLogger(__name__)


@dataclass
class _Choice:
    index: int
    cache: list[Any]
    sampler: ChoiceSampler
    text: StopTextAssembler
    generated: int = 0
    last: int = -1
    done: bool = False


@dataclass
class _Request:
    plan: Plan
    model: LoadedModel
    emit: Any  # Callable[[EngineEvent], None], bound to the request's event loop
    cancelled: threading.Event = field(default_factory=threading.Event)
    cache: list[Any] | None = None
    prefilled: int = 0
    choices: list[_Choice] = field(default_factory=list)
    completion_tokens: int = 0


@dataclass
class _ModelSlot:
    spec: ModelSpec
    state: str = "loading"  # loading | ready | failed
    error: str | None = None
    loaded: LoadedModel | None = None


class MlxEngine:
    """Implements :class:`adapters.base.Engine` on mlx-lm."""

    def __init__(self, specs: list[ModelSpec]) -> None:
        self._slots = {s.name: _ModelSlot(s) for s in specs}
        self._inbox: queue.SimpleQueue[_Request | None] = queue.SimpleQueue()
        self._active: deque[_Request] = deque()
        self._thread = threading.Thread(target=self._run, name="mlx-engine", daemon=True)
        self._stopping = threading.Event()
        self._crashed: str | None = None
        self._stats: dict[str, Any] = {"active_memory": 0, "peak_memory": 0, "cache_memory": 0}
        self._started = time.time()
        self._counters = {"completed": 0, "cancelled": 0, "failed": 0}
        self.device = "unknown"

    # ---- the HTTP side's interface -------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._inbox.put(None)
        self._thread.join(timeout=10)

    def models(self) -> list[ModelInfo]:
        out = []
        for name, slot in self._slots.items():
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
                )
            )
        return out

    def tokenizer(self, model: str) -> MlxTokenizer:
        return self._ready(model).tokenizer

    def loaded(self, model: str) -> LoadedModel:
        return self._ready(model)

    async def submit(self, plan: Plan) -> AsyncIterator[EngineEvent]:
        loaded = self._ready(plan.model)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[EngineEvent] = asyncio.Queue()

        def emit(event: EngineEvent) -> None:
            with contextlib.suppress(RuntimeError):  # the loop closed (shutdown): nobody is listening
                loop.call_soon_threadsafe(events.put_nowait, event)

        request = _Request(plan, loaded, emit)
        self._inbox.put(request)
        try:
            while True:
                event = await events.get()
                yield event
                if isinstance(event, Finished | Failed):
                    return
        finally:
            request.cancelled.set()

    def health(self) -> dict[str, Any]:
        return {
            "engine_alive": self._thread.is_alive() and self._crashed is None,
            "engine_error": self._crashed,
            "device": self.device,
            "active_requests": len(self._active),
            "requests": dict(self._counters),
            "models": {
                name: {"state": s.state, "error": s.error, "dtype": s.loaded.dtype if s.loaded else None}
                for name, s in self._slots.items()
            },
            "memory": dict(self._stats),
        }

    def _ready(self, model: str) -> LoadedModel:
        slot = self._slots.get(model)
        if slot is None:
            raise UnknownModel(model)
        if self._crashed is not None or not self._thread.is_alive():
            raise EngineNotReady(f"The engine is not running: {self._crashed or 'stopped'}")
        if slot.state == "loading":
            raise EngineNotReady(f"The model '{model}' is still loading")
        if slot.state == "failed" or slot.loaded is None:
            raise EngineNotReady(f"The model '{model}' failed to load: {slot.error}")
        return slot.loaded

    # ---- the engine thread ---------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self.device = str(mx.default_device())
            for slot in self._slots.values():
                try:
                    slot.loaded = load_model(slot.spec)
                    slot.state = "ready"
                except Exception as exc:  # a bad model must not take the others down
                    logger.exception("model %s failed to load", slot.spec.name)
                    slot.state, slot.error = "failed", f"{type(exc).__name__}: {exc}"
            self._record_memory()
            while not self._stopping.is_set():
                self._admit(block=not self._active)
                if self._active:
                    self._turn()
        except BaseException as exc:
            self._crashed = f"{type(exc).__name__}: {exc}"
            logger.exception("the engine loop crashed")
            for request in self._active:
                request.emit(Failed(EngineError("The engine stopped")))
            raise

    def _admit(self, *, block: bool) -> None:
        try:
            item = self._inbox.get(timeout=1.0) if block else self._inbox.get_nowait()
        except queue.Empty:
            if block:
                self._idle()
            return
        while item is not None:
            self._active.append(item)
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _idle(self) -> None:
        if mx.get_cache_memory() > 0:
            mx.clear_cache()
        self._record_memory()

    def _record_memory(self) -> None:
        self._stats = {
            "active_memory": mx.get_active_memory(),
            "peak_memory": mx.get_peak_memory(),
            "cache_memory": mx.get_cache_memory(),
        }

    def _turn(self) -> None:
        request = self._active.popleft()
        if request.cancelled.is_set():
            logger.info("request %s cancelled", request.plan.request_id)
            self._counters["cancelled"] += 1
            return
        try:
            done = self._step(request)
        except Exception as exc:
            logger.exception("request %s failed", request.plan.request_id)
            request.emit(Failed(EngineError(f"{type(exc).__name__}: {exc}")))
            self._counters["failed"] += 1
            return
        if done:
            plan = request.plan
            request.emit(Finished(len(plan.prompt_tokens), request.completion_tokens, 0))
            self._counters["completed"] += 1
            self._record_memory()
        else:
            self._active.append(request)

    def _step(self, request: _Request) -> bool:
        """Run one prefill chunk or one decode step. Returns True when the request is finished."""
        if not request.choices:
            logits = self._prefill_chunk(request)
            if logits is not None:
                self._start_choices(request, logits)
        else:
            for choice in request.choices:
                if not choice.done:
                    logits = self._forward(request.model, [choice.last], choice.cache)
                    self._accept(request, choice, choice.sampler(logits))
        return all(c.done for c in request.choices) if request.choices else False

    def _forward(self, loaded: LoadedModel, tokens: list[int], cache: list[Any]) -> mx.array:
        logits = loaded.model(mx.array(tokens)[None], cache=cache)[0, -1, :]
        spec = loaded.spec
        maybe_quantize_kv_cache(cache, spec.quantized_kv_start, spec.kv_group_size, spec.kv_bits)
        return logits

    def _prefill_chunk(self, request: _Request) -> mx.array | None:
        """Feed the next chunk of the prompt; return the last position's logits after the final one.

        The whole prompt goes through the model once: the final chunk's last position gives the first
        token (mlx-lm's generate_step runs the last token as a second pass).
        """
        if request.cache is None:
            request.cache = request.model.make_cache()
        prompt = request.plan.prompt_tokens
        step = request.model.spec.prefill_step_size
        chunk = list(prompt[request.prefilled : request.prefilled + step])
        request.prefilled += len(chunk)
        logits = self._forward(request.model, chunk, request.cache)
        if request.prefilled < len(prompt):
            mx.eval([c.state for c in request.cache])
            return None
        return logits

    def _start_choices(self, request: _Request, logits: mx.array) -> None:
        plan, loaded = request.plan, request.model
        params = plan.sampling
        keys = choice_keys(params.seed, params.n)
        assert request.cache is not None
        for i in range(params.n):
            # Each choice decodes into a cache of its own; generation mutates caches in place.
            cache = request.cache if i == params.n - 1 else copy.deepcopy(request.cache)
            sampler = ChoiceSampler(params, loaded.vocab_size, loaded.tokenizer.vocab_size, keys[i])
            text = StopTextAssembler(loaded.tokenizer.detokenizer(), params.stop)
            request.choices.append(_Choice(i, cache, sampler, text))
        request.cache = None
        for choice in request.choices:
            self._accept(request, choice, choice.sampler(logits))

    def _accept(self, request: _Request, choice: _Choice, sampled: SampledToken) -> None:
        tokenizer = request.model.tokenizer
        params = request.plan.sampling
        choice.generated += 1
        request.completion_tokens += 1
        choice.last = sampled.token
        logprobs = self._logprobs(tokenizer, sampled) if params.logprobs else ()
        if sampled.token in tokenizer.eos_token_ids:
            choice.done = True
            request.emit(TokenEvent(choice.index, "", (sampled.token,), logprobs))
            request.emit(ChoiceFinished(choice.index, "stop", choice.text.finish()))
            return
        delta = choice.text.add(sampled.token)
        request.emit(TokenEvent(choice.index, delta, (sampled.token,), logprobs))
        if choice.text.stopped:
            choice.done = True
            request.emit(ChoiceFinished(choice.index, "stop"))
        elif choice.generated >= params.max_tokens:
            choice.done = True
            request.emit(ChoiceFinished(choice.index, "length", choice.text.finish()))

    @staticmethod
    def _logprobs(tokenizer: MlxTokenizer, sampled: SampledToken) -> tuple[TokenLogprob, ...]:
        text, raw = tokenizer.token_text(sampled.token)
        top = []
        for token_id, lp in sampled.top:
            t_text, t_raw = tokenizer.token_text(token_id)
            top.append(TopLogprob(t_text, lp, t_raw))
        return (TokenLogprob(text, sampled.token, sampled.logprob or 0.0, raw, tuple(top)),)
