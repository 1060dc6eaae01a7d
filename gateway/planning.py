"""Request planning: a decoded OpenAI request becomes engine plans (tokens, limits, sampling, tenant).

Pure apart from the tokenizer: every error that can be known before the first byte is raised here,
as an :class:`~gateway.errors.APIError` that names the offending parameter.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, cast

import msgspec

from adapters.base import (
    ModelInfo,
    OutputConstraint,
    Plan,
    PrefixUse,
    PromptTokenizer,
    SamplingParams,
    ToolCalling,
    common_prefix,
    kv_bytes_at_most,
)
from gateway.config import ModelConfig
from gateway.errors import ContextLengthExceeded, InvalidRequest
from gateway.limits import (
    MAX_COMPLETION_LOGPROBS,
    MAX_LOGIT_BIAS,
    MAX_MESSAGES,
    MAX_N,
    MAX_SCHEMA_PROPERTIES,
    MAX_STOP,
    MAX_STOP_CHARS,
    MAX_TOOLS,
    MAX_TOP_LOGPROBS,
    SEED_MAX,
    SEED_MIN,
    check_prompt_chars,
    check_schema,
    engine_seed,
)
from gateway.schemas.openai import (
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    NamedToolChoice,
    PrefixCacheRef,
    ResponseFormatJSONSchema,
    ResponseFormatText,
    ToolCallIn,
)
from prefix_caches import Manifest, PrefixCacheStore

__all__ = ["PlannedRequest", "check_kv_budget", "plan_chat", "plan_completion"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PlannedRequest:
    kind: Literal["chat", "completion"]
    id: str
    created: int
    model: str
    plans: tuple[Plan, ...]
    n: int
    stream: bool
    include_usage: bool
    logprobs: bool
    top_logprobs: int
    echo: tuple[str, ...] = ()
    prefix_name: str | None = None
    prefix_miss_reason: str | None = None
    # How the request met its named cache: "resent" (it starts with the cache's messages or tokens, used
    # as sent) or "prepended" (the cache's messages or tokens were put in front of it).
    prefix_form: str | None = None
    # A chat prompt's rendered text (a stored response records what its ids stand for).
    prompt_text: str | None = None


@dataclass(frozen=True)
class _Prefix:
    """A named cache as planning sees it: the tokens a request must start with, or why not used."""

    name: str
    manifest: Manifest | None
    on_mismatch: str
    unusable: str | None = None


def _lookup_prefix(
    ref: str | PrefixCacheRef | None, store: PrefixCacheStore | None, tenant: str, model: str
) -> _Prefix | None:
    if ref is None:
        return None
    name, on_mismatch = (ref, "error") if isinstance(ref, str) else (ref.name, ref.on_mismatch)
    if store is None:
        raise InvalidRequest("Prefix caches are not enabled on this server", param="prefix_cache")
    manifest = store.get(tenant, name)  # PrefixCacheNotFound / InvalidCacheName -> 404 / 400
    if manifest.model != model:
        # Another model's KV, or another adapter's (or the base model's under an adapter): never used.
        message = f"The prefix cache '{name}' was built for model '{manifest.model}', not '{model}'"
        if on_mismatch == "error":
            raise InvalidRequest(message, param="prefix_cache", code="prefix_cache_mismatch")
        # Recomputed: the cache's text still comes first (an adapter of the same base shares its tokenizer).
        return _Prefix(name, manifest, on_mismatch, f"built for model '{manifest.model}': recomputed")
    status = store.status(tenant, name)
    unusable = None if status.state == "ready" else f"cache is {status.state}: {status.reason}"
    return _Prefix(name, manifest, on_mismatch, unusable)


def _prefix_use(
    prefix: _Prefix | None, tokens: list[int], tenant: str, cache_text: str | None = None, text: str | None = None
) -> tuple[PrefixUse | None, str | None]:
    """How much of the cache's KV the request reuses (at most all but its last token), or why none.

    The request's tokens must start with the cache's. One exception: a request whose text starts with the
    cache's text (``cache_text``) may tokenise differently across the boundary (the cache's last word
    merges with what follows); the tokens both share are then reused and the rest computed, so the
    result is the request's own tokenisation, as without a cache. Anything else (the chat template
    renders the cached messages differently once more messages follow, say) is a mismatch: a 400
    ``prefix_cache_mismatch``, or with ``on_mismatch: "recompute"`` the whole prompt computed.
    """
    if prefix is None or prefix.manifest is None:
        return None, None
    cached = prefix.manifest.tokens
    common = common_prefix(tokens, cached)
    aligned = cache_text is not None and text is not None and text.startswith(cache_text)
    if common < len(cached) and not aligned:
        message = (
            f"The request does not start with the prefix cache '{prefix.name}': its tokens differ from the "
            f"cache's at position {common} of {len(cached)}"
        )
        if prefix.on_mismatch == "error":
            raise InvalidRequest(message, param="prefix_cache", code="prefix_cache_mismatch")
        return None, "mismatch: recomputed"
    if prefix.unusable is not None:
        return None, prefix.unusable
    # An exact hit still leaves the last token to compute: it gives the logits of the first new token.
    reuse = min(common, len(tokens) - 1)
    if reuse < 1:
        return None, "no cached token lines up with the prompt"
    return PrefixUse(tenant, prefix.name, reuse), None


def _chat_with_prefix(prefix: _Prefix | None, dicts: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], str | None]:
    """The conversation to render, and its form: clients that resend the whole conversation (system
    message included) already start with the cache's messages; others send only what follows them."""
    if prefix is None or prefix.manifest is None or prefix.manifest.source != "messages":
        return dicts, None if prefix is None else "resent"
    cached = [dict(m) for m in prefix.manifest.messages or ()]
    if dicts[: len(cached)] == cached:
        return dicts, "resent"
    return cached + dicts, "prepended"


