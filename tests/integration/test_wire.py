"""Exact wire checks with raw httpx: the SSE stream's framing and every error body."""

from __future__ import annotations

import json
import re
import time

import httpx
import pytest

from tests.servers import Server

CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4, "temperature": 0}


def sse_events(text: str) -> list[str]:
    """The data payloads of an SSE body, after checking its framing."""
    assert text.endswith("\n\n")
    out = []
    for block in text.split("\n\n")[:-1]:
        lines = [line for line in block.split("\n") if not line.startswith(":")]
        if not lines:
            continue
        assert len(lines) == 1 and lines[0].startswith("data: "), block
        out.append(lines[0][len("data: ") :])
    return out


def assert_error(r: httpx.Response, status: int, type_: str, code: str | None, param: str | None = None) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert set(body) == {"error"}
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    assert err["type"] == type_ and err["code"] == code
    if param is not None:
        assert err["param"] == param
    return err


def test_chat_stream_wire(server: Server) -> None:
    body = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
    r = httpx.post(f"{server.v1}/chat/completions", json=body, timeout=30)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert len({c["id"] for c in chunks}) == 1 and len({c["created"] for c in chunks}) == 1
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == "tiny" for c in chunks)
    first, *middle, finish, usage = chunks
    assert first["choices"] == [
        {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
    ]
    for c in middle:
        (choice,) = c["choices"]
        assert set(choice["delta"]) == {"content"} and choice["finish_reason"] is None
    assert finish["choices"] == [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "length"}]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 4
    assert usage["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}
    # The request's id (gateway.request_context), not the completion's: OpenAI's are apart too.
    assert re.fullmatch(r"req_[0-9a-f]{32}", r.headers["x-request-id"]) and r.headers["x-request-id"] != first["id"]


def test_stream_without_usage_has_no_usage_chunk(server: Server) -> None:
    r = httpx.post(
        f"{server.v1}/completions",
        json={"model": "tiny", "prompt": "a", "max_tokens": 3, "temperature": 0, "stream": True},
        timeout=30,
    )
    chunks = [json.loads(e) for e in sse_events(r.text)[:-1]]
    assert all(c["object"] == "text_completion" and c["choices"] for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert all(c.get("usage") is None for c in chunks)


def test_non_streaming_shape(server: Server) -> None:
    r = httpx.post(f"{server.v1}/chat/completions", json=CHAT, timeout=30)
    body = r.json()
    assert set(body) == {"id", "object", "created", "model", "choices", "usage", "system_fingerprint", "service_tier"}
    assert set(body["choices"][0]) == {"index", "message", "logprobs", "finish_reason"}
    assert body["usage"]["prompt_tokens_details"]["cached_tokens"] == 0


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": [{"role": "user", "content": "x"}]}, "model"),
        ({"model": "tiny"}, "messages"),
        ({**CHAT, "max_tokens": "ten"}, "max_tokens"),
        ({**CHAT, "messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
        ({**CHAT, "temperature": 3}, "temperature"),
        ({**CHAT, "top_p": 1.5}, "top_p"),
        ({**CHAT, "n": 0}, "n"),
        ({**CHAT, "max_tokens": 0}, "max_tokens"),
        ({**CHAT, "presence_penalty": -3}, "presence_penalty"),
        ({**CHAT, "logit_bias": {"abc": 1}}, "logit_bias"),
        ({**CHAT, "logit_bias": {"99999999": 1}}, "logit_bias"),
        ({**CHAT, "top_logprobs": 3}, "top_logprobs"),
        ({**CHAT, "messages": []}, "messages"),
        (
            {**CHAT, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
            "messages[0].content[0].type",
        ),
        ({**CHAT, "response_format": {"type": "yaml"}}, "response_format"),
        ({**CHAT, "top_k": -5}, "top_k"),
        ({**CHAT, "reasoning_effort": "high"}, "reasoning_effort"),
        ({**CHAT, "modalities": ["text", "audio"]}, "modalities"),
        ({**CHAT, "functions": [{"name": "f"}]}, "functions"),
    ],
)
def test_invalid_chat_requests_are_400(server: Server, body: dict, param: str) -> None:
    r = httpx.post(f"{server.v1}/chat/completions", json=body, timeout=30)
    err = assert_error(r, 400, "invalid_request_error", None)
    assert err["param"] is not None and err["param"].lstrip("$.").startswith(param.split("[")[0])
    assert r.headers["x-should-retry"] == "false"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "tiny", "prompt": ""}, "prompt"),
        ({"model": "tiny", "prompt": []}, "prompt"),
        ({"model": "tiny", "prompt": [1, "a"]}, "prompt"),
        ({"model": "tiny", "prompt": [1, 99999999]}, "prompt"),
        ({"model": "tiny", "prompt": "x", "logprobs": 9}, "logprobs"),
        ({"model": "tiny", "prompt": "x", "suffix": "y"}, "suffix"),
        ({"model": "tiny", "prompt": "x", "best_of": 3}, "best_of"),
    ],
)
def test_invalid_completion_requests_are_400(server: Server, body: dict, param: str) -> None:
    r = httpx.post(f"{server.v1}/completions", json=body, timeout=30)
    err = assert_error(r, 400, "invalid_request_error", None)
    assert err["param"] == param


