"""The messages between front-end processes and the engine process, and their one encoding (msgpack).

Commands go from a front end to the engine over one ZMQ PUSH/PULL pipe (the engine's PULL fair-queues every
front end); events come back over a PULL each front end binds: a :class:`Batch` per turn of the engine
loop, carrying every request's new events of that turn, and a :class:`Report` (the engine's immutable
snapshot, its counters and its prefix caches' use) at least every :data:`REPORT_SECONDS` and on request.
Every message is a tagged msgspec Struct; the plans and events inside are :mod:`adapters.base`'s own types.
An engine error crosses as its class name and arguments and is raised again on the other side.

Why ZMQ: ``bench/transport.py`` measured both candidates with these messages. The stdlib's
``multiprocessing.connection`` was faster (a round trip of 44-64 us against 115-145 us on our idle 2-core CPU,
three runs), but either costs well under 2% of a decode step (10 ms for an 8B model on an H100) and moves
thousands of 64-event batches a second against about a hundred steps. What decided: ZMQ's PULL fair-queues any
number of front ends into one engine socket without a connection and a reader per pair (``--api-servers``),
its sockets plug into asyncio (``zmq.asyncio``) without a thread, and it reconnects by itself; vLLM and SGLang
made the same choice.
"""

from __future__ import annotations

from typing import Any

import msgspec

from adapters import base
from adapters.base import (
    ChoiceFinished,
    EngineError,
    Failed,
    Finished,
    ModelInfo,
    Plan,
    PrefixBuild,
    PrefixBuildRefused,
    PrefixWarmed,
    Started,
    TokenEvent,
)
from adapters.setup import AdapterSpec
from adapters.snapshot import EngineSnapshot
from adapters.stats import StatsExport
from adapters.tokenizer import TokenizerFacts
from prefix_caches import errors as cache_errors
from prefix_caches.store import CacheUsage

__all__ = [
    "REPORT_SECONDS",
    "Abort",
    "Batch",
    "Build",
    "Built",
    "Bye",
    "Command",
    "Event",
    "Hello",
    "LoadAdapter",
    "UnloadAdapter",
    "ModelFacts",
    "Reply",
    "Report",
    "Forget",
    "ForgetResponse",
    "Message",
    "RecordMiss",
    "ReportWanted",
    "Submit",
    "Verify",
    "Warm",
    "decode_command",
    "decode_message",
    "encode",
]

# How often the engine process sends every front end a report unasked.
REPORT_SECONDS = 0.5


# ---- commands (front end -> engine) ---------------------------------------------------------------


class Hello(msgspec.Struct, frozen=True, tag=True):
    """A front end joined: where its events go."""

    front: int
    address: str


class Bye(msgspec.Struct, frozen=True, tag=True):
    """A front end is leaving (one of several API servers, at its exit): nothing more is sent to it."""

    front: int


class Submit(msgspec.Struct, frozen=True, tag=True):
    front: int
    id: int
    plan: Plan


class Build(msgspec.Struct, frozen=True, tag=True):
    front: int
    id: int
    job: PrefixBuild


class Abort(msgspec.Struct, frozen=True, tag=True):
    """The client went away: cancel request (or build) ``id`` of front end ``front``."""

    front: int
    id: int


class Verify(msgspec.Struct, frozen=True, tag=True):
    front: int
    id: int
    tenant: str
    name: str


class Warm(msgspec.Struct, frozen=True, tag=True):
    front: int
    id: int
    tenant: str
    name: str


class LoadAdapter(msgspec.Struct, frozen=True, tag=True):
    front: int
    id: int
    spec: AdapterSpec


class UnloadAdapter(msgspec.Struct, frozen=True, tag=True):
    front: int
    id: int
    name: str


class RecordMiss(msgspec.Struct, frozen=True, tag=True):
    """A request named a cache and was planned without it (the engine counts prefix-cache use)."""

    model: str
    tenant: str


class Forget(msgspec.Struct, frozen=True, tag=True):
    """A front end deleted a cache on disk: the engine re-reads the store before its next command."""

    tenant: str
    name: str


class ForgetResponse(msgspec.Struct, frozen=True, tag=True):
    """A stored response was deleted or expired: the engine drops its KV."""

    tenant: str
    response_id: str


class Built(msgspec.Struct, frozen=True, tag=True):
    """A front end saw a build finish (the engine saved the cache): the other front ends re-read the folder."""

    front: int


class ReportWanted(msgspec.Struct, frozen=True, tag=True):
    front: int


Command = (
    Hello
    | Bye
    | Submit
    | Build
    | Built
    | Abort
    | Verify
    | Warm
    | LoadAdapter
    | UnloadAdapter
    | RecordMiss
    | Forget
    | ForgetResponse
    | ReportWanted
)