# Rendered texts of message caches, by tokenizer and cache version: a hit would otherwise render the cached
# messages (a 4K-token system prompt, say) again on every request.
_CACHE_TEXTS: OrderedDict[tuple[int, str, str, str, float], str] = OrderedDict()
_CACHE_TEXTS_MAX = 256
_CACHE_TEXTS_LOCK = threading.Lock()


def _chat_cache_text(prefix: _Prefix | None, tokenizer: PromptTokenizer) -> str | None:
    """The text a chat request must start with to line up with its cache (None: only its tokens count)."""
    if prefix is None or prefix.manifest is None:
        return None
    manifest = prefix.manifest
    if manifest.source != "messages":
        return manifest.prompt
    key = (id(tokenizer), manifest.tenant, manifest.name, manifest.tokens_sha256, manifest.created_at)
    with _CACHE_TEXTS_LOCK:
        text = _CACHE_TEXTS.get(key)
        if text is not None:
            _CACHE_TEXTS.move_to_end(key)
            return text
    text = tokenizer.render_chat([dict(m) for m in manifest.messages or ()], add_generation_prompt=False)
    with _CACHE_TEXTS_LOCK:
        _CACHE_TEXTS[key] = text
        while len(_CACHE_TEXTS) > _CACHE_TEXTS_MAX:
            _CACHE_TEXTS.popitem(last=False)
    return text


def _prompt_with_prefix(prefix: _Prefix | None, tokens: list[int], text: str | None) -> tuple[list[int], str | None]:
    """A completion prompt with its cache: used as sent when it starts with the cache's tokens or text
    (the client resent the prefix); otherwise it follows the cache's tokens."""
    if prefix is None or prefix.manifest is None:
        return tokens, None
    manifest = prefix.manifest
    cached = list(manifest.tokens)
    if tokens[: len(cached)] == cached or (text is not None and manifest.prompt and text.startswith(manifest.prompt)):
        return tokens, "resent"
    return cached + tokens, "prepended"


