"""Stop strings, including ones that span a token boundary, streaming and not."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.integration.test_wire import sse_events
from tests.servers import Server

NO_EOS = {"0": -100, "2": -100}


def greedy_tokens(server: Server, prompt: str, n: int) -> list[str]:
    r = httpx.post(
        f"{server.v1}/completions",
        timeout=30,
        json={
            "model": "tiny",
            "prompt": prompt,
            "max_tokens": n,
            "temperature": 0,
            "logprobs": 0,
            "logit_bias": NO_EOS,
        },
    )
    return r.json()["choices"][0]["logprobs"]["tokens"]


@pytest.mark.parametrize("prompt", ["def main():", "import sys\n", "The quick brown fox"])
def test_stop_string_across_tokens(server: Server, prompt: str) -> None:
    tokens = greedy_tokens(server, prompt, 40)
    text = "".join(tokens)
    # A stop string made of the end of one token and the start of the next.
    k = next(i for i in range(1, len(tokens) - 1) if len(tokens[i]) >= 2 and len(tokens[i + 1]) >= 2)
    stop = tokens[k][-2:] + tokens[k + 1][:2]
    expected = text[: text.index(stop)]
    body = {
        "model": "tiny",
        "prompt": prompt,
        "max_tokens": 40,
        "temperature": 0,
        "stop": [stop, "\x00never"],
        "logit_bias": NO_EOS,
    }
    whole = httpx.post(f"{server.v1}/completions", json=body, timeout=30).json()
    assert whole["choices"][0]["text"] == expected
    assert whole["choices"][0]["finish_reason"] == "stop"
    streamed = httpx.post(f"{server.v1}/completions", json={**body, "stream": True}, timeout=30)
    chunks = [json.loads(e) for e in sse_events(streamed.text)[:-1]]
    pieces = [c["choices"][0]["text"] for c in chunks]
    assert "".join(pieces) == expected
    # Nothing of the stop string was ever emitted, not even its first characters.
    emitted = ""
    for piece in pieces:
        emitted += piece
        assert expected.startswith(emitted), (emitted, expected, stop)
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_stop_that_never_matches_releases_held_text(server: Server) -> None:
    tokens = greedy_tokens(server, "x = ", 12)
    text = "".join(tokens)
    # Starts like the final characters but never completes: held back, then released at the end.
    stop = text[-1] + "\x01"
    body = {"model": "tiny", "prompt": "x = ", "max_tokens": 12, "temperature": 0, "stop": stop, "logit_bias": NO_EOS}
    whole = httpx.post(f"{server.v1}/completions", json=body, timeout=30).json()["choices"][0]
    assert whole["text"] == text and whole["finish_reason"] == "length"
    streamed = httpx.post(f"{server.v1}/completions", json={**body, "stream": True}, timeout=30)
    chunks = [json.loads(e) for e in sse_events(streamed.text)[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == text


def test_chat_stop(server: Server) -> None:
    msgs = [{"role": "user", "content": "hello there"}]
    base = httpx.post(
        f"{server.v1}/chat/completions",
        timeout=30,
        json={"model": "tiny", "messages": msgs, "max_tokens": 20, "temperature": 0, "logit_bias": NO_EOS},
    ).json()
    content = base["choices"][0]["message"]["content"]
    stop = content[5:8]
    r = httpx.post(
        f"{server.v1}/chat/completions",
        timeout=30,
        json={
            "model": "tiny",
            "messages": msgs,
            "max_tokens": 20,
            "temperature": 0,
            "stop": stop,
            "logit_bias": NO_EOS,
        },
    ).json()
    assert r["choices"][0]["message"]["content"] == content[: content.index(stop)]
    assert r["choices"][0]["finish_reason"] == "stop"