# ---- events (engine -> front end) -----------------------------------------------------------------


class Reply(msgspec.Struct, frozen=True, tag=True):
    """The answer to a :class:`Verify`, :class:`Warm`, :class:`LoadAdapter` or :class:`UnloadAdapter`, or its error."""

    verified: dict[str, Any] | None = None
    warmed: PrefixWarmed | None = None
    adapter: ModelInfo | None = None
    unloaded: bool | None = None
    error: Exception | None = None


Event = Started | TokenEvent | ChoiceFinished | Finished | Failed | base.BuildProgress | base.PrefixBuilt | Reply


class Batch(msgspec.Struct, frozen=True, tag=True):
    """One turn's events for one front end, in order: (id, event) pairs."""

    events: list[tuple[int, Event]]


class ModelFacts(msgspec.Struct, frozen=True, kw_only=True):
    """A model as the front end needs it: what ``/v1/models`` lists, and how to load its tokenizer."""

    info: ModelInfo
    tokenizer: TokenizerFacts | None = None  # once the model loaded


class Report(msgspec.Struct, frozen=True, tag=True, kw_only=True):
    """The engine's state: its snapshot, counters and prefix caches' use, as of when it was sent."""

    pid: int
    alive: bool
    error: str | None = None
    snapshot: EngineSnapshot
    stats: StatsExport
    models: list[ModelFacts]
    cache_usage: list[tuple[str, str, CacheUsage]] | None = None
    cache_stats: dict[str, int] | None = None
    resident: list[tuple[str, str, str]] = []  # tenant, name, file sha256 of resident caches
    statuses: list[tuple[str, str, str, str | None]] = []  # tenant, name, state, reason: caches not ready
    # Counts the front ends' changes to the store's folder (Forget, Built): a front end that sees it move re-reads
    # the folder at once, so a cache another front end built or deleted is seen in milliseconds, not a sync later.
    store_changes: int = 0


Message = Batch | Report


# ---- encoding ------------------------------------------------------------------------------------


def _error_classes() -> dict[str, type[Exception]]:
    classes: dict[str, type[Exception]] = {}
    for module in (base, cache_errors):
        for name in dir(module):
            value = getattr(module, name)
            if isinstance(value, type) and issubclass(value, Exception):
                classes[name] = value
    return classes


_ERRORS = _error_classes()


def _enc_hook(obj: Any) -> Any:
    if isinstance(obj, PrefixBuildRefused):
        return {"kind": "PrefixBuildRefused", "args": [], "refusal": _enc_hook(obj.refusal)}
    if isinstance(obj, Exception):
        kind = type(obj).__name__
        if kind not in _ERRORS:  # an unexpected exception: its text survives, its class does not
            return {"kind": "EngineError", "args": [f"{kind}: {obj}"]}
        return {"kind": kind, "args": _error_args(obj)}
    raise NotImplementedError(f"cannot send {type(obj).__name__}")


def _error_args(exc: Exception) -> list[Any]:
    if isinstance(exc, base.UnknownModel):
        return [exc.model]
    if isinstance(exc, cache_errors.PrefixCacheNotFound | cache_errors.PrefixCacheExists):
        return [exc.name]
    if isinstance(exc, cache_errors.PrefixCacheQuotaExceeded):
        return [exc.quota, str(exc)]
    return [a for a in exc.args if isinstance(a, str | int | float | bool | None)]


def _dec_hook(kind: type, obj: Any) -> Any:
    if kind is object:  # a tool's JSON schema, a message's content: any JSON value, as it came
        return obj
    if isinstance(kind, type) and issubclass(kind, Exception) and isinstance(obj, dict):
        cls = _ERRORS.get(str(obj.get("kind")), EngineError)
        if cls is PrefixBuildRefused:
            return PrefixBuildRefused(_dec_hook(Exception, obj["refusal"]))
        try:
            return cls(*obj.get("args", []))
        except TypeError:
            return EngineError(*obj.get("args", []))
    raise NotImplementedError(f"cannot read {kind}")


_encoder = msgspec.msgpack.Encoder(enc_hook=_enc_hook)
_commands = msgspec.msgpack.Decoder(Command, dec_hook=_dec_hook)
_messages = msgspec.msgpack.Decoder(Message, dec_hook=_dec_hook)


def encode(message: Command | Message) -> bytes:
    return _encoder.encode(message)


def decode_command(data: bytes) -> Command:
    return _commands.decode(data)


def decode_message(data: bytes) -> Message:
    return _messages.decode(data)