def _check_range(value: float | None, low: float, high: float, param: str) -> None:
    if value is not None and not low <= value <= high:
        raise InvalidRequest(f"'{param}' must be between {low:g} and {high:g}, got {value:g}", param=param)


def _sampling_base(
    req: ChatCompletionRequest | CompletionRequest,
    tokenizer: PromptTokenizer,
    *,
    logprobs: bool,
    top_logprobs: int,
    max_tokens: int | None,
    max_tokens_param: str,
) -> tuple[SamplingParams, int | None]:
    _check_range(req.temperature, 0.0, 2.0, "temperature")
    _check_range(req.top_p, 0.0, 1.0, "top_p")
    _check_range(req.presence_penalty, -2.0, 2.0, "presence_penalty")
    _check_range(req.frequency_penalty, -2.0, 2.0, "frequency_penalty")
    _check_range(req.min_p, 0.0, 1.0, "min_p")
    if req.top_k is not None and req.top_k < -1:
        raise InvalidRequest(f"'top_k' must be -1 or 0 (off) or a positive count, got {req.top_k}", param="top_k")
    if req.repetition_penalty is not None and not 0.0 < req.repetition_penalty <= 10.0:
        raise InvalidRequest(
            f"'repetition_penalty' must be above 0 and at most 10 (1 is off), got {req.repetition_penalty:g}",
            param="repetition_penalty",
        )
    n = 1 if req.n is None else req.n
    if not 1 <= n <= MAX_N:
        raise InvalidRequest(f"'n' must be between 1 and {MAX_N}, got {n}", param="n")
    if max_tokens is not None and max_tokens < 1:
        raise InvalidRequest(f"'{max_tokens_param}' must be at least 1, got {max_tokens}", param=max_tokens_param)
    if req.seed is not None and not SEED_MIN <= req.seed <= SEED_MAX:
        raise InvalidRequest(f"'seed' must be between {SEED_MIN} and {SEED_MAX}, got {req.seed}", param="seed")
    params = SamplingParams(
        max_tokens=max_tokens or 1,  # resolved against the prompt length in _with_limits
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        top_k=max(req.top_k or 0, 0),
        min_p=req.min_p or 0.0,
        repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
        stop=_stop_strings(req.stop),
        seed=None if req.seed is None else engine_seed(req.seed),
        n=n,
        presence_penalty=req.presence_penalty or 0.0,
        frequency_penalty=req.frequency_penalty or 0.0,
        logit_bias=_logit_bias(req.logit_bias, tokenizer),
        logprobs=logprobs,
        top_logprobs=top_logprobs,
    )
    return params, max_tokens


def _stop_strings(stop: str | list[str] | None) -> tuple[str, ...]:
    strings: tuple[str, ...] = (stop,) if isinstance(stop, str) else tuple(stop or ())
    if len(strings) > MAX_STOP:
        raise InvalidRequest(f"'stop' takes at most {MAX_STOP} strings, got {len(strings)}", param="stop")
    for i, text in enumerate(strings):
        if len(text) > MAX_STOP_CHARS:
            param = "stop" if isinstance(stop, str) else f"stop[{i}]"
            raise InvalidRequest(
                f"'{param}' is {len(text)} characters long; a stop string has at most {MAX_STOP_CHARS}", param=param
            )
    return strings


