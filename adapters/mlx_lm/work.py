"""What the engine thread works on: requests and their choices, cache builds, calls, and model slots.

The HTTP side creates them (through :class:`adapters.mlx_lm.engine.MlxEngine`) and the engine thread owns
them from then on; ``cancelled`` is the only field the HTTP side sets afterwards.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

from adapters.base import Plan
from adapters.mlx_lm.models import LoadedModel, ModelSpec
from adapters.mlx_lm.sampling import ChoiceSampler
from adapters.mlx_lm.tool_calls import ChoiceText
from prefix_caches.manifest import Manifest

__all__ = ["Build", "Call", "Choice", "ModelSlot", "Request", "log_extra"]


@dataclass
class Choice:
    index: int
    cache: list[Any] | None  # None when the choice runs in a batch (the batch holds its cache)
    sampler: ChoiceSampler | None
    text: ChoiceText
    generated: int = 0
    last: int = -1
    done: bool = False
    uid: int = -1


@dataclass
class Request:
    plan: Plan
    model: LoadedModel
    emit: Any  # Callable[[EngineEvent], None], bound to the request's event loop
    cancelled: threading.Event = field(default_factory=threading.Event)
    cache: list[Any] | None = None
    prefilled: int = 0
    cached_tokens: int = 0
    choices: list[Choice] = field(default_factory=list)
    completion_tokens: int = 0
    # Completion tokens of a thinking model's reasoning (None: the request does not split reasoning off).
    reasoning_tokens: int | None = None
    batched: bool = False
    # Bytes of the sequential path's KV budget held while it runs (every choice at its longest).
    kv_reserved: int = 0
    # A cold named cache recomputed because loading it was measured dearer: keep the prefix KV it makes.
    recomputing: Manifest | None = None
    # time.perf_counter() (CLOCK_MONOTONIC, one clock for every process of the machine): the request reached
    # the engine, its prompt was first worked on, its first token was sampled.
    queued_at: float = field(default_factory=time.perf_counter)
    scheduled_at: float = 0.0
    first_token_at: float = 0.0
    # The model's decode-step count when the engine thread saw the request cancelled (None: not seen yet).
    cancel_seen: int | None = None


@dataclass
class Build:
    manifest: Manifest
    model: LoadedModel
    emit: Any
    cancelled: threading.Event = field(default_factory=threading.Event)
    cache: list[Any] | None = None
    prefilled: int = 0
    started: float = field(default_factory=time.perf_counter)
    request_id: str | None = None  # None: a rebuild at start-up, no request asked for it
    replace: bool = True  # False: a create, which another replica's commit of the same name refuses


@dataclass
class Call:
    """A function to run on the engine thread (it owns every MLX array)."""

    fn: Any
    future: Any  # concurrent.futures.Future


@dataclass
class ModelSlot:
    spec: ModelSpec
    state: str = "loading"  # loading | ready | failed
    error: str | None = None
    loaded: LoadedModel | None = None
    stage: str = "waiting to start"  # what loading does now
    load_seconds: float | None = None


def log_extra(plan: Plan) -> dict[str, str]:
    """``extra=`` for a log line about ``plan``: the HTTP request's id (log formatters read it)."""
    return {"request_id": plan.request_id}
