"""The official openai SDK, sync and async, streaming and not, on both endpoints, against the real server."""

from __future__ import annotations

import asyncio

import openai
import pytest

from tests.servers import Server

MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Write a Python function that reverses a list."},
]


@pytest.fixture()
def aclient(server: Server) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=server.v1, api_key="unused", max_retries=0)


def test_models(client: openai.OpenAI) -> None:
    ids = [m.id for m in client.models.list()]
    assert ids == ["tiny", "tiny-short"]
    model = client.models.retrieve("tiny")
    assert model.id == "tiny" and model.object == "model" and model.owned_by == "mlx-gateway"


def test_chat_non_streaming(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=12, temperature=0)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    assert r.model == "tiny" and r.system_fingerprint and r.system_fingerprint.startswith("fp_")
    (choice,) = r.choices
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("length", "stop")
    assert r.usage is not None and r.usage.completion_tokens <= 12
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.usage.prompt_tokens_details is not None and r.usage.prompt_tokens_details.cached_tokens == 0


def test_chat_streaming_matches_non_streaming(client: openai.OpenAI) -> None:
    whole = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=16, temperature=0)
    stream = client.chat.completions.create(
        model="tiny",
        messages=MESSAGES,
        max_tokens=16,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert len({c.id for c in chunks}) == 1
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    roles = [c.choices[0].delta.role for c in chunks if c.choices and c.choices[0].delta.role]
    assert roles == ["assistant"]
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens  # type: ignore[union-attr]


def test_max_completion_tokens_wins(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model="tiny",
        messages=MESSAGES,
        max_tokens=20,
        max_completion_tokens=3,
        temperature=0,
        logit_bias={"0": -100, "2": -100},
    )
    assert r.usage is not None and r.usage.completion_tokens == 3 and r.choices[0].finish_reason == "length"


def test_completion_prompt_forms(client: openai.OpenAI) -> None:
    one = client.completions.create(model="tiny", prompt="def add(a, b):", max_tokens=5, temperature=0)
    assert one.object == "text_completion" and len(one.choices) == 1
    many = client.completions.create(model="tiny", prompt=["import os", "class Foo:"], max_tokens=5, temperature=0)
    assert [c.index for c in many.choices] == [0, 1]
    ids = client.completions.create(model="tiny", prompt=[100, 200, 300], max_tokens=5, temperature=0)
    id_lists = client.completions.create(model="tiny", prompt=[[100, 200, 300], [5, 6]], max_tokens=5, temperature=0)
    assert ids.choices[0].text == id_lists.choices[0].text
    assert len(id_lists.choices) == 2
    assert id_lists.usage is not None and id_lists.usage.prompt_tokens == 5
    assert id_lists.usage.completion_tokens == 10  # two prompts, 5 tokens each
    # A list of prompts gives each prompt the same result as alone.
    alone = client.completions.create(model="tiny", prompt="class Foo:", max_tokens=5, temperature=0)
    assert many.choices[1].text == alone.choices[0].text


def test_completion_streaming_and_echo(client: openai.OpenAI) -> None:
    whole = client.completions.create(model="tiny", prompt="for i in range(", max_tokens=8, temperature=0)
    chunks = list(
        client.completions.create(
            model="tiny",
            prompt="for i in range(",
            max_tokens=8,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert chunks[-1].usage is not None and chunks[-1].choices == []
    echoed = client.completions.create(model="tiny", prompt="for i in range(", max_tokens=8, temperature=0, echo=True)
    assert echoed.choices[0].text == "for i in range(" + whole.choices[0].text


def test_extra_body_and_unknown_fields_are_accepted(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model="tiny",
        messages=MESSAGES,
        max_tokens=4,
        temperature=0,
        user="someone",
        extra_body={"prompt_cache_key": "abc", "some_future_field": {"x": 1}, "metadata": {"a": "b"}},
    )
    assert r.choices[0].message.content is not None


def test_seed_reproducible_and_independent_of_traffic(client: openai.OpenAI, server: Server) -> None:
    def sample(seed: int) -> str:
        r = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=24, temperature=1.0, seed=seed)
        return r.choices[0].message.content or ""

    first = sample(1234)
    assert sample(1234) == first
    assert sample(4321) != first

    async def with_neighbours() -> str:
        aclient = openai.AsyncOpenAI(base_url=server.v1, api_key="x", max_retries=0)
        noise = [
            aclient.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=24, temperature=1.0)
            for _ in range(3)
        ]
        target = aclient.chat.completions.create(
            model="tiny", messages=MESSAGES, max_tokens=24, temperature=1.0, seed=1234
        )
        results = await asyncio.gather(*noise, target)
        return results[-1].choices[0].message.content or ""

    assert asyncio.run(with_neighbours()) == first


def test_n_choices(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model="tiny", messages=MESSAGES, max_tokens=16, temperature=1.0, n=3, seed=7, logprobs=True
    )
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert len({c.message.content for c in r.choices}) > 1
    per_choice = [len(c.logprobs.content or []) for c in r.choices if c.logprobs]
    assert r.usage is not None and r.usage.completion_tokens == sum(per_choice) and len(per_choice) == 3
    assert r.usage.prompt_tokens > 0
    stream = list(
        client.chat.completions.create(
            model="tiny", messages=MESSAGES, max_tokens=8, temperature=1.0, n=2, seed=7, stream=True
        )
    )
    roles = sorted(c.choices[0].index for c in stream if c.choices and c.choices[0].delta.role)
    assert roles == [0, 1]
    finishes = sorted(c.choices[0].index for c in stream if c.choices and c.choices[0].finish_reason)
    assert finishes == [0, 1]


def test_chat_logprobs(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model="tiny", messages=MESSAGES, max_tokens=6, temperature=0, logprobs=True, top_logprobs=3
    )
    content = r.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content is not None and len(content) == r.usage.completion_tokens  # type: ignore[union-attr]
    for item in content:
        assert len(item.top_logprobs) == 3
        tops = [t.logprob for t in item.top_logprobs]
        assert tops == sorted(tops, reverse=True) and all(t <= 0 for t in tops)
        assert item.logprob == pytest.approx(tops[0], abs=1e-5)  # greedy picks the most likely token
        assert item.bytes is not None and bytes(item.bytes).decode("utf-8", "replace") == item.token
    assert "".join(i.token for i in content) == r.choices[0].message.content


def test_completion_logprobs(client: openai.OpenAI) -> None:
    r = client.completions.create(model="tiny", prompt="x = ", max_tokens=5, temperature=0, logprobs=2)
    lp = r.choices[0].logprobs
    assert lp is not None and len(lp.tokens) == len(lp.token_logprobs) == 5  # type: ignore[arg-type]
    assert lp.top_logprobs is not None and all(len(d) <= 2 for d in lp.top_logprobs)
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(5)]  # type: ignore[index]