def test_invalid_json_is_400(server: Server) -> None:
    r = httpx.post(
        f"{server.v1}/chat/completions",
        content=b'{"model": "tiny", "messages": [',
        timeout=30,
        headers={"content-type": "application/json"},
    )
    assert_error(r, 400, "invalid_request_error", None)


def test_unknown_model_is_404(server: Server) -> None:
    r = httpx.post(f"{server.v1}/chat/completions", json={**CHAT, "model": "gpt-9"}, timeout=30)
    err = assert_error(r, 404, "invalid_request_error", "model_not_found", "model")
    assert "gpt-9" in err["message"]
    r = httpx.get(f"{server.v1}/models/gpt-9", timeout=30)
    assert_error(r, 404, "invalid_request_error", "model_not_found", "model")


def test_unknown_route_is_404(server: Server) -> None:
    assert_error(httpx.get(f"{server.v1}/nothing-here", timeout=30), 404, "invalid_request_error", "not_found")


def test_context_length_exceeded(server: Server) -> None:
    long = "word " * 200  # far more than tiny-short's 64-token context
    r = httpx.post(
        f"{server.v1}/chat/completions",
        timeout=30,
        json={**CHAT, "model": "tiny-short", "messages": [{"role": "user", "content": long}]},
    )
    err = assert_error(r, 400, "invalid_request_error", "context_length_exceeded")
    assert "64" in err["message"]
    r = httpx.post(
        f"{server.v1}/completions", timeout=30, json={"model": "tiny-short", "prompt": "hello", "max_tokens": 100}
    )
    assert_error(r, 400, "invalid_request_error", "context_length_exceeded", "max_tokens")
    # Without max_tokens the completion gets the room that is left.
    r = httpx.post(
        f"{server.v1}/completions",
        timeout=60,
        json={"model": "tiny-short", "prompt": [5] * 60, "temperature": 0, "logit_bias": {"0": -100, "2": -100}},
    )
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4


def test_oversized_body_is_413(server: Server) -> None:
    big = {"model": "tiny", "prompt": "x" * (17 * 1024 * 1024)}
    r = httpx.post(f"{server.v1}/completions", json=big, timeout=60)
    assert_error(r, 413, "invalid_request_error", "request_too_large")


def test_health_and_index(server: Server) -> None:
    h = httpx.get(f"{server.url}/health", timeout=30).json()
    assert h["status"] == "ok" and h["engine_alive"] is True
    assert h["models"]["tiny"]["state"] == "ready" and h["models"]["tiny"]["dtype"] == "float32"
    assert h["memory"]["active_memory"] > 0
    root = httpx.get(server.url, timeout=30).json()
    assert root["name"] == "mlx-gateway" and "POST /v1/chat/completions" in root["endpoints"]
    docs = httpx.get(f"{server.url}/docs", timeout=30)
    assert docs.status_code == 200 and "swagger" in docs.text.lower()
    schema = httpx.get(f"{server.url}/docs/openapi.json", timeout=30).json()
    assert "/v1/chat/completions" in schema["paths"] and "/v1/completions" in schema["paths"]


