"""The default model, SmolLM2-135M-Instruct (a real, trained model), through the real server: answers in
English, a named cache that changes nothing in its greedy answer, and structured output that parses."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from pydantic import BaseModel

from tests.servers import Server, run_server

SYSTEM = (
    "You are a geography teacher. You answer questions about countries and their capitals in one short "
    "sentence, clearly and correctly, for pupils aged ten. " * 6
)


@pytest.fixture(scope="module")
def smollm_server(models_dir: Path, log_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    cache_dir = tmp_path_factory.mktemp("smollm-caches")
    # No --model: the default model is the real one.
    with run_server(["--cache-dir", str(cache_dir)], models_dir=models_dir, log_dir=log_dir) as srv:
        yield srv


@pytest.fixture()
def client(smollm_server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=smollm_server.v1, api_key="unused", max_retries=0)


@pytest.mark.parametrize(
    ("question", "word"),
    [
        ("What is the capital of France?", "Paris"),
        ("What is the capital of Japan?", "Tokyo"),
        ("What is the capital of Germany?", "Berlin"),
        ("How many days are there in a week?", "7"),
        # Not every fact: a 135M model answers "What is the capital of Italy?" with "Il Coriobella, Italy."
    ],
)
def test_answers_in_english(client: openai.OpenAI, question: str, word: str) -> None:
    r = client.chat.completions.create(
        model="smollm2-135m", messages=[{"role": "user", "content": question}], temperature=0, max_tokens=32
    )
    assert word in (r.choices[0].message.content or ""), r.choices[0].message.content
    assert r.choices[0].finish_reason == "stop"  # a real model stops by itself


def test_health_says_which_weights_and_why(smollm_server: Server) -> None:
    model = httpx.get(f"{smollm_server.url}/health").json()["models"]["smollm2-135m"]
    assert model["state"] == "ready" and model["dtype"] == "float32"
    assert model["weights"].startswith("float32, dequantised at load")


def test_cache_hit_keeps_the_greedy_answer(smollm_server: Server, client: openai.OpenAI) -> None:
    created = httpx.post(
        f"{smollm_server.url}/admin/prefix-caches",
        json={"name": "teacher", "model": "smollm2-135m", "messages": [{"role": "system", "content": SYSTEM}]},
        timeout=120,
    )
    assert created.status_code == 201, created.text
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "What is the capital of Spain?"}]
    common = {"model": "smollm2-135m", "messages": messages, "temperature": 0, "max_tokens": 40, "logprobs": True}
    full = client.chat.completions.create(**common)  # type: ignore[arg-type]
    hit = client.chat.completions.create(extra_body={"prefix_cache": "teacher"}, **common)  # type: ignore[arg-type]
    assert hit.usage is not None and hit.usage.prompt_tokens_details is not None
    assert hit.usage.prompt_tokens_details.cached_tokens == created.json()["num_tokens"]
    assert hit.choices[0].message.content == full.choices[0].message.content
    assert "Madrid" in (full.choices[0].message.content or "")
    a = [t.logprob for t in full.choices[0].logprobs.content]  # type: ignore[union-attr]
    b = [t.logprob for t in hit.choices[0].logprobs.content]  # type: ignore[union-attr]
    assert max(abs(x - y) for x, y in zip(a, b, strict=True)) < 1e-3


class Capital(BaseModel):
    country: str
    capital: str


def test_json_schema_answer_makes_sense(client: openai.OpenAI) -> None:
    r = client.chat.completions.parse(
        model="smollm2-135m",
        messages=[
            {"role": "user", "content": "What is the capital of France? Answer with the country and its capital."}
        ],
        response_format=Capital,
        temperature=0,
        max_tokens=60,
    )
    parsed = r.choices[0].message.parsed
    assert isinstance(parsed, Capital), r.choices[0].message.content
    assert parsed.country.lower() == "france" and parsed.capital == "Paris", parsed


TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Get the current weather in a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string", "description": "The city name"}},
                "required": ["city"],
                "additionalProperties": False,
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "add",
            "description": "Add two integers",
            "parameters": {
                "type": "object",
                "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                "required": ["a", "b"],
                "additionalProperties": False,
            },
        },
    },
]


@pytest.mark.parametrize(
    ("question", "call"),
    [
        ("What's the weather like in Paris?", ("get_weather", {"city": "Paris"})),
        ("What is 2 plus 3?", ("add", {"a": 2, "b": 3})),
    ],
)
def test_tool_calls_that_make_sense(client: openai.OpenAI, question: str, call: tuple[str, dict]) -> None:
    r = client.chat.completions.create(
        model="smollm2-135m",
        messages=[{"role": "user", "content": question}],
        tools=TOOLS,  # type: ignore[arg-type]
        tool_choice="required",
        parallel_tool_calls=False,
        temperature=0,
        max_tokens=80,
    )
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls is not None
    (made,) = choice.message.tool_calls
    assert (made.function.name, json.loads(made.function.arguments)) == call
