"""A thinking model's reasoning on /v1/chat/completions, through the real server: ``reasoning_content`` in the
message and in its own deltas before the answer's, never in ``content``; its tokens in the usage.

The model is tests/thinking_model.py's: the tiny model whose chat template opens ``<think>\\n`` (Qwen3's
generation prompt) and whose ``</think>`` logit is 0, so that ``logit_bias`` decides how soon it closes the
block. Outputs are sampled with a seed, and checked against the same prompt's raw completion (the text with
nothing split off), so no exact text is assumed.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.servers import Server, run_server
from tests.thinking_model import THINK_END_ID, build_thinking_model

ASK = [{"role": "user", "content": "Why is the sky blue?"}]
PROMPT = "<|im_start|>user\nWhy is the sky blue?<|im_end|>\n<|im_start|>assistant\n<think>\n"
CLOSE_SOON = {str(THINK_END_ID): 9.0}  # about 0.13 a step (tests/thinking_model.py)
NEVER_CLOSE = {str(THINK_END_ID): -100.0}


@pytest.fixture(scope="module")
def server(models_dir: Path, log_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    config = tmp_path_factory.mktemp("reasoning-config") / "gateway.toml"
    thinker = build_thinking_model(models_dir)
    config.write_text(f'[[models]]\nname = "tiny"\npath = "tiny"\n\n[[models]]\nname = "thinker"\npath = "{thinker}"\n')
    with run_server(["--config", str(config)], models_dir=models_dir, log_dir=log_dir) as srv:
        deadline = time.monotonic() + 120
        while httpx.get(f"{srv.url}/health").json()["models"]["thinker"]["state"] != "ready":
            assert time.monotonic() < deadline, srv.log_text()
            time.sleep(0.2)
        yield srv


@pytest.fixture(scope="module")
def http(server: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.v1, timeout=120) as client:
        yield client


def chat(http: httpx.Client, **fields: object) -> dict:
    body = {"model": "thinker", "messages": ASK, "max_tokens": 24, "temperature": 1.0, **fields}
    r = http.post("/chat/completions", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def stream(http: httpx.Client, **fields: object) -> list[dict]:
    body = {"model": "thinker", "messages": ASK, "max_tokens": 24, "temperature": 1.0, "stream": True, **fields}
    body["stream_options"] = {"include_usage": True}
    chunks = []
    with http.stream("POST", "/chat/completions", json=body) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunks.append(json.loads(line[len("data: ") :]))
    return chunks


def raw_completion(http: httpx.Client, **fields: object) -> str:
    body = {"model": "thinker", "prompt": PROMPT, "max_tokens": 24, "temperature": 1.0, **fields}
    r = http.post("/completions", json=body)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


@pytest.fixture(scope="module")
def seeded(http: httpx.Client) -> tuple[int, dict]:
    """A seed whose answer has both reasoning and content (nearly every seed does), and that answer."""
    for seed in range(10):
        body = chat(http, seed=seed, logit_bias=CLOSE_SOON)
        message = body["choices"][0]["message"]
        if message.get("reasoning_content") and message["content"]:
            return seed, body
    raise AssertionError("no seed in 10 closed the block with text on both sides")


def test_reasoning_content_apart_from_the_answer(http: httpx.Client, seeded: tuple[int, dict]) -> None:
    seed, body = seeded
    message = body["choices"][0]["message"]
    assert set(message) == {"role", "content", "reasoning_content", "refusal"}
    reasoning, content = message["reasoning_content"], message["content"]
    # The same prompt's raw completion is the whole output: the reasoning, the marker, the answer.
    raw = raw_completion(http, seed=seed, logit_bias=CLOSE_SOON)
    assert raw.startswith(reasoning + "</think>") and "</think>" not in reasoning
    assert raw[len(reasoning) + len("</think>") :].lstrip() == content
    assert reasoning not in content
    usage = body["usage"]
    reasoning_tokens = usage["completion_tokens_details"]["reasoning_tokens"]
    assert 0 < reasoning_tokens < usage["completion_tokens"]


def test_streamed_reasoning_deltas_come_before_the_answer(http: httpx.Client, seeded: tuple[int, dict]) -> None:
    seed, body = seeded
    chunks = stream(http, seed=seed, logit_bias=CLOSE_SOON)
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    assert deltas[0] == {"role": "assistant", "content": ""}
    kinds = [k for d in deltas[1:] for k in d if k in ("reasoning_content", "content") and d[k]]
    assert kinds == sorted(kinds, key=lambda k: k == "content") and kinds[0] == "reasoning_content"
    assert all(set(d) <= {"reasoning_content", "content"} and len(d) <= 1 for d in deltas[1:])
    message = body["choices"][0]["message"]
    assert "".join(d.get("reasoning_content", "") for d in deltas) == message["reasoning_content"]
    assert "".join(d.get("content", "") for d in deltas) == message["content"]
    assert chunks[-1]["usage"] == body["usage"]


def test_block_never_closed_is_all_reasoning(http: httpx.Client) -> None:
    body = chat(http, seed=1, logit_bias=NEVER_CLOSE, max_tokens=8)
    choice = body["choices"][0]
    assert choice["finish_reason"] == "length"
    assert choice["message"]["content"] == "" and choice["message"]["reasoning_content"]
    assert choice["message"]["reasoning_content"] == raw_completion(http, seed=1, logit_bias=NEVER_CLOSE, max_tokens=8)
    assert body["usage"]["completion_tokens_details"] == {"reasoning_tokens": 8}
    chunks = stream(http, seed=1, logit_bias=NEVER_CLOSE, max_tokens=8)
    assert not any(c["choices"][0]["delta"].get("content") for c in chunks if c["choices"])


def test_a_stop_string_in_the_reasoning_does_not_end_the_answer(http: httpx.Client, seeded: tuple[int, dict]) -> None:
    seed, body = seeded
    message = body["choices"][0]["message"]
    word = message["reasoning_content"].split()[0]
    if word in message["content"]:
        pytest.skip("this seed's answer repeats the word")
    stopped = chat(http, seed=seed, logit_bias=CLOSE_SOON, stop=[word])
    assert stopped["choices"][0]["message"] == message
    # In the answer, a stop string cuts it as usual.
    cut = message["content"][len(message["content"]) // 2 :].strip()[:3]
    if cut:
        stopped = chat(http, seed=seed, logit_bias=CLOSE_SOON, stop=[cut])
        assert stopped["choices"][0]["message"]["content"] == message["content"][: message["content"].index(cut)]
        assert stopped["choices"][0]["message"]["reasoning_content"] == message["reasoning_content"]


def test_openai_sdk_sees_reasoning_content(server: Server, seeded: tuple[int, dict]) -> None:
    seed, body = seeded
    client = openai.OpenAI(base_url=server.v1, api_key="unused", max_retries=0)
    common = {"model": "thinker", "messages": ASK, "max_tokens": 24, "temperature": 1.0, "seed": seed}
    whole = client.chat.completions.create(**common, logit_bias=CLOSE_SOON)  # type: ignore[call-overload]
    extra = whole.choices[0].message.model_extra or {}
    assert extra["reasoning_content"] == body["choices"][0]["message"]["reasoning_content"]
    assert whole.usage is not None and whole.usage.completion_tokens_details is not None
    assert (
        whole.usage.completion_tokens_details.reasoning_tokens
        == body["usage"]["completion_tokens_details"]["reasoning_tokens"]
    )


def test_raw_completions_are_not_split(http: httpx.Client) -> None:
    r = http.post(
        "/completions",
        json={"model": "thinker", "prompt": PROMPT, "max_tokens": 4, "seed": 1, "logit_bias": NEVER_CLOSE},
    )
    body = r.json()
    assert set(body["choices"][0]) == {"index", "text", "logprobs", "finish_reason"} and body["choices"][0]["text"]
    assert "completion_tokens_details" not in body["usage"]


def test_a_model_without_think_markers_has_no_reasoning(http: httpx.Client) -> None:
    body = chat(http, model="tiny", seed=1)
    assert "reasoning_content" not in body["choices"][0]["message"]
    assert "completion_tokens_details" not in body["usage"]
    chunks = stream(http, model="tiny", seed=1)
    assert not any("reasoning_content" in c["choices"][0]["delta"] for c in chunks if c["choices"])


def test_constrained_output_is_all_answer(http: httpx.Client) -> None:
    """A grammar shapes the output from its first token: nothing of it is reasoning."""
    body = chat(http, seed=1, response_format={"type": "json_object"}, max_tokens=8)
    message = body["choices"][0]["message"]
    assert "reasoning_content" not in message and message["content"]
    assert "completion_tokens_details" not in body["usage"]


def test_responses_give_the_reasoning_its_own_item(server: Server, http: httpx.Client) -> None:
    """/v1/responses: the same greedy output as chat's, its reasoning as a ``reasoning`` item before the answer's
    message (whole and streamed through the openai SDK's stream helper), never in ``output_text``."""
    body = chat(http, temperature=0, max_tokens=16)
    message = body["choices"][0]["message"]
    assert message.get("reasoning_content")
    client = openai.OpenAI(base_url=server.v1, api_key="unused", max_retries=0)
    common = {"model": "thinker", "input": ASK[0]["content"], "max_output_tokens": 16, "temperature": 0}
    whole = client.responses.create(**common)  # type: ignore[call-overload]
    with client.responses.stream(**common) as stream:  # type: ignore[call-overload]
        events = list(stream)
    streamed = events[-1].response
    for r in (whole, streamed):
        kinds = [item.type for item in r.output]
        assert kinds[0] == "reasoning" and "reasoning" not in kinds[1:], kinds
        assert r.output[0].content is not None and r.output[0].content[0].text == message["reasoning_content"]
        assert r.output_text == message["content"]
        assert r.usage is not None
        assert (
            r.usage.output_tokens_details.reasoning_tokens
            == body["usage"]["completion_tokens_details"]["reasoning_tokens"]
        )
    deltas = [e.delta for e in events if e.type == "response.reasoning_text.delta"]
    assert "".join(deltas) == message["reasoning_content"]
    order = [e.type for e in events if e.type in ("response.reasoning_text.delta", "response.output_text.delta")]
    assert order == sorted(order, key=lambda t: t == "response.output_text.delta")
    # A client managing its own context may resend the reasoning item: it is accepted and left out of the prompt.
    again = client.responses.create(
        model="thinker",
        input=[
            {"role": "user", "content": ASK[0]["content"]},
            whole.output[0].model_dump(exclude_none=True),
            {"role": "user", "content": "And at sunset?"},
        ],
        max_output_tokens=4,
    )
    assert again.status in ("completed", "incomplete")