def test_disconnect_stops_generation(server: Server) -> None:
    before = httpx.get(f"{server.url}/health", timeout=30).json()["requests"]["cancelled"]
    body = {
        "model": "tiny",
        "prompt": "x",
        "max_tokens": 8000,
        "stream": True,
        "temperature": 0,
        "logit_bias": {"0": -100, "2": -100},
    }
    with httpx.stream("POST", f"{server.v1}/completions", json=body, timeout=30) as r:
        for _ in r.iter_lines():
            break  # one line, then hang up
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        h = httpx.get(f"{server.url}/health", timeout=30).json()
        if h["requests"]["cancelled"] > before and h["active_requests"] == 0:
            break
        time.sleep(0.05)
    else:
        pytest.fail(f"generation not cancelled: {h}")


def test_auth(auth_server: Server) -> None:
    url = f"{auth_server.v1}/chat/completions"
    assert_error(httpx.post(url, json=CHAT, timeout=30), 401, "authentication_error", "invalid_api_key")
    bad = httpx.post(url, json=CHAT, timeout=30, headers={"Authorization": "Bearer nope"})
    assert_error(bad, 401, "authentication_error", "invalid_api_key")
    ok = httpx.post(url, json=CHAT, timeout=30, headers={"Authorization": "Bearer key-alpha"})
    assert ok.status_code == 200
    assert_error(httpx.get(f"{auth_server.v1}/models", timeout=30), 401, "authentication_error", "invalid_api_key")
    # Health stays open for orchestrators.
    assert httpx.get(f"{auth_server.url}/health", timeout=30).status_code == 200


@pytest.mark.parametrize(
    ("body", "param", "words"),
    [
        ({**CHAT, "max_tokens": "5"}, "max_tokens", "got `str`"),
        ({**CHAT, "stream": "true"}, "stream", "got `str`"),
        ({**CHAT, "temperature": 2.5}, "temperature", "<= 2.0"),
        ({**CHAT, "stop": ["x"] * 17}, "stop", "length <= 16"),
        ({**CHAT, "prefix_cache": "../etc"}, "prefix_cache", "1-128 letters"),
    ],
)
def test_strict_types_and_rules_name_the_field(server: Server, body: dict, param: str, words: str) -> None:
    r = httpx.post(f"{server.v1}/chat/completions", json=body, timeout=30)
    code = "invalid_prefix_cache_name" if param == "prefix_cache" else None
    err = assert_error(r, 400, "invalid_request_error", code)
    assert err["param"] == param and param in err["message"] and words in err["message"]


def test_body_must_be_an_object(server: Server) -> None:
    r = httpx.post(f"{server.v1}/chat/completions", json=["data"], timeout=30)
    err = assert_error(r, 400, "invalid_request_error", None)
    assert err["message"] == "The request body must be a JSON object, got `array`" and err["param"] is None


def test_admin_refuses_unknown_fields(server: Server) -> None:
    body = {"name": "x", "model": "tiny", "prompt": "hi", "colour": "red"}
    err = assert_error(
        httpx.post(f"{server.url}/admin/prefix-caches", json=body, timeout=30), 400, "invalid_request_error", None
    )
    assert err["param"] == "colour"


def test_405_says_allow_and_options_lists_every_method(server: Server) -> None:
    r = httpx.put(f"{server.v1}/models", timeout=30)
    assert_error(r, 405, "invalid_request_error", "method_not_allowed")
    assert r.headers["allow"] == "GET, OPTIONS"
    r = httpx.options(f"{server.url}/admin/prefix-caches", timeout=30)
    assert r.status_code == 204 and r.headers["allow"] == "GET, OPTIONS, POST"
    r = httpx.options(f"{server.url}/admin/prefix-caches/some-name", timeout=30)
    assert r.status_code == 204 and r.headers["allow"] == "DELETE, GET, OPTIONS"