def _logit_bias(biases: dict[str, float] | None, tokenizer: PromptTokenizer) -> tuple[tuple[int, float], ...]:
    if biases and len(biases) > MAX_LOGIT_BIAS:
        raise InvalidRequest(
            f"'logit_bias' has {len(biases)} entries; at most {MAX_LOGIT_BIAS} are supported", param="logit_bias"
        )
    out: list[tuple[int, float]] = []
    for key, value in (biases or {}).items():
        try:
            token = int(key)
        except ValueError:
            raise InvalidRequest(f"'logit_bias' keys must be token ids, got {key!r}", param="logit_bias") from None
        if not 0 <= token < tokenizer.vocab_size:
            raise InvalidRequest(
                f"'logit_bias' token id {token} is outside the vocabulary (0..{tokenizer.vocab_size - 1})",
                param="logit_bias",
            )
        _check_range(value, -100.0, 100.0, "logit_bias")
        out.append((token, float(value)))
    return tuple(out)


def _with_limits(
    params: SamplingParams,
    requested: int | None,
    prompt_len: int,
    model: ModelConfig,
    context_length: int,
    param: str,
    prompt_param: str,
) -> SamplingParams:
    if prompt_len == 0:
        raise InvalidRequest("The prompt is empty", param=prompt_param)
    _check_room(prompt_len, requested, context_length, param, prompt_param)
    room = context_length - prompt_len
    if requested is None:
        budget = room if model.default_max_tokens is None else min(room, model.default_max_tokens)
    else:
        budget = requested
    return SamplingParams(**{**params.__dict__, "max_tokens": budget})


def _check_room(prompt_len: int, requested: int | None, context_length: int, param: str, prompt_param: str) -> None:
    """A 400 unless ``prompt_len`` tokens and the completion (``requested``, or at least one token) fit the
    context. Also run on a prompt before a prefix cache lengthens it: one already too long is refused sooner."""
    if requested is None:
        if context_length - prompt_len < 1:
            raise ContextLengthExceeded(
                f"This model's maximum context length is {context_length} tokens. However, your prompt is "
                f"{prompt_len} tokens, leaving no room for a completion.",
                param=prompt_param,
            )
    elif prompt_len + requested > context_length:
        raise ContextLengthExceeded(
            f"This model's maximum context length is {context_length} tokens. However, you requested "
            f"{prompt_len + requested} tokens ({prompt_len} in the prompt, {requested} for the "
            "completion). Please reduce the prompt or the completion length.",
            param=param,
        )


def _message_dict(i: int, message: ChatMessage) -> dict[str, Any]:
    content: str | None
    if isinstance(message.content, list):
        texts = []
        for j, part in enumerate(message.content):
            if part.type not in ("text", "input_text"):
                raise InvalidRequest(
                    f"Content parts of type '{part.type}' are not supported by this model; only text is",
                    param=f"messages[{i}].content[{j}].type",
                )
            texts.append(part.text or "")
        content = "".join(texts)
    else:
        content = message.content
    # Chat templates know system/user/assistant/tool; OpenAI's newer names map onto them.
    role = {"developer": "system", "function": "tool"}.get(message.role, message.role)
    out: dict[str, Any] = {"role": role, "content": content if content is not None else ""}
    if message.name is not None:
        out["name"] = message.name
    if message.tool_calls is not None:
        out["tool_calls"] = [_tool_call_dict(i, j, call) for j, call in enumerate(message.tool_calls)]
    if message.tool_call_id is not None:
        out["tool_call_id"] = message.tool_call_id
    return out


def _tool_call_dict(i: int, j: int, call: ToolCallIn) -> dict[str, Any]:
    """A resent tool call as chat templates take it: OpenAI sends ``arguments`` as JSON text, templates
    iterate over an object (mlx_lm.server converts them the same way)."""
    arguments = call.function.arguments
    if isinstance(arguments, str):
        param = f"messages[{i}].tool_calls[{j}].function.arguments"
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError as exc:
            raise InvalidRequest(f"Tool call arguments must be JSON text: {exc}", param=param) from None
        except RecursionError:
            raise InvalidRequest("The tool call arguments nest too deeply to decode", param=param) from None
    out: dict[str, Any] = {"type": "function", "function": {"name": call.function.name, "arguments": arguments}}
    if call.id is not None:
        out["id"] = call.id
    return out


