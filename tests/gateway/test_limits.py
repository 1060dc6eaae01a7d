"""Every size a request chooses either fits the server's limits or is a 400 naming the field and the limit
(gateway.limits), checked through planning with a character tokenizer, and through the schemas' decoders.

The sizes an abusive client sends that are still valid (16 stop strings, a 300-entry logit_bias,
top_logprobs 20, a deeply nested schema, a 100-message conversation) must stay accepted.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import msgspec
import pytest

from adapters.base import OutputConstraint, ToolCalling
from gateway.body import invalid_body
from gateway.config import ModelConfig
from gateway.errors import InvalidRequest
from gateway.limits import (
    MAX_CHARS_PER_TOKEN,
    MAX_LOGIT_BIAS,
    MAX_MESSAGES,
    MAX_N,
    MAX_SCHEMA_CHARS,
    MAX_SCHEMA_DEPTH,
    MAX_SCHEMA_PROPERTIES,
    MAX_STOP,
    MAX_STOP_CHARS,
    MAX_TOOLS,
    SEED_MAX,
    SEED_MIN,
    schema_size,
)
from gateway.planning import PlannedRequest, plan_chat, plan_completion
from gateway.schemas.admin import CreatePrefixCache
from gateway.schemas.openai import ChatCompletionRequest, ChatMessage, CompletionRequest, ToolDef

CONTEXT = 4096
MODEL = ModelConfig(name="m", path="m")
USER = {"role": "user", "content": "hi"}


class Tokenizer:
    """One token per character; records what it was asked to tokenise and compile."""

    vocab_size = 0x110000
    tool_call_format = "json_tools"

    def __init__(self) -> None:
        self.encoded: list[int] = []  # lengths of the texts encoded
        self.compiled: list[OutputConstraint] = []

    def encode(self, text: str) -> list[int]:
        self.encoded.append(len(text))
        return [ord(c) for c in text]

    def encode_after(self, prefix_text: str, prefix_tokens: Sequence[int], text: str) -> list[int]:
        return self.encode(text)

    def decode(self, tokens: Sequence[int]) -> str:
        return "".join(chr(t) for t in tokens)

    def render_chat(
        self, messages: Sequence[Mapping[str, object]], *, add_generation_prompt: bool, tools: object = None
    ) -> str:
        return "".join(f"<{m['role']}>{m['content']}" for m in messages) + ("<assistant>" * add_generation_prompt)

    def check_constraint(self, constraint: OutputConstraint) -> None:
        self.compiled.append(constraint)

    def tool_call_constraint(self, tools: ToolCalling) -> OutputConstraint:
        return OutputConstraint("lark", "start: %json {}")


def chat(tokenizer: Tokenizer | None = None, **fields: Any) -> PlannedRequest:
    # Lists past the limits are put in after msgspec's checks: planning must hold the limits itself.
    messages = [msgspec.convert(m, ChatMessage) for m in fields.pop("messages", [USER])]
    tools = fields.pop("tools", None)
    req = msgspec.convert({"model": "m", "max_tokens": 4, "messages": [], **fields}, ChatCompletionRequest)
    req = msgspec.structs.replace(
        req, messages=messages, tools=None if tools is None else [msgspec.convert(t, ToolDef) for t in tools]
    )
    return plan_chat(req, tokenizer or Tokenizer(), MODEL, CONTEXT, "default")  # type: ignore[arg-type]


def complete(tokenizer: Tokenizer | None = None, **fields: Any) -> PlannedRequest:
    # Built without msgspec's checks, as the seed routes build theirs: planning must hold the limits itself.
    req = CompletionRequest(**{"model": "m", "prompt": "hi", "max_tokens": 4, **fields})
    return plan_completion(req, tokenizer or Tokenizer(), MODEL, CONTEXT, "default")  # type: ignore[arg-type]


def refused(call: Any, *args: Any, **fields: Any) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as err:
        call(*args, **fields)
    return err.value


def nested(levels: int) -> dict[str, Any]:
    """An object schema ``levels`` objects deep: JSON depth 2 * levels + 1."""
    schema: dict[str, Any] = {"type": "string"}
    for _ in range(levels):
        schema = {"type": "object", "properties": {"a": schema}, "required": ["a"]}
    return schema


def json_schema(schema: dict[str, Any]) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}


def ref_chain(n: int, form: str) -> dict[str, Any]:
    """A schema whose definitions reference each other in a chain ``n`` long, in each form llguidance resolves
    (each of which, 2,000 long, crashed the server's process before the depth limit)."""
    leaf = {"type": "string"}
    if form == "pointer":
        defs = {f"d{i}": {"properties": {"x": {"$ref": f"#/$defs/d{i + 1}"}}} for i in range(n)}
        return {"$defs": {**defs, f"d{n}": leaf}, "$ref": "#/$defs/d0"}
    if form == "percent-encoded":
        defs = {f"d{i}": {"allOf": [{"$ref": f"#/%24defs/d{i + 1}"}]} for i in range(n)}
        return {"$defs": {**defs, f"d{n}": leaf}, "$ref": "#/%24defs/d0"}
    if form == "anchor":
        defs = {f"d{i}": {"$anchor": f"a{i}", "items": {"$ref": f"#a{i + 1}"}} for i in range(n)}
        return {"$defs": {**defs, f"d{n}": {"$anchor": f"a{n}", **leaf}}, "$ref": "#a0"}
    if form == "id":
        defs = {f"d{i}": {"$id": f"urn:x:d{i}", "items": {"$ref": f"urn:x:d{i + 1}"}} for i in range(n)}
        return {"$defs": {**defs, f"d{n}": {"$id": f"urn:x:d{n}", **leaf}}, "$ref": "urn:x:d0"}
    if form == "relative id":
        defs = {f"d{i}": {"$id": f"d{i}.json", "items": {"$ref": f"d{i + 1}.json"}} for i in range(n)}
        return {"$id": "https://x.test/root.json", "$defs": {**defs, f"d{n}": {"$id": f"d{n}.json", **leaf}}}
    if form == "cycle":
        defs = {f"d{i}": {"properties": {"x": {"$ref": f"#/$defs/d{(i + 1) % n}"}}} for i in range(n)}
        return {"$defs": defs, "$ref": "#/$defs/d0"}
    if form == "named like a keyword":  # a property named "enum" or "const" holds a schema, not data
        defs = {f"d{i}": {"properties": {"enum": {"$ref": f"#/$defs/d{i + 1}"}}} for i in range(n)}
        return {"$defs": {**defs, f"d{n}": leaf}, "$ref": "#/$defs/d0"}
    raise AssertionError(form)


# ---- what an abusive client sends that is still valid -------------------------------------------------


def test_sizes_at_the_limits_are_accepted() -> None:
    tok = Tokenizer()
    planned = chat(
        tok,
        messages=[{"role": "user" if i % 2 == 0 else "assistant", "content": f"m{i}"} for i in range(100)],
        stop=[f"stop-{i}" + "x" * (MAX_STOP_CHARS - 7) for i in range(MAX_STOP)],
        logit_bias={str(i): -1.0 for i in range(MAX_LOGIT_BIAS)},
        logprobs=True,
        top_logprobs=20,
        n=MAX_N,
        seed=SEED_MIN,
        tools=[{"type": "function", "function": {"name": f"f{i}", "parameters": nested(2)}} for i in range(MAX_TOOLS)],
        response_format=json_schema(nested((MAX_SCHEMA_DEPTH - 1) // 2)),
    )
    (plan,) = planned.plans
    assert len(plan.sampling.stop) == MAX_STOP and len(plan.sampling.logit_bias) == MAX_LOGIT_BIAS
    assert plan.sampling.n == MAX_N and plan.sampling.top_logprobs == 20
    assert tok.compiled and json.loads(tok.compiled[-1].source) == nested((MAX_SCHEMA_DEPTH - 1) // 2)
    assert schema_size(nested((MAX_SCHEMA_DEPTH - 1) // 2)).depth == MAX_SCHEMA_DEPTH - 1


def test_a_batch_of_prompts_up_to_n_completions_is_accepted() -> None:
    assert len(complete(prompt=["a"] * MAX_N).plans) == MAX_N
    assert len(complete(prompt=[[5, 6]] * (MAX_N // 4), n=4).plans) == MAX_N // 4


@pytest.mark.parametrize(("seed", "key"), [(-1, 2**64 - 1), (SEED_MIN, 2**63), (0, 0), (SEED_MAX, SEED_MAX)])
def test_every_64_bit_seed_is_a_key_the_engine_takes(seed: int, key: int) -> None:
    (plan,) = complete(seed=seed, temperature=1.0).plans
    assert plan.sampling.seed == key


# ---- past each limit: a 400 naming the field and the limit -------------------------------------------


@pytest.mark.parametrize(
    ("fields", "param", "words"),
    [
        ({"stop": ["x"] * (MAX_STOP + 1)}, "stop", f"at most {MAX_STOP}"),
        ({"stop": "x" * (MAX_STOP_CHARS + 1)}, "stop", f"at most {MAX_STOP_CHARS}"),
        ({"stop": ["ok", "x" * (MAX_STOP_CHARS + 1)]}, "stop[1]", f"at most {MAX_STOP_CHARS}"),
        ({"logit_bias": {str(i): 1.0 for i in range(MAX_LOGIT_BIAS + 1)}}, "logit_bias", f"at most {MAX_LOGIT_BIAS}"),
        ({"seed": SEED_MAX + 1}, "seed", str(SEED_MAX)),
        ({"seed": SEED_MIN - 1}, "seed", str(SEED_MIN)),
        ({"n": MAX_N + 1}, "n", str(MAX_N)),
        ({"prompt": ["a"] * (MAX_N + 1)}, "prompt", f"at most {MAX_N}"),
        ({"prompt": [[1]] * (MAX_N + 1)}, "prompt", f"at most {MAX_N}"),
        ({"prompt": ["a"] * 3, "n": MAX_N // 2}, "n", f"at most {MAX_N}"),
    ],
)
def test_completion_sizes_past_the_limits_are_400(fields: dict[str, Any], param: str, words: str) -> None:
    err = refused(complete, **fields)
    assert err.param == param and words in err.message and err.status_code == 400


def test_a_prompt_far_too_long_is_refused_before_it_is_tokenised() -> None:
    tok = Tokenizer()
    long = "x" * (CONTEXT * MAX_CHARS_PER_TOKEN + 1)
    err = refused(complete, tok, prompt=["fine", long, "never read"])
    assert err.code == "context_length_exceeded" and err.param == "prompt[1]"
    assert f"{CONTEXT} tokens" in err.message and str(len(long)) in err.message
    assert tok.encoded == [4]  # the first prompt only: the long one and those after it were never tokenised


def test_a_batch_stops_at_its_first_prompt_that_cannot_fit() -> None:
    tok = Tokenizer()
    err = refused(complete, tok, prompt=["x" * (CONTEXT - 4), "y" * CONTEXT, "z" * 10], max_tokens=4)
    assert err.code == "context_length_exceeded" and err.param == "max_tokens" and "prompt" in err.message
    assert tok.encoded == [CONTEXT - 4, CONTEXT]
    err = refused(complete, prompt=[[1] * 10, [2] * (CONTEXT + 1)], max_tokens=None)
    assert err.code == "context_length_exceeded" and err.param == "prompt[1]"


def test_a_rendered_conversation_far_too_long_is_refused_before_it_is_tokenised() -> None:
    tok = Tokenizer()
    err = refused(chat, tok, messages=[{"role": "user", "content": "x" * (CONTEXT * MAX_CHARS_PER_TOKEN)}])
    assert err.code == "context_length_exceeded" and err.param == "messages"
    assert tok.encoded == []


def test_too_many_messages_or_tools_are_400() -> None:
    err = refused(chat, messages=[USER] * (MAX_MESSAGES + 1))
    assert err.param == "messages" and f"at most {MAX_MESSAGES}" in err.message
    tools = [{"type": "function", "function": {"name": f"f{i}"}} for i in range(MAX_TOOLS + 1)]
    err = refused(chat, tools=tools)
    assert err.param == "tools" and f"at most {MAX_TOOLS}" in err.message


@pytest.mark.parametrize(
    "form", ["pointer", "percent-encoded", "anchor", "id", "relative id", "cycle", "named like a keyword"]
)
def test_a_chain_of_references_is_as_deep_as_its_length(form: str) -> None:
    assert 20 <= schema_size(ref_chain(10, form)).depth <= MAX_SCHEMA_DEPTH
    assert schema_size(ref_chain(2000, form)).depth == MAX_SCHEMA_DEPTH + 1
    tok = Tokenizer()
    err = refused(chat, tok, response_format=json_schema(ref_chain(2000, form)))
    assert err.param == "response_format.json_schema.schema" and f"at most {MAX_SCHEMA_DEPTH}" in err.message
    assert tok.compiled == []  # never handed to the grammar engine


def test_recursive_schemas_are_shallow() -> None:
    tree = {"$defs": {"node": {"properties": {"kids": {"items": {"$ref": "#/$defs/node"}}}}}, "$ref": "#/$defs/node"}
    assert schema_size(tree).depth < 10
    # An expression grammar: 50 node types, each of whose fields is any of them.
    types = {f"T{i}": {"properties": {"l": {"$ref": "#/$defs/E"}, "r": {"$ref": "#/$defs/E"}}} for i in range(50)}
    union = {"anyOf": [{"$ref": f"#/$defs/T{i}"} for i in range(50)]}
    assert schema_size({"$defs": {"E": union, **types}, "$ref": "#/$defs/E"}).depth < 12


@pytest.mark.parametrize(
    ("schema", "words"),
    [
        (nested(MAX_SCHEMA_DEPTH // 2), f"at most {MAX_SCHEMA_DEPTH}"),
        (nested(450), f"at most {MAX_SCHEMA_DEPTH}"),  # past what Python's json.dumps can nest
        (
            {"type": "object", "properties": {f"p{i}": {} for i in range(MAX_SCHEMA_PROPERTIES + 1)}},
            f"at most {MAX_SCHEMA_PROPERTIES}",
        ),
        ({"enum": ["x" * 1000] * (MAX_SCHEMA_CHARS // 1000)}, f"at most {MAX_SCHEMA_CHARS}"),
    ],
)
def test_schemas_past_the_limits_are_400(schema: dict[str, Any], words: str) -> None:
    tok = Tokenizer()
    err = refused(chat, tok, response_format=json_schema(schema))
    assert err.param == "response_format.json_schema.schema" and words in err.message
    tool = {"type": "function", "function": {"name": "f", "parameters": schema}}
    err = refused(chat, tok, tools=[{"type": "function", "function": {"name": "g"}}, tool], tool_choice="required")
    assert err.param == "tools[1].function.parameters" and words in err.message
    assert tok.compiled == []


def test_the_tools_properties_count_together() -> None:
    half = {"type": "object", "properties": {f"p{i}": {} for i in range(MAX_SCHEMA_PROPERTIES // 2 + 1)}}
    tools = [{"type": "function", "function": {"name": f"f{i}", "parameters": half}} for i in range(2)]
    err = refused(chat, tools=tools)
    assert err.param == "tools" and f"at most {MAX_SCHEMA_PROPERTIES}" in err.message


def test_deeply_nested_tool_call_arguments_are_400() -> None:
    call = {"id": "c", "type": "function", "function": {"name": "f", "arguments": "[" * 100_000 + "]" * 100_000}}
    messages = [USER, {"role": "assistant", "content": None, "tool_calls": [call]}]
    err = refused(chat, messages=[*messages, {"role": "tool", "tool_call_id": "c", "content": "ok"}])
    assert err.param == "messages[1].tool_calls[0].function.arguments"


# ---- the same limits as the body is decoded (a 400 before planning), and in the OpenAPI document ----------


def decode_error(kind: type, body: dict[str, Any]) -> InvalidRequest:
    with pytest.raises(msgspec.ValidationError) as err:
        msgspec.json.Decoder(kind).decode(json.dumps(body))
    return invalid_body(err.value)


@pytest.mark.parametrize(
    ("body", "param", "words"),
    [
        ({"stop": ["x"] * (MAX_STOP + 1)}, "stop", f"length <= {MAX_STOP}"),
        ({"stop": ["x", "y" * (MAX_STOP_CHARS + 1)]}, "stop[1]", f"length <= {MAX_STOP_CHARS}"),
        ({"stop": "y" * (MAX_STOP_CHARS + 1)}, "stop", f"length <= {MAX_STOP_CHARS}"),
        ({"logit_bias": {str(i): 1 for i in range(MAX_LOGIT_BIAS + 1)}}, "logit_bias", f"length <= {MAX_LOGIT_BIAS}"),
        ({"messages": [USER] * (MAX_MESSAGES + 1)}, "messages", f"length <= {MAX_MESSAGES}"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}] * (MAX_TOOLS + 1)}, "tools", "length <= 128"),
        ({"top_logprobs": 21, "logprobs": True}, "top_logprobs", "<= 20"),
    ],
)
def test_decoding_refuses_sizes_past_the_limits(body: dict[str, Any], param: str, words: str) -> None:
    err = decode_error(ChatCompletionRequest, {"model": "m", "messages": [USER], **body})
    assert err.param == param and words in err.message


def test_prefix_cache_builds_take_as_many_messages_as_chat() -> None:
    err = decode_error(CreatePrefixCache, {"name": "c", "model": "m", "messages": [USER] * (MAX_MESSAGES + 1)})
    assert err.param == "messages" and f"length <= {MAX_MESSAGES}" in err.message