def test_openapi_documents_openai_errors_and_rules(server: Server) -> None:
    doc = httpx.get(f"{server.url}/docs/openapi.json", timeout=30).json()
    schemas = doc["components"]["schemas"]
    assert set(schemas["ErrorBody"]["required"]) == {"message", "type"}
    error_ref = {"$ref": "#/components/schemas/ErrorResponse"}
    for path, item in doc["paths"].items():
        for method, op in item.items():
            for status, response in op["responses"].items():
                if status.startswith(("4", "5")) and path != "/health":
                    assert response["content"]["application/json"]["schema"] == error_ref, (path, method, status)
    chat = doc["paths"]["/v1/chat/completions"]["post"]["responses"]
    assert {"400", "401", "404", "413", "429", "500", "503"} <= set(chat)
    request = schemas["ChatCompletionRequest"]["properties"]
    assert request["stop"]["anyOf"][1]["maxItems"] == 16
    assert request["temperature"]["anyOf"][0] == {
        "type": "number",
        "minimum": 0,
        "maximum": 2,
        "description": "0 is greedy",
    }
    assert schemas["CreatePrefixCache"]["additionalProperties"] is False
    assert "text/event-stream" in chat["200"]["content"]


def test_openapi_documents_streamed_builds_and_warming(server: Server) -> None:
    doc = httpx.get(f"{server.url}/docs/openapi.json", timeout=30).json()
    ref = "#/components/schemas/{}".format
    build = doc["paths"]["/admin/prefix-caches"]["post"]["responses"]
    assert build["201"]["content"] == {"application/json": {"schema": {"$ref": ref("PrefixCacheOut")}}}
    assert set(build["200"]["content"]) == {"text/event-stream"}
    data = build["200"]["content"]["text/event-stream"]["schema"]["properties"]["data"]["anyOf"]
    assert data[0] == {"const": "[DONE]"}
    payloads = [{"$ref": ref(name)} for name in ("PrefixCacheProgress", "PrefixCacheOut", "ErrorResponse")]
    assert data[1]["contentSchema"]["anyOf"] == payloads
    schemas = doc["components"]["schemas"]
    assert schemas["CreatePrefixCache"]["properties"]["stream"] == {"type": "boolean", "default": False}
    assert set(schemas["PrefixCacheProgress"]["required"]) == {"id", "done", "total"}
    warm = doc["paths"]["/admin/prefix-caches/{name}/warm"]["post"]["responses"]
    assert warm["200"]["content"]["application/json"]["schema"] == {"$ref": ref("WarmedPrefixCache")}
    assert {"400", "401", "403", "404", "409", "500", "503"} <= set(warm)
    assert "prefix_cache_over_memory_budget" in warm["409"]["description"]


# ---- issue 19: every size a request chooses fits the server's limits or is a 400 naming it -------------


def _nested(levels: int) -> dict:
    schema: dict = {"type": "string"}
    for _ in range(levels):
        schema = {"type": "object", "properties": {"a": schema}, "required": ["a"]}
    return schema


def _ref_chain(n: int) -> dict:
    defs = {f"d{i}": {"type": "object", "properties": {"x": {"$ref": f"#/$defs/d{i + 1}"}}} for i in range(n)}
    return {"$defs": {**defs, f"d{n}": {"type": "string"}}, "$ref": "#/$defs/d0"}