def message_dicts(messages: Sequence[ChatMessage]) -> list[dict[str, Any]]:
    """Messages as chat templates take them (text parts joined, newer role names mapped)."""
    return [_message_dict(i, m) for i, m in enumerate(messages)]


def render_messages(tokenizer: PromptTokenizer, dicts: Sequence[dict[str, Any]], tools: Any = None) -> str:
    """Messages (as :func:`message_dicts` makes them) rendered for generation by the model's template."""
    if not dicts:
        raise InvalidRequest("'messages' must contain at least one message", param="messages")
    try:
        return tokenizer.render_chat(dicts, add_generation_prompt=True, tools=tools)
    except Exception as exc:  # a template raising (e.g. on role order) is the request's fault
        raise InvalidRequest(f"The model's chat template rejected the messages: {exc}", param="messages") from exc


def _tool_calling(req: ChatCompletionRequest, tokenizer: PromptTokenizer) -> ToolCalling | None:
    """What the request's ``tools`` and ``tool_choice`` ask of the output (None: plain text)."""
    choice = req.tool_choice
    if not req.tools:
        if choice is not None and choice not in ("none", "auto"):
            raise InvalidRequest("'tool_choice' names a tool, but the request has no 'tools'", param="tool_choice")
        return None
    names = [t.function.name for t in req.tools]
    if len(set(names)) != len(names):
        raise InvalidRequest("Each tool must have a distinct function name", param="tools")
    if choice == "none":
        return None
    if isinstance(choice, NamedToolChoice):
        if choice.function.name not in names:
            raise InvalidRequest(
                f"'tool_choice' names the function '{choice.function.name}', which is not among the 'tools'",
                param="tool_choice",
            )
        mode, allowed = "named", (choice.function.name,)
    else:
        mode, allowed = choice or "auto", tuple(names)
    if tokenizer.tool_call_format is None:
        if mode != "auto":
            raise InvalidRequest(
                "This model's chat template has no tool-call format, so a tool call cannot be required",
                param="tool_choice",
            )
        logger.warning("tools sent to a model whose chat template has no tool-call format: none will be parsed")
        return None
    tools = tuple(msgspec.to_builtins(t) for t in req.tools)
    return ToolCalling(tools, mode, allowed, req.parallel_tool_calls is not False)


def _output_constraint(
    req: ChatCompletionRequest, tokenizer: PromptTokenizer, tools: ToolCalling | None
) -> OutputConstraint | None:
    """The grammar the output must follow: a required or named tool call, or ``response_format``'s JSON.

    Compiled (and cached) here, so that a schema the grammar engine rejects is the request's 400, never an
    engine failure.
    """
    if tools is not None and tools.choice != "auto":
        try:
            constraint = tokenizer.tool_call_constraint(tools)
            tokenizer.check_constraint(constraint)
        except ValueError as exc:
            raise InvalidRequest(f"The tools cannot be enforced: {exc}", param="tools") from None
        return constraint
    fmt = req.response_format
    if fmt is None or isinstance(fmt, ResponseFormatText):
        return None
    if isinstance(fmt, ResponseFormatJSONSchema) and fmt.json_schema.schema_ is not None:
        param = "response_format.json_schema.schema"
        source, _ = check_schema(fmt.json_schema.schema_, param)
    else:  # json_object, or a json_schema without a schema: any JSON object
        source, param = '{"type": "object"}', "response_format"
    constraint = OutputConstraint("json_schema", source)
    try:
        tokenizer.check_constraint(constraint)
    except ValueError as exc:
        raise InvalidRequest(f"The response_format schema cannot be used: {exc}", param=param) from None
    return constraint