def test_logit_bias_forces_eos_and_stop_reason(client: openai.OpenAI) -> None:
    # Token 2 is <|im_end|>, one of the tiny model's EOS tokens.
    r = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=10, logit_bias={"2": 100})
    assert r.choices[0].finish_reason == "stop" and r.choices[0].message.content == ""
    assert r.usage is not None and r.usage.completion_tokens == 1


def test_penalties_change_output(client: openai.OpenAI) -> None:
    base = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=24, temperature=0)
    penalised = client.chat.completions.create(
        model="tiny", messages=MESSAGES, max_tokens=24, temperature=0, frequency_penalty=2.0, presence_penalty=2.0
    )
    # The tiny model repeats itself under greedy decoding; penalties must break the repetition.
    assert penalised.choices[0].message.content != base.choices[0].message.content


def test_async_client_both_endpoints(aclient: openai.AsyncOpenAI) -> None:
    async def run() -> None:
        chat = await aclient.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=5, temperature=0)
        assert chat.choices[0].message.content is not None
        stream = await aclient.chat.completions.create(
            model="tiny", messages=MESSAGES, max_tokens=5, temperature=0, stream=True
        )
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        assert text == chat.choices[0].message.content
        comp = await aclient.completions.create(model="tiny", prompt="import", max_tokens=5, temperature=0)
        cstream = await aclient.completions.create(
            model="tiny", prompt="import", max_tokens=5, temperature=0, stream=True
        )
        ctext = "".join([c.choices[0].text async for c in cstream if c.choices])
        assert ctext == comp.choices[0].text

    asyncio.run(run())


def test_message_forms(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model="tiny",
        max_tokens=4,
        messages=[
            {"role": "developer", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Hello "}, {"type": "text", "text": "there"}]},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}],
            },
            {"role": "tool", "content": "42", "tool_call_id": "call_1"},
            {"role": "user", "content": "Thanks"},
        ],
    )
    assert r.choices[0].message.content is not None
