"""OpenAI wire shapes (requests and responses) as msgspec Structs.

Request Structs accept unknown fields: SDKs and frameworks send extras (``user``, ``metadata``,
``prompt_cache_key``, ``parallel_tool_calls`` ...). Response fields that OpenAI sends as ``null`` are
``None`` here, not omitted.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec

from gateway.limits import (
    MAX_COMPLETION_LOGPROBS,
    MAX_LOGIT_BIAS,
    MAX_MESSAGES,
    MAX_N,
    MAX_STOP,
    MAX_STOP_CHARS,
    MAX_TOOLS,
    MAX_TOP_LOGPROBS,
    SEED_MAX,
    SEED_MIN,
)
from prefix_caches.names import NAME_PATTERN

__all__ = [
    "CACHE_NAME_PATTERN",
    "CACHE_NAME_RULE",
    "CacheName",
    "ChatChoice",
    "ChatCompletion",
    "ChatCompletionChunk",
    "ChatCompletionRequest",
    "ChatLogprobs",
    "ChatMessage",
    "ChatMessageOut",
    "ChunkChoice",
    "CompletionChoice",
    "CompletionLogprobs",
    "CompletionRequest",
    "CompletionResponse",
    "ContentPart",
    "Delta",
    "DeltaFunctionCall",
    "DeltaToolCall",
    "FunctionCall",
    "FunctionCallIn",
    "FunctionDef",
    "FunctionName",
    "JSONSchemaFormat",
    "NamedToolChoice",
    "ResponseFormat",
    "ResponseFormatJSONObject",
    "ResponseFormatJSONSchema",
    "ResponseFormatText",
    "ToolCall",
    "ToolCallIn",
    "ToolChoice",
    "ToolDef",
    "LogprobContent",
    "MaxTokens",
    "Model",
    "ModelList",
    "PROMPT_SCHEMA",
    "PrefixCacheRef",
    "PromptTokensDetails",
    "StopList",
    "StopString",
    "StreamOptions",
    "Temperature",
    "TokenId",
    "TopLogprobEntry",
    "Usage",
]


class _Request(msgspec.Struct, kw_only=True):
    pass


# The rules a request's fields must follow, stated once: msgspec checks them as it decodes a body (a 400
# naming the field and the rule) and the OpenAPI document shows them (gateway.openapi).
# The store's NAME_PATTERN, and not ending in the store's own suffixes (prefix_caches.names.validate_name).
CACHE_NAME_PATTERN = r"^(?!.*\.(?:tmp|json)$)" + NAME_PATTERN.removeprefix("^")
CACHE_NAME_RULE = (
    "1-128 letters, digits, '.', '_' or '-', starting with a letter or digit, not ending in '.tmp' or '.json'"
)
CacheName = Annotated[str, msgspec.Meta(pattern=CACHE_NAME_PATTERN, description=CACHE_NAME_RULE)]
TokenId = Annotated[int, msgspec.Meta(ge=0, description="A token id of the model's vocabulary")]
MaxTokens = Annotated[
    int, msgspec.Meta(ge=1, description="At most this many tokens; prompt + this must fit the context")
]
Temperature = Annotated[float, msgspec.Meta(ge=0, le=2, description="0 is greedy")]
Probability = Annotated[float, msgspec.Meta(ge=0, le=1)]
Penalty = Annotated[float, msgspec.Meta(ge=-2, le=2)]
StopString = Annotated[str, msgspec.Meta(max_length=MAX_STOP_CHARS)]
StopList = Annotated[list[StopString], msgspec.Meta(max_length=MAX_STOP)]


class StreamOptions(_Request, kw_only=True):
    include_usage: bool = False


class ContentPart(_Request, kw_only=True):
    type: str
    text: str | None = None


Role = Literal["system", "developer", "user", "assistant", "tool", "function"]


class FunctionCallIn(_Request, kw_only=True):
    name: str
    # OpenAI sends a JSON string; some clients send the object itself.
    arguments: str | dict[str, Any] = "{}"


class ToolCallIn(_Request, kw_only=True):
    """A tool call of an earlier assistant turn, resent by the client."""

    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCallIn


class ChatMessage(_Request, kw_only=True):
    role: Role
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = None


class FunctionDef(_Request, kw_only=True):
    name: str
    description: str | None = None
    # A JSON schema of the arguments (absent: the function takes none).
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolDef(_Request, kw_only=True):
    type: Literal["function"]
    function: FunctionDef


class FunctionName(_Request, kw_only=True):
    name: str


class NamedToolChoice(_Request, kw_only=True):
    type: Literal["function"]
    function: FunctionName


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class ResponseFormatText(_Request, kw_only=True, tag_field="type", tag="text"):
    pass


class ResponseFormatJSONObject(_Request, kw_only=True, tag_field="type", tag="json_object"):
    pass


class JSONSchemaFormat(_Request, kw_only=True):
    name: str
    description: str | None = None
    schema_: dict[str, Any] | None = msgspec.field(default=None, name="schema")
    strict: bool | None = None


class ResponseFormatJSONSchema(_Request, kw_only=True, tag_field="type", tag="json_schema"):
    json_schema: JSONSchemaFormat


ResponseFormat = ResponseFormatText | ResponseFormatJSONObject | ResponseFormatJSONSchema


class PrefixCacheRef(_Request, kw_only=True):
    """A named prefix cache. The request may resend the cache's messages (or prompt) or send only what
    follows them. ``on_mismatch``: what to do when the rendered request does not start with the cache
    (a chat template that renders the cached messages differently once more follow): ``error`` (400
    ``prefix_cache_mismatch``) or ``recompute`` (the whole prompt, no reuse)."""

    name: CacheName
    on_mismatch: Literal["error", "recompute"] = "error"


class _Sampling(_Request, kw_only=True):
    model: str
    # Ours: a named prefix cache to start from (SDKs send it through extra_body).
    prefix_cache: CacheName | PrefixCacheRef | None = None
    max_tokens: MaxTokens | None = None
    temperature: Temperature | None = None
    top_p: Probability | None = None
    # Not OpenAI's; sent by vLLM-, llama.cpp- and mlx_lm.server-style clients.
    top_k: Annotated[int, msgspec.Meta(ge=-1, description="-1 or 0 is off")] | None = None
    min_p: Probability | None = None
    repetition_penalty: Annotated[float, msgspec.Meta(gt=0, le=10, description="1 is off")] | None = None
    n: Annotated[int, msgspec.Meta(ge=1, le=MAX_N)] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: StopString | StopList | None = None
    # Planning checks both bounds: msgspec takes none past int64 (SEED_MAX is 2**64 - 1), and a bound in the
    # OpenAPI document past 2**53 reaches JavaScript clients (Swagger UI) rounded.
    seed: Annotated[int, msgspec.Meta(description=f"From {SEED_MIN} to {SEED_MAX}")] | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    logit_bias: (
        Annotated[
            dict[
                Annotated[str, msgspec.Meta(pattern=r"^[0-9]{1,9}$", description="A token id of the vocabulary")],
                Annotated[float, msgspec.Meta(ge=-100, le=100)],
            ],
            msgspec.Meta(max_length=MAX_LOGIT_BIAS),
        ]
        | None
    ) = None
    user: str | None = None


class ChatCompletionRequest(_Sampling, kw_only=True):
    # At least one message, unless `prefix_cache` names a cache built from messages (they come first).
    messages: Annotated[list[ChatMessage], msgspec.Meta(max_length=MAX_MESSAGES)]
    max_completion_tokens: MaxTokens | None = None
    logprobs: bool | None = None
    top_logprobs: (
        Annotated[int, msgspec.Meta(ge=0, le=MAX_TOP_LOGPROBS, description="Needs `logprobs: true`")] | None
    ) = None
    tools: Annotated[list[ToolDef], msgspec.Meta(max_length=MAX_TOOLS)] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None
    # OpenAI features these models lack: declared so that a request using one gets a 400 that names it,
    # not an answer that silently differs from what OpenAI would give (see planning.UNSUPPORTED_CHAT).
    modalities: list[str] | None = None
    audio: dict[str, Any] | None = None
    web_search_options: dict[str, Any] | None = None
    reasoning_effort: str | None = None
    verbosity: str | None = None
    functions: list[dict[str, Any]] | None = None
    function_call: str | dict[str, Any] | None = None


# The four forms of a completion prompt, as the OpenAPI document states them.
_TEXT: dict[str, Any] = {"type": "string"}
_TOKEN_IDS: dict[str, Any] = {"type": "array", "items": {"type": "integer", "minimum": 0}}
PROMPT_SCHEMA: dict[str, Any] = {
    "anyOf": [
        _TEXT,
        {"type": "array", "minItems": 1, "maxItems": MAX_N, "items": _TEXT},
        {**_TOKEN_IDS, "minItems": 1},
        {"type": "array", "minItems": 1, "maxItems": MAX_N, "items": _TOKEN_IDS},
    ],
    "description": "A string, a list of strings, a list of token ids, or a list of token-id lists; an empty "
    "prompt is a 400 unless `prefix_cache` names a cache (the prompt follows it). A list of prompts makes "
    f"each prompt's `n` completions: at most {MAX_N} in all.",
}


class CompletionRequest(_Sampling, kw_only=True):
    # A string, a list of strings, a list of token ids, or a list of token-id lists. msgspec cannot decode a
    # union of list types, so the Struct takes any mix and planning refuses mixes (400); the OpenAPI document
    # states the four forms (PROMPT_SCHEMA).
    # Empty text or an empty token list is a 400 unless `prefix_cache` names a cache (the prompt follows it).
    prompt: str | Annotated[list[str | TokenId | list[TokenId]], msgspec.Meta(min_length=1)]
    logprobs: Annotated[int, msgspec.Meta(ge=0, le=MAX_COMPLETION_LOGPROBS)] | None = None
    echo: bool | None = False
    # Not supported: only null (or absent) or an empty string.
    suffix: Annotated[str, msgspec.Meta(max_length=0)] | None = None
    # Only best_of equal to n (the default, 1) is supported.
    best_of: Annotated[int, msgspec.Meta(ge=1, le=MAX_N, description="Must equal `n`")] | None = None


# ---- responses ------------------------------------------------------------------------------------


class _Response(msgspec.Struct, kw_only=True):
    pass


class PromptTokensDetails(_Response, kw_only=True):
    cached_tokens: int = 0


class CompletionTokensDetails(_Response, kw_only=True):
    reasoning_tokens: int = 0


class Usage(_Response, kw_only=True):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails
    # Only for a thinking model's chat (OpenAI sends it always; the shape other answers had stays as it was).
    completion_tokens_details: CompletionTokensDetails | msgspec.UnsetType = msgspec.UNSET


class TopLogprobEntry(_Response, kw_only=True):
    token: str
    logprob: float
    bytes: list[int] | None


class LogprobContent(_Response, kw_only=True):
    token: str
    logprob: float
    bytes: list[int] | None
    top_logprobs: list[TopLogprobEntry]


class ChatLogprobs(_Response, kw_only=True):
    content: list[LogprobContent] | None
    refusal: None = None


class FunctionCall(_Response, kw_only=True):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(_Response, kw_only=True):
    id: str
    type: str = "function"
    function: FunctionCall


class ChatMessageOut(_Response, kw_only=True):
    role: str = "assistant"
    content: str | None = None
    # A thinking model's reasoning, as vLLM and DeepSeek's API send it (absent when there was none).
    reasoning_content: str | msgspec.UnsetType = msgspec.UNSET
    refusal: None = None
    tool_calls: list[ToolCall] | msgspec.UnsetType = msgspec.UNSET


class ChatChoice(_Response, kw_only=True):
    index: int
    message: ChatMessageOut
    logprobs: ChatLogprobs | None
    finish_reason: str | None


class ChatCompletion(_Response, kw_only=True):
    id: str
    object: str = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None
    service_tier: None = None


class DeltaFunctionCall(msgspec.Struct, kw_only=True, omit_defaults=True):
    name: str | msgspec.UnsetType = msgspec.UNSET
    arguments: str | msgspec.UnsetType = msgspec.UNSET


class DeltaToolCall(msgspec.Struct, kw_only=True, omit_defaults=True):
    """A streamed fragment of a tool call: the first carries id, type and name; later ones only
    ``index`` and more ``arguments`` (clients join fragments by ``index``)."""

    index: int
    id: str | msgspec.UnsetType = msgspec.UNSET
    type: str | msgspec.UnsetType = msgspec.UNSET
    function: DeltaFunctionCall


class Delta(msgspec.Struct, kw_only=True, omit_defaults=True):
    role: str | msgspec.UnsetType = msgspec.UNSET
    content: str | msgspec.UnsetType = msgspec.UNSET
    reasoning_content: str | msgspec.UnsetType = msgspec.UNSET
    tool_calls: list[DeltaToolCall] | msgspec.UnsetType = msgspec.UNSET


class ChunkChoice(_Response, kw_only=True):
    index: int
    delta: Delta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(_Response, kw_only=True):
    id: str
    object: str = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    system_fingerprint: str | None = None
    usage: Usage | None = None


class CompletionLogprobs(_Response, kw_only=True):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]] | None
    text_offset: list[int]


class CompletionChoice(_Response, kw_only=True):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: str | None


class CompletionResponse(_Response, kw_only=True):
    """Both the whole response and a streamed chunk (OpenAI uses one shape, ``text_completion``)."""

    id: str
    object: str = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    system_fingerprint: str | None = None
    usage: Usage | None = None


class Model(_Response, kw_only=True):
    id: str
    object: str = "model"
    created: int
    owned_by: str
    # An adapter: its base model (as vLLM lists LoRA modules).
    parent: str | msgspec.UnsetType = msgspec.UNSET
    root: str | msgspec.UnsetType = msgspec.UNSET


class ModelList(_Response, kw_only=True):
    object: str = "list"
    data: list[Model] = []