# Fields that change what OpenAI answers, for features these models lack: a 400, never silently ignored.
UNSUPPORTED_CHAT = {
    "audio": "audio output is not supported",
    "web_search_options": "web search is not supported",
    "reasoning_effort": "this model is not a reasoning model",
    "verbosity": "'verbosity' is not supported by this model",
    "functions": "the legacy 'functions' parameter is not supported: use 'tools'",
    "function_call": "the legacy 'function_call' parameter is not supported: use 'tool_choice'",
}


def _check_tools(req: ChatCompletionRequest) -> None:
    """The tools' count and their parameter schemas (each, and their properties together) within the limits."""
    if not req.tools:
        return
    if len(req.tools) > MAX_TOOLS:
        raise InvalidRequest(f"'tools' has {len(req.tools)} tools; at most {MAX_TOOLS} are supported", param="tools")
    properties = 0
    for i, tool in enumerate(req.tools):
        if tool.function.parameters is not None:
            properties += check_schema(tool.function.parameters, f"tools[{i}].function.parameters")[1].properties
    if properties > MAX_SCHEMA_PROPERTIES:
        raise InvalidRequest(
            f"The tools' parameter schemas have {properties} object properties in all; at most "
            f"{MAX_SCHEMA_PROPERTIES} are supported",
            param="tools",
        )


def _check_unsupported(req: ChatCompletionRequest) -> None:
    for name, why in UNSUPPORTED_CHAT.items():
        if getattr(req, name) is not None:
            raise InvalidRequest(f"'{name}': {why}", param=name)
    if req.modalities is not None and set(req.modalities) - {"text"}:
        raise InvalidRequest("Only the 'text' output modality is supported", param="modalities")


def plan_chat(
    req: ChatCompletionRequest,
    tokenizer: PromptTokenizer,
    model: ModelConfig,
    context_length: int,
    tenant: str,
    store: PrefixCacheStore | None = None,
    request_id: str | None = None,
    *,
    continued: Callable[[str], list[int] | None] | None = None,
    reasoning: bool = False,
) -> PlannedRequest:
    """Plan a chat request.

    ``continued``: the prompt's tokens for its rendered text where a stored response's ids stand for its start
    (``gateway.responses.continuation``), else None and the text is encoded as usual.
    ``reasoning``: split a thinking model's reasoning off its answer (``TokenEvent.reasoning``), for an
    endpoint that shows it apart (chat's ``reasoning_content``). Not with an output constraint: the grammar
    shapes the output from its first token, so all of it is the answer (and its tool calls).
    """
    _check_unsupported(req)
    if len(req.messages) > MAX_MESSAGES:
        raise InvalidRequest(
            f"'messages' has {len(req.messages)} messages; at most {MAX_MESSAGES} are supported", param="messages"
        )
    _check_tools(req)
    top = req.top_logprobs or 0
    if not 0 <= top <= MAX_TOP_LOGPROBS:
        raise InvalidRequest(f"'top_logprobs' must be between 0 and {MAX_TOP_LOGPROBS}", param="top_logprobs")
    if top and not req.logprobs:
        raise InvalidRequest("'top_logprobs' requires 'logprobs' to be true", param="top_logprobs")
    max_param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    params, requested = _sampling_base(
        req,
        tokenizer,
        logprobs=bool(req.logprobs),
        top_logprobs=top,
        max_tokens=max_tokens,
        max_tokens_param=max_param,
    )
    prefix = _lookup_prefix(req.prefix_cache, store, tenant, model.name)
    dicts, form = _chat_with_prefix(prefix, message_dicts(req.messages))
    tools = _tool_calling(req, tokenizer)
    text = render_messages(tokenizer, dicts, [msgspec.to_builtins(t) for t in req.tools] if req.tools else None)
    check_prompt_chars(text, context_length, "messages")
    cache_text = _chat_cache_text(prefix, tokenizer)
    manifest = prefix.manifest if prefix is not None and prefix.unusable is None else None
    continuation = continued(text) if continued is not None else None
    if continuation is not None:
        tokens = continuation
    elif cache_text is not None and manifest is not None and manifest.source == "messages":
        # A ready message cache's tokens are its rendered text's, by this tokenizer (stale ones are rebuilt).
        tokens = tokenizer.encode_after(cache_text, manifest.tokens, text)
    else:
        tokens = tokenizer.encode(text)
    params = _with_limits(params, requested, len(tokens), model, context_length, max_param, "messages")
    # After the context check: a prompt that cannot fit is refused without compiling a grammar.
    params = dataclasses.replace(params, constraint=_output_constraint(req, tokenizer, tools))
    use, miss = _prefix_use(prefix, tokens, tenant, cache_text, text)
    rid = f"chatcmpl-{uuid.uuid4().hex}"
    split = reasoning and params.constraint is None
    plan = Plan(request_id or rid, model.name, tenant, tuple(tokens), params, use, tools, reasoning=split)
    return PlannedRequest(
        "chat",
        rid,
        int(time.time()),
        model.name,
        (plan,),
        params.n,
        bool(req.stream),
        bool(req.stream_options and req.stream_options.include_usage),
        params.logprobs,
        top,
        prefix_name=prefix.name if prefix else None,
        prefix_miss_reason=miss,
        prefix_form=form,
        prompt_text=text,
    )


