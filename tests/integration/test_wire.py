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
