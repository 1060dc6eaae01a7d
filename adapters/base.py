"""The small interface between the HTTP side and an engine: plans in, typed events out.

Nothing here imports mlx: the gateway depends on this module only, and any engine (the mlx-lm one, or a
fake one in HTTP-layer tests) implements :class:`Engine`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import msgspec

from adapters.setup import AdapterSpec
from adapters.stats import EngineStats
from prefix_caches.errors import PrefixCacheError
from prefix_caches.manifest import Manifest
from prefix_caches.store import PrefixCacheStore

__all__ = [
    "AdapterExists",
    "AdapterRefused",
    "BuildEvent",
    "BuildProgress",
    "PrefixBuild",
    "PrefixBuilt",
    "PrefixUse",
    "PrefixWarmed",
    "ResponseKVUse",
    "Started",
    "ChoiceFinished",
    "common_prefix",
    "Engine",
    "EngineError",
    "EngineEvent",
    "EngineNotReady",
    "KV_STEP",
    "kv_bytes_at_most",
    "ModelUnavailable",
    "Failed",
    "Finished",
    "ModelInfo",
    "OutputConstraint",
    "Plan",
    "PromptTokenizer",
    "SamplingParams",
    "TokenEvent",
    "TokenLogprob",
    "ToolCallOut",
    "ToolCalling",
    "TopLogprob",
    "StorageFull",
    "UnknownModel",
    "PrefixBuildRefused",
]


# Positions a sequence's KV grows by at a time (the slot batch's capacity step, as mlx-lm's KVCache.step).
KV_STEP = 256


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens two sequences share (planning's cache matching, continued conversations, and the
    engine's automatic reuse all ask it)."""
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def kv_bytes_at_most(prompt_tokens: int, max_tokens: int, bytes_per_token: int) -> int:
    """The KV one sequence may come to hold: its prompt, ``max_tokens`` and the position being written, in
    whole :data:`KV_STEP` steps. What the KV budget (``max_running_kv_bytes``) counts for it, in planning and
    in the engine alike."""
    positions = prompt_tokens + max_tokens + 1
    return -(-positions // KV_STEP) * KV_STEP * bytes_per_token


class EngineError(Exception):
    """A request failed inside the engine. The engine keeps serving others."""


class PrefixBuildRefused(EngineError):
    """The store refused a built cache (a tenant's quota); ``refusal`` says why, and nothing stored changed."""

    def __init__(self, refusal: PrefixCacheError) -> None:
        super().__init__(str(refusal))
        self.refusal = refusal


class StorageFull(EngineError):
    """A prefix cache could not be saved: its disk is full. The previous version, if any, is untouched."""


class UnknownModel(EngineError):
    def __init__(self, model: str) -> None:
        super().__init__(f"The model '{model}' does not exist")
        self.model = model


class EngineNotReady(EngineError):
    """The model is still loading: retrying shortly will help."""


class AdapterRefused(EngineError):
    """Files that cannot be served as an adapter of the named base model (the caller's to fix: a 400)."""


class AdapterExists(EngineError):
    """An adapter or model of that name is already served (a 409)."""


class ModelUnavailable(EngineError):
    """The model failed to load, or the engine stopped: retrying will not help until the server restarts."""


@dataclass(frozen=True)
class ModelInfo:
    id: str
    created: int
    owned_by: str
    context_length: int
    ready: bool
    source: str
    fingerprint: str = ""
    # Running KV: bytes one position of one sequence takes, the budget running sequences share
    # (max_running_kv_bytes), and whether choices decode in a batch's slots (else each on its own cache).
    kv_bytes_per_token: int = 0
    kv_budget: int = 0
    batched: bool = True
    # An adapter: its base model (as vLLM names it), the tenant it belongs to (None: every tenant), the digest of
    # its files, and their size in memory.
    parent: str | None = None
    owner: str | None = None
    adapter_fingerprint: str = ""
    adapter_bytes: int = 0


@dataclass(frozen=True)
class OutputConstraint:
    """A grammar the output must follow (``response_format``, forced tool calls).

    ``source`` is JSON-schema text for ``json_schema`` (``'{"type": "object"}'`` for ``json_object``), or a
    Lark grammar in llguidance's dialect for ``lark`` (it may embed ``%json{...}``). Hashable: the
    engine's compiler caches compiled grammars by it.
    """

    kind: Literal["json_schema", "lark"]
    source: str


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # 1.0: off
    stop: tuple[str, ...] = ()
    seed: int | None = None
    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    logprobs: bool = False
    top_logprobs: int = 0
    # The grammar the output must follow (response_format, a required or named tool call).
    constraint: OutputConstraint | None = None


@dataclass(frozen=True)
class PrefixUse:
    """Reuse the first ``reuse`` tokens of the named cache's KV (planning checked they match)."""

    tenant: str
    name: str
    reuse: int


@dataclass(frozen=True)
class ToolCalling:
    """The request's tools, when its output is to be searched for tool calls (``tool_choice`` not none).

    ``choice``: ``auto`` (the model decides), ``required`` (at least one call) or ``named`` (exactly one
    call of ``names[0]``); the last two are enforced by constrained decoding.
    """

    tools: tuple[Mapping[str, object], ...]
    choice: str
    names: tuple[str, ...]
    parallel: bool = True


class ToolCallOut(msgspec.Struct, frozen=True, tag=True):
    """A tool call the model made: ``arguments`` is JSON text, as OpenAI sends it."""

    id: str
    name: str
    arguments: str


@dataclass(frozen=True)
class ResponseKVUse:
    """A stored response's KV (``/v1/responses``): start from the first ``reuse`` positions of ``parent``'s
    sequence (planning checked they are the prompt's first tokens), and keep this request's whole sequence
    (prompt and output) as ``keep_as``'s. Either may be absent; both are the plan's tenant's."""

    parent: str | None = None
    reuse: int = 0
    keep_as: str | None = None


@dataclass(frozen=True)
class Plan:
    """Everything the engine needs for one request, decided before it is submitted."""

    request_id: str
    model: str
    tenant: str
    prompt_tokens: tuple[int, ...]
    sampling: SamplingParams
    prefix: PrefixUse | None = None
    tools: ToolCalling | None = None
    response_kv: ResponseKVUse | None = None
    # Split a thinking model's reasoning off into TokenEvent.reasoning (chat: reasoning_content). False keeps
    # the whole output as text: a raw completion's prompt is the client's, and its output is theirs too.
    reasoning: bool = False


@dataclass(frozen=True)
class PrefixBuild:
    """Build a named prefix cache from ``tokens`` (its source is kept so that it can be rebuilt)."""

    request_id: str
    model: str
    tenant: str
    name: str
    tokens: tuple[int, ...]
    source: str  # "prompt" | "messages"
    prompt: str | None = None
    messages: tuple[dict[str, object], ...] | None = None
    kv_bits: int | None = None
    kv_group_size: int = 64
    # False: the name must still be free when the build commits (another replica may have taken it since).
    replace: bool = False


class Started(msgspec.Struct, frozen=True, tag=True):
    """The engine admitted the request; what a named prefix cache gave it."""

    cached_tokens: int
    prefix_hit: bool = False
    prefix_resident: bool = False
    prefix_load_ms: float = 0.0
    prefix_miss_reason: str | None = None


class BuildProgress(msgspec.Struct, frozen=True, tag=True):
    done: int
    total: int


class PrefixBuilt(msgspec.Struct, frozen=True, tag=True):
    manifest: Manifest
    seconds: float


class PrefixWarmed(msgspec.Struct, frozen=True, tag=True):
    """A stored cache's KV loaded into memory: whether it already was, and whether it stayed (it does not
    when it alone is larger than the store's memory budget)."""

    was_resident: bool
    resident: bool
    seconds: float
    bytes_in_memory: int


class TopLogprob(msgspec.Struct, frozen=True, tag=True):
    token: str
    logprob: float
    bytes: tuple[int, ...]


class TokenLogprob(msgspec.Struct, frozen=True, tag=True):
    token: str
    token_id: int
    logprob: float
    bytes: tuple[int, ...]
    top: tuple[TopLogprob, ...] = ()


class TokenEvent(msgspec.Struct, frozen=True, tag=True):
    """New text for one choice. ``text`` may be empty while a possible stop string is held back.

    ``text`` is the answer; ``reasoning`` is a thinking model's reasoning (its think block's text, markers
    taken out; only when the plan asked for it with ``Plan.reasoning``). A choice's reasoning all comes
    before its answer and its tool calls.
    """

    choice: int
    text: str
    token_ids: tuple[int, ...]
    logprobs: tuple[TokenLogprob, ...] = ()
    tool_calls: tuple[ToolCallOut, ...] = ()
    reasoning: str = ""


class ChoiceFinished(msgspec.Struct, frozen=True, tag=True):
    choice: int
    reason: str  # "stop" | "length" | "tool_calls"
    text: str = ""  # held-back text released at the end


class Finished(msgspec.Struct, frozen=True, tag=True):
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0
    # The engine's clock (time.perf_counter, CLOCK_MONOTONIC: the same in every process of the machine):
    # when the request reached the engine, its prompt was first worked on, its first token was sampled.
    # 0: not measured.
    queued_at: float = 0.0
    scheduled_at: float = 0.0
    first_token_at: float = 0.0
    # Of completion_tokens, those of a thinking model's reasoning; None when reasoning was not split off.
    reasoning_tokens: int | None = None


class Failed(msgspec.Struct, frozen=True, tag=True):
    # An EngineError, or (refused before it was queued) what the engine's own check raised: a PrefixCacheError.
    error: Exception


EngineEvent = Started | TokenEvent | ChoiceFinished | Finished | Failed
BuildEvent = BuildProgress | PrefixBuilt | Failed


class PromptTokenizer(Protocol):
    """What planning needs from a model's tokenizer."""

    def encode(self, text: str) -> list[int]: ...

    def encode_after(self, prefix_text: str, prefix_tokens: Sequence[int], text: str) -> list[int]:
        """``encode(text)`` for a ``text`` that may start with ``prefix_text`` (whose encoding is
        ``prefix_tokens``), tokenising only what follows it where that cannot change the result."""
        ...

    def decode(self, tokens: Sequence[int]) -> str: ...

    def render_chat(
        self, messages: Sequence[Mapping[str, object]], *, add_generation_prompt: bool, tools: object = None
    ) -> str: ...

    @property
    def vocab_size(self) -> int: ...

    @property
    def tool_call_format(self) -> str | None:
        """The tool-call format the chat template uses (mlx-lm's parser name, e.g. ``json_tools``)."""
        ...

    @property
    def eos_token_ids(self) -> set[int]:
        """The ids that end a sequence."""
        ...

    def check_constraint(self, constraint: OutputConstraint) -> None:
        """Raise ValueError (with a message for the user) if ``constraint`` cannot constrain this model."""
        ...

    def tool_call_constraint(self, tools: ToolCalling) -> OutputConstraint:
        """The grammar of calls to ``tools.names`` in this model's tool-call format; ValueError if the
        format cannot be constrained."""
        ...


class Engine(Protocol):
    def models(self) -> list[ModelInfo]: ...

    async def load_adapter(self, spec: AdapterSpec) -> ModelInfo:
        """Serve an adapter as a model of its own name on its base model (AdapterRefused, AdapterExists)."""
        ...

    async def unload_adapter(self, name: str) -> bool:
        """Stop serving adapter ``name`` (running requests finish on it); whether it was served."""
        ...

    def tokenizer(self, model: str) -> PromptTokenizer:
        """Raises UnknownModel, EngineNotReady (loading) or ModelUnavailable (failed)."""
        ...

    def submit(self, plan: Plan) -> AsyncIterator[EngineEvent]:
        """Queue ``plan``; the iterator yields its events and cancels it when closed early."""
        ...

    def build_prefix(self, job: PrefixBuild) -> AsyncIterator[BuildEvent]:
        """Queue a prefix-cache build; it is prefilled in chunks between other requests' steps."""
        ...

    async def verify_prefix(self, tenant: str, name: str) -> dict[str, object]:
        """Integrity of a stored cache: digests of its resident arrays and its file."""
        ...

    async def warm_prefix(self, tenant: str, name: str) -> PrefixWarmed:
        """Load a stored cache's KV into resident memory (as a request naming it would)."""
        ...

    def record_miss(self, model: str, tenant: str) -> None:
        """A request named a cache of ``tenant`` and was planned without it (counted with the cache's use)."""
        ...

    def forget_response(self, tenant: str, response_id: str) -> None:
        """Drop a stored response's KV, if the engine holds it (the response was deleted or expired)."""
        ...

    def response_kv_bytes(self) -> Mapping[str, int]:
        """Bytes of stored responses' KV each tenant holds in the engine's memory (as last published)."""
        ...

    @property
    def prefix_store(self) -> PrefixCacheStore | None:
        """The named caches' index: manifests and statuses to plan with (the KV arrays stay the engine's)."""
        ...

    async def refresh(self) -> None:
        """Bring ``health()`` and ``stats`` up to date (a round trip to an engine in another process)."""
        ...

    def health(self) -> dict[str, object]: ...

    @property
    def stats(self) -> EngineStats:
        """The counters ``health()`` totals and ``/metrics`` details (requests, decode steps, batches)."""
        ...

    def start(self) -> None: ...

    def stop(self, *, wait: bool = True) -> None:
        """Stop (idempotent); requests still running fail. ``wait=False`` only asks, for an event loop."""
        ...