def _prompts(
    req: CompletionRequest, tokenizer: PromptTokenizer, context_length: int, requested: int | None, n: int
) -> list[tuple[list[int], str, str | None]]:
    """Each prompt's tokens, its text (for ``echo``) and the text as the client sent it (None for token
    ids: a cache's text cannot be matched against them); OpenAI's four prompt forms.

    Each prompt is checked against the context as soon as it is tokenised (a text far too long, before),
    so that a batch is refused at its first prompt that cannot fit.
    """
    p = req.prompt
    if isinstance(p, str):
        return [_text_prompt(p, tokenizer, context_length, requested, "prompt")]
    if not p:
        raise InvalidRequest("'prompt' must not be empty", param="prompt")
    if all(isinstance(x, int) for x in p):
        return [_ids_prompt(p, tokenizer, context_length, requested, "prompt")]  # type: ignore[arg-type]
    if not all(isinstance(x, str) for x in p) and not all(isinstance(x, list) for x in p):
        raise InvalidRequest(
            "'prompt' must be a string, a list of strings, a list of token ids or a list of token-id lists",
            param="prompt",
        )
    if len(p) > MAX_N:
        raise InvalidRequest(f"'prompt' has {len(p)} prompts; at most {MAX_N} are supported", param="prompt")
    if len(p) * n > MAX_N:
        raise InvalidRequest(
            f"'n' is {n} for each of {len(p)} prompts, {len(p) * n} completions; a request makes at most {MAX_N}",
            param="n",
        )
    out = []
    for i, x in enumerate(p):
        param = "prompt" if len(p) == 1 else f"prompt[{i}]"
        if isinstance(x, str):
            out.append(_text_prompt(x, tokenizer, context_length, requested, param))
        else:
            out.append(_ids_prompt(cast("list[int]", x), tokenizer, context_length, requested, param))
    return out


def _text_prompt(
    text: str, tokenizer: PromptTokenizer, context_length: int, requested: int | None, param: str
) -> tuple[list[int], str, str | None]:
    check_prompt_chars(text, context_length, param)
    tokens = tokenizer.encode(text)
    _check_room(len(tokens), requested, context_length, "max_tokens", param)
    return tokens, text, text


def _ids_prompt(
    ids: list[int], tokenizer: PromptTokenizer, context_length: int, requested: int | None, param: str
) -> tuple[list[int], str, str | None]:
    _check_room(len(ids), requested, context_length, "max_tokens", param)  # before reading them
    bad = next((t for t in ids if not 0 <= t < tokenizer.vocab_size), None)
    if bad is not None:
        raise InvalidRequest(f"Token id {bad} is outside the vocabulary (0..{tokenizer.vocab_size - 1})", param=param)
    return list(ids), tokenizer.decode(ids), None