def test_sizes_an_abusive_client_may_choose_are_accepted(server: Server) -> None:
    turns = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"turn {i}"} for i in range(99)]
    body = {
        **CHAT,
        "messages": [{"role": "system", "content": "Be brief."}, *turns],
        "stop": [f"never-{i}" for i in range(16)],
        "logit_bias": {str(i): -1 for i in range(300)},
        "logprobs": True,
        "top_logprobs": 20,
    }
    r = httpx.post(f"{server.v1}/chat/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    assert len(r.json()["choices"][0]["logprobs"]["content"][0]["top_logprobs"]) == 20
    schema = {"type": "json_schema", "json_schema": {"name": "deep", "schema": _nested(40)}}
    r = httpx.post(f"{server.v1}/chat/completions", json={**CHAT, "response_format": schema}, timeout=60)
    assert r.status_code == 200, r.text


def test_seeds_are_64_bit_and_negative_ones_work(server: Server) -> None:
    body = {"model": "tiny", "prompt": "x", "max_tokens": 6, "temperature": 1.0, "seed": -1}
    first, second = (httpx.post(f"{server.v1}/completions", json=body, timeout=30) for _ in range(2))
    assert first.status_code == 200, first.text  # was a 500: mlx's random key takes no negative seed
    assert first.json()["choices"][0]["text"] == second.json()["choices"][0]["text"]
    r = httpx.post(f"{server.v1}/completions", json={**body, "seed": 2**64}, timeout=30)
    err = assert_error(r, 400, "invalid_request_error", None, "seed")
    assert str(2**64 - 1) in err["message"]


_TOOL = {"type": "function", "function": {"name": "f"}}
_CALL = {"id": "c", "type": "function", "function": {"name": "f", "arguments": "[" * 50_000 + "]" * 50_000}}


@pytest.mark.parametrize(
    ("path", "body", "param", "words"),
    [
        ("chat/completions", {**CHAT, "logit_bias": {str(i): 1 for i in range(301)}}, "logit_bias", "<= 300"),
        ("chat/completions", {**CHAT, "stop": ["ok", "x" * 1025]}, "stop[1]", "<= 1024"),
        ("chat/completions", {**CHAT, "messages": [CHAT["messages"][0]] * 10_001}, "messages", "<= 10000"),
        (
            "chat/completions",
            {**CHAT, "tools": [{"type": "function", "function": {"name": "f"}}] * 129},
            "tools",
            "128",
        ),
        (
            "chat/completions",
            {**CHAT, "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": _nested(70)}}},
            "response_format.json_schema.schema",
            "at most 124",
        ),
        (
            "chat/completions",
            {**CHAT, "tools": [{"type": "function", "function": {"name": "f", "parameters": _nested(70)}}]},
            "tools[0].function.parameters",
            "at most 124",
        ),
        (
            "chat/completions",
            {**CHAT, "messages": [CHAT["messages"][0], {"role": "assistant", "tool_calls": [_CALL]}]},
            "messages[1].tool_calls[0].function.arguments",
            "too deeply",
        ),
        ("completions", {"model": "tiny", "prompt": ["a"] * 129}, "prompt", "at most 128"),
        ("completions", {"model": "tiny", "prompt": ["a", "b", "c"], "n": 50}, "n", "150 completions"),
    ],
)
def test_sizes_past_the_limits_are_400_naming_them(
    server: Server, path: str, body: dict, param: str, words: str
) -> None:
    r = httpx.post(f"{server.v1}/{path}", json=body, timeout=60)
    err = assert_error(r, 400, "invalid_request_error", None, param)
    assert words in err["message"]


def test_a_chain_of_schema_references_is_400_not_a_crash(server: Server) -> None:
    schema = {"type": "json_schema", "json_schema": {"name": "x", "schema": _ref_chain(2000)}}
    r = httpx.post(f"{server.v1}/chat/completions", json={**CHAT, "response_format": schema}, timeout=60)
    err = assert_error(r, 400, "invalid_request_error", None, "response_format.json_schema.schema")
    assert "$ref" in err["message"]
    # It used to crash the process (llguidance recursed past the thread's stack): the server still answers.
    assert httpx.post(f"{server.v1}/chat/completions", json=CHAT, timeout=30).status_code == 200


def test_a_body_nested_too_deeply_is_400(server: Server) -> None:
    deep = b"[" * 5000 + b"]" * 5000
    r = httpx.post(
        f"{server.v1}/completions",
        content=b'{"model": "tiny", "prompt": "x", "extra": ' + deep + b"}",
        headers={"content-type": "application/json"},
        timeout=30,
    )
    err = assert_error(r, 400, "invalid_request_error", None)
    assert err["param"] is None and "too deeply" in err["message"]


def test_a_prompt_far_past_the_context_is_refused_untokenised(server: Server) -> None:
    # tiny-short has 64 tokens: more than 64 * 32 characters cannot fit at any tokenisation.
    r = httpx.post(f"{server.v1}/completions", json={"model": "tiny-short", "prompt": "word " * 500}, timeout=30)
    err = assert_error(r, 400, "invalid_request_error", "context_length_exceeded", "prompt")
    assert "2500 characters" in err["message"] and "64 tokens" in err["message"]
