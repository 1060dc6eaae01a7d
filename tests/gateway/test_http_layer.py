"""HTTP-layer behaviour with a FAKE engine (this file only): keep-alive pings during a slow first
token, 503 while models load, an engine failure mid-stream, and an unexpected exception. The real
engine cannot be made slow or broken on demand; everything else is tested against the real one."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from typing import Any

import httpx
import pytest
import uvicorn

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
    UnknownModel,
)
from adapters.stats import EngineStats
from gateway.app import create_app
from gateway.config import load_config
from tests.servers import free_port


class FakeTokenizer:
    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode())

    def encode_after(self, prefix_text: str, prefix_tokens: Sequence[int], text: str) -> list[int]:
        return self.encode(text)  # no special tokens: the whole text, as the real one does at a plain boundary

    def decode(self, tokens: Sequence[int]) -> str:
        return bytes(tokens).decode(errors="replace")

    def render_chat(
        self, messages: Sequence[Mapping[str, object]], *, add_generation_prompt: bool, tools: object = None
    ) -> str:
        return "".join(str(m["content"]) for m in messages)


class FakeEngine:
    """Scripted: 'slow' waits before its first token, 'fail' fails after one token, 'crash' raises."""

    prefix_store = None

    def __init__(self) -> None:
        self.loading = False
        self.stats = EngineStats()

    def models(self) -> list[ModelInfo]:
        return [ModelInfo("fake", 0, "test", 1024, not self.loading, "fake", "abc")]

    def tokenizer(self, model: str) -> FakeTokenizer:
        if model != "fake":
            raise UnknownModel(model)
        if self.loading:
            raise EngineNotReady("The model 'fake' is still loading")
        return FakeTokenizer()

    async def submit(self, plan: Plan) -> AsyncIterator[EngineEvent]:
        prompt = bytes(plan.prompt_tokens).decode()
        if prompt == "slow":
            await asyncio.sleep(0.6)
        if prompt == "crash":
            raise RuntimeError("boom")
        yield TokenEvent(0, "hi", (1,))
        if prompt == "fail":
            yield Failed(EngineError("device lost"))
            return
        yield ChoiceFinished(0, "length")
        yield Finished(len(plan.prompt_tokens), 1)

    def health(self) -> dict[str, Any]:
        state = "loading" if self.loading else "ready"
        return {"engine_alive": True, "models": {"fake": {"state": state}}, "memory": {}}

    def record_miss(self, model: str, tenant: str) -> None: ...

    def forget_response(self, tenant: str, response_id: str) -> None: ...

    def response_kv_bytes(self) -> dict[str, int]:
        return {}

    async def refresh(self) -> None: ...

    def start(self) -> None: ...

    def stop(self, *, wait: bool = True) -> None: ...


@pytest.fixture(scope="module")
def fake() -> Iterator[tuple[str, FakeEngine]]:
    engine = FakeEngine()
    config = load_config({"model": "fake"}, environ={})
    config = type(config)(**{**{f: getattr(config, f) for f in config.__struct_fields__}, "sse_ping_seconds": 0.1})
    port = free_port()
    app = create_app(config, engine)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    yield f"http://127.0.0.1:{port}", engine
    server.should_exit = True
    thread.join(5)


def chat(url: str, content: str, stream: bool) -> httpx.Response:
    return httpx.post(
        f"{url}/v1/chat/completions",
        timeout=10,
        json={"model": "fake", "messages": [{"role": "user", "content": content}], "max_tokens": 1, "stream": stream},
    )


def test_keepalive_pings_while_waiting(fake: tuple[str, FakeEngine]) -> None:
    url, _ = fake
    r = chat(url, "slow", True)
    assert r.status_code == 200
    assert ": ping" in r.text.split("data: ", 2)[1]  # a comment arrived between the role and the first token
    assert r.text.rstrip().endswith("data: [DONE]")


def test_error_mid_stream_is_one_error_event(fake: tuple[str, FakeEngine]) -> None:
    url, _ = fake
    r = chat(url, "fail", True)
    data = [line[6:] for line in r.text.split("\n") if line.startswith("data: ")]
    assert "[DONE]" not in data
    last = json.loads(data[-1])
    assert last["error"]["type"] == "server_error" and "device lost" in last["error"]["message"]
    assert set(last["error"]) == {"message", "type", "param", "code"}


def test_engine_failure_non_streaming_is_500_shaped(fake: tuple[str, FakeEngine]) -> None:
    url, _ = fake
    r = chat(url, "fail", False)
    assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
    r = chat(url, "crash", False)
    assert r.status_code == 500 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    assert "boom" not in r.text  # internals are logged, not sent


def test_503_while_loading(fake: tuple[str, FakeEngine]) -> None:
    url, engine = fake
    engine.loading = True
    try:
        r = chat(url, "x", False)
        assert r.status_code == 503 and r.json()["error"]["code"] == "model_loading"
        assert "x-should-retry" not in r.headers  # a retry can succeed once loading ends
        assert r.headers["retry-after"] == "5"
        assert httpx.get(f"{url}/health").status_code == 503
    finally:
        engine.loading = False
    assert chat(url, "x", False).status_code == 200