def plan_completion(
    req: CompletionRequest,
    tokenizer: PromptTokenizer,
    model: ModelConfig,
    context_length: int,
    tenant: str,
    store: PrefixCacheStore | None = None,
    request_id: str | None = None,
) -> PlannedRequest:
    if req.suffix:
        raise InvalidRequest("'suffix' is not supported", param="suffix")
    k = req.logprobs
    if k is not None and not 0 <= k <= MAX_COMPLETION_LOGPROBS:
        raise InvalidRequest(f"'logprobs' must be between 0 and {MAX_COMPLETION_LOGPROBS}", param="logprobs")
    if req.echo and k is not None:
        raise InvalidRequest("'echo' together with 'logprobs' is not supported", param="echo")
    if req.best_of is not None and req.best_of != (req.n or 1):
        raise InvalidRequest("'best_of' other than 'n' is not supported", param="best_of")
    params, requested = _sampling_base(
        req,
        tokenizer,
        logprobs=k is not None,
        top_logprobs=k or 0,
        max_tokens=req.max_tokens,
        max_tokens_param="max_tokens",
    )
    rid = f"cmpl-{uuid.uuid4().hex}"
    plans = []
    prompts = _prompts(req, tokenizer, context_length, requested, params.n)
    prefix = _lookup_prefix(req.prefix_cache, store, tenant, model.name)
    miss = form = None
    for i, (tokens, _, sent) in enumerate(prompts):
        param = "prompt" if len(prompts) == 1 else f"prompt[{i}]"
        full, form = _prompt_with_prefix(prefix, tokens, sent)
        limited = _with_limits(params, requested, len(full), model, context_length, "max_tokens", param)
        cache_text = prefix.manifest.prompt if prefix is not None and prefix.manifest is not None else None
        use, miss = _prefix_use(prefix, full, tenant, cache_text, sent if form == "resent" else None)
        plans.append(Plan(request_id or f"{rid}-{i}", model.name, tenant, tuple(full), limited, use))
    return PlannedRequest(
        "completion",
        rid,
        int(time.time()),
        model.name,
        tuple(plans),
        params.n,
        bool(req.stream),
        bool(req.stream_options and req.stream_options.include_usage),
        params.logprobs,
        k or 0,
        echo=tuple(text for _, text, _ in prompts) if req.echo else (),
        prefix_name=prefix.name if prefix else None,
        prefix_miss_reason=miss,
        prefix_form=form,
    )


def check_kv_budget(planned: PlannedRequest, info: ModelInfo) -> None:
    """A request whose running KV could never fit the server's budget (``max_running_kv_bytes``) even alone
    is a 400 naming the budget: it would wait forever. Alone means one choice in a batch's slot (choices
    that do not fit together wait their turn), or every choice at once on the sequential path.

    Raises:
        InvalidRequest: ``max_tokens`` (or the prompt) too large for the budget.
    """
    if not info.kv_bytes_per_token or not info.kv_budget:
        return
    for plan in planned.plans:
        rows = 1 if info.batched else plan.sampling.n
        need = rows * kv_bytes_at_most(len(plan.prompt_tokens), plan.sampling.max_tokens, info.kv_bytes_per_token)
        if need > info.kv_budget:
            together = "" if info.batched else f" for its {rows} choices decoded together"
            raise InvalidRequest(
                f"This request could need {need:,} bytes of KV cache{together} ({len(plan.prompt_tokens)} prompt "
                f"tokens + {plan.sampling.max_tokens} max_tokens at {info.kv_bytes_per_token:,} bytes a token), "
                f"more than the server's max_running_kv_bytes ({info.kv_budget:,}). Reduce max_tokens, the "
                "prompt or n.",
                param="max_tokens",
                code="kv_budget_exceeded",
            )
