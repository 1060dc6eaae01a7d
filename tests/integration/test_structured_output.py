"""response_format (json_object, json_schema with strict) through the real server, with the openai SDK's
``parse()``, LangChain's ``with_structured_output`` and raw HTTP; outputs validated against the schema."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

import httpx
import openai
import pytest
from langchain_openai import ChatOpenAI
from pydantic import BaseModel, Field

from tests.integration.test_wire import assert_error
from tests.servers import Server

ASK = [{"role": "user", "content": "Describe the weather in Paris as JSON."}]


class Weather(BaseModel):
    city: str
    temperature_c: int
    conditions: Literal["sunny", "rainy", "cloudy"]


class Forecast(BaseModel):
    days: list[Weather] = Field(max_length=3)
    source: str | None


def test_sdk_parse_with_a_pydantic_model(client: openai.OpenAI, bias: dict[str, float]) -> None:
    for model in (Weather, Forecast):
        r = client.chat.completions.parse(
            model="tiny", messages=ASK, response_format=model, max_tokens=300, temperature=0, logit_bias=bias
        )
        choice = r.choices[0]
        assert choice.finish_reason == "stop", choice
        assert isinstance(choice.message.parsed, model)
        assert model.model_validate_json(choice.message.content or "") == choice.message.parsed


def test_json_object_whole_and_streamed(client: openai.OpenAI, bias: dict[str, float]) -> None:
    common = {"model": "tiny", "messages": ASK, "max_tokens": 200, "temperature": 0, "logit_bias": bias}
    whole = client.chat.completions.create(response_format={"type": "json_object"}, **common)  # type: ignore[arg-type]
    assert whole.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(whole.choices[0].message.content or ""), dict)
    stream = client.chat.completions.create(response_format={"type": "json_object"}, stream=True, **common)  # type: ignore[arg-type]
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == whole.choices[0].message.content


def test_sampled_choices_and_a_mixed_batch_all_validate(server: Server, bias: dict[str, float]) -> None:
    """Constrained sequences decode inside the batch beside unconstrained ones; every one validates."""
    schema = {
        "type": "json_schema",
        "json_schema": {"name": "w", "schema": Weather.model_json_schema(), "strict": True},
    }

    def post(body: dict) -> httpx.Response:
        return httpx.post(f"{server.v1}/chat/completions", json=body, timeout=120)

    base = {"model": "tiny", "messages": ASK, "max_tokens": 120, "logit_bias": bias}
    jobs = [
        {**base, "response_format": schema, "n": 3, "temperature": 1.0, "seed": 5},
        {**base, "response_format": schema, "temperature": 0.7},
        {**base, "response_format": {"type": "json_object"}, "temperature": 1.0},
        {**base, "temperature": 1.0},  # unconstrained, in the same batch
        {**base, "response_format": schema, "temperature": 0},
    ]
    with ThreadPoolExecutor(len(jobs)) as pool:
        replies = list(pool.map(post, jobs))
    for job, r in zip(jobs, replies, strict=True):
        assert r.status_code == 200, r.text
        for choice in r.json()["choices"]:
            if "response_format" not in job:
                continue
            assert choice["finish_reason"] == "stop", choice
            if job["response_format"]["type"] == "json_schema":
                Weather.model_validate_json(choice["message"]["content"])
            else:
                assert isinstance(json.loads(choice["message"]["content"]), dict)


def test_langchain_with_structured_output(server: Server, bias: dict[str, float]) -> None:
    llm = ChatOpenAI(
        base_url=server.v1,
        api_key="unused",
        model="tiny",
        temperature=0,
        max_tokens=300,
        max_retries=0,
        extra_body={"logit_bias": bias},
    )
    for method in ("json_schema", "function_calling"):
        out = llm.with_structured_output(Weather, method=method).invoke("Describe the weather in Paris.")
        assert isinstance(out, Weather), (method, out)


@pytest.mark.parametrize(
    ("response_format", "param", "words"),
    [
        ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}, "schema", "nope"),
        (
            {"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#/$defs/missing"}}},
            "schema",
            "missing",
        ),
        ({"type": "xml"}, "response_format", "xml"),
        ({"type": "json_schema"}, "response_format", "json_schema"),
    ],
)
def test_bad_response_formats_are_400(server: Server, response_format: dict, param: str, words: str) -> None:
    body = {"model": "tiny", "messages": ASK, "max_tokens": 4, "response_format": response_format}
    err = assert_error(
        httpx.post(f"{server.v1}/chat/completions", json=body, timeout=30), 400, "invalid_request_error", None
    )
    assert param in (err["param"] or "") or param in err["message"], err
    assert words in err["message"], err
    # The engine is unharmed: the next request is served.
    ok = httpx.post(f"{server.v1}/chat/completions", json={**body, "response_format": {"type": "text"}}, timeout=30)
    assert ok.status_code == 200
