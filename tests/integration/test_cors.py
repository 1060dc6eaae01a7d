"""CORS, with raw requests as a browser sends them: off by default; with ``cors_allowed_origins`` an allowed
origin gets the headers on every answer (errors and streams included), any other origin none."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.servers import Server, run_server

ALLOWED = "http://app.example"
OTHER = "http://elsewhere.example"
KEY = {"authorization": "Bearer key-cors"}


@pytest.fixture(scope="module")
def cors_server(models_dir: Path, log_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    env = {
        "MLX_GATEWAY_CORS_ALLOWED_ORIGINS": f"{ALLOWED}, http://second.example",
        "MLX_GATEWAY_API_KEYS": "key-cors:cors",
    }
    cache_dir = tmp_path_factory.mktemp("cors-prefix-caches")
    with run_server(
        ["--model", "tiny", "--cache-dir", str(cache_dir)], models_dir=models_dir, log_dir=log_dir, env=env
    ) as s:
        yield s


def _preflight(server: Server, origin: str, method: str = "POST") -> httpx.Response:
    headers = {
        "origin": origin,
        "access-control-request-method": method,
        "access-control-request-headers": "authorization, content-type",
    }
    return httpx.options(f"{server.url}/v1/chat/completions", headers=headers, timeout=30)


def _cors(response: httpx.Response) -> dict[str, str]:
    return {k: v for k, v in response.headers.items() if k.startswith("access-control-")}


def test_cors_is_off_by_default(server: Server) -> None:
    r = _preflight(server, ALLOWED)
    assert r.status_code == 204
    assert _cors(r) == {}
    assert r.headers["allow"] == "OPTIONS, POST"  # a plain OPTIONS answer, not a preflight's
    r = httpx.get(f"{server.url}/v1/models", headers={"origin": ALLOWED}, timeout=30)
    assert r.status_code == 200
    assert _cors(r) == {}


def test_preflight_from_an_allowed_origin(cors_server: Server) -> None:
    for origin in (ALLOWED, "http://second.example"):
        r = _preflight(cors_server, origin)
        assert r.status_code == 204
        assert r.headers["access-control-allow-origin"] == origin
        assert r.headers["vary"] == "Origin"
        allowed = {h.strip().lower() for h in r.headers["access-control-allow-headers"].split(",")}
        assert {"authorization", "content-type"} <= allowed
        assert "POST" in r.headers["access-control-allow-methods"]
        assert r.headers["access-control-max-age"] == "600"
    r = _preflight(cors_server, ALLOWED, method="DELETE")
    assert r.status_code == 204


def test_preflight_from_another_origin_is_refused(cors_server: Server) -> None:
    r = _preflight(cors_server, OTHER)
    assert r.status_code == 400
    assert "access-control-allow-origin" not in r.headers
    # Litestar's own answer, in plain text: a browser never shows a preflight's body to the page.
    assert r.text == "Disallowed CORS Origin"


def test_simple_request_from_an_allowed_origin(cors_server: Server) -> None:
    r = httpx.get(f"{cors_server.url}/v1/models", headers={"origin": ALLOWED, **KEY}, timeout=30)
    assert r.status_code == 200
    assert r.json()["data"][0]["id"] == "tiny"
    assert r.headers["access-control-allow-origin"] == ALLOWED
    assert r.headers["vary"] == "Origin"
    # A page may read the gateway's own headers (browsers hide all but a few unless listed).
    exposed = {h.strip() for h in r.headers["access-control-expose-headers"].split(",")}
    assert exposed == {"x-prefix-cache", "x-request-id", "x-should-retry", "retry-after"}


def test_simple_request_from_another_origin_gets_no_allow_origin(cors_server: Server) -> None:
    r = httpx.get(f"{cors_server.url}/v1/models", headers={"origin": OTHER, **KEY}, timeout=30)
    assert r.status_code == 200  # the server answers; the browser keeps the answer from the page
    assert "access-control-allow-origin" not in r.headers


@pytest.mark.parametrize(
    ("headers", "body", "status", "message"),
    [
        ({}, {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}, 401, "Missing API key"),
        (KEY, {"model": "tiny"}, 400, "Missing required parameter 'messages'"),
        (KEY, {"model": "nope", "messages": [{"role": "user", "content": "hi"}]}, 404, "nope"),
    ],
)
def test_errors_carry_the_cors_headers(
    cors_server: Server, headers: dict[str, str], body: dict[str, object], status: int, message: str
) -> None:
    r = httpx.post(
        f"{cors_server.url}/v1/chat/completions", json=body, headers={"origin": ALLOWED, **headers}, timeout=30
    )
    assert r.status_code == status
    assert r.headers["access-control-allow-origin"] == ALLOWED  # else the page sees a network error, not this
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert message in error["message"]


def test_streams_carry_the_cors_headers(cors_server: Server) -> None:
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "stream": True}
    with httpx.stream(
        "POST", f"{cors_server.url}/v1/chat/completions", json=body, headers={"origin": ALLOWED, **KEY}, timeout=60
    ) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["access-control-allow-origin"] == ALLOWED
        events = [line.removeprefix("data: ") for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    assert json.loads(events[0])["object"] == "chat.completion.chunk"
