"""Clients resend the whole conversation every turn: a named cache must not double it.

Each request is sent in both forms (the whole conversation, cache's messages included; or only what
follows the cache) and without a cache at all; all three must agree on ``prompt_tokens`` and greedy
output, and both cached forms on ``cached_tokens``.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import openai
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage
from langchain_openai import ChatOpenAI
from mlx_lm.tokenizer_utils import load as load_tokenizer

from adapters.mlx_lm.presets import build_model
from tests.greedy import assert_same_greedy
from tests.integration.test_prefix_caches import NO_EOS, SYSTEM, chat_items, completion_items, create
from tests.servers import Server

COMMON = {"max_tokens": 12, "temperature": 0, "logprobs": True, "top_logprobs": 5, "logit_bias": NO_EOS}
SYS = {"role": "system", "content": SYSTEM}


def _header(raw: object) -> dict[str, str]:
    text = raw.headers["x-prefix-cache"]  # type: ignore[attr-defined]
    return dict(part.split("=", 1) for part in text.split("; "))


def _chat_three_ways(
    server: Server, client: openai.OpenAI, cache: str, cached_msgs: list[dict], new_msgs: list[dict]
) -> None:
    full = client.chat.completions.create(model="tiny", messages=[*cached_msgs, *new_msgs], **COMMON)
    forms = {}
    for form, messages in (("resent", [*cached_msgs, *new_msgs]), ("prepended", new_msgs)):
        raw = client.chat.completions.with_raw_response.create(
            model="tiny", messages=messages, extra_body={"prefix_cache": cache}, **COMMON
        )
        header = _header(raw)
        assert header["form"] == form and header["hit"] == "true", header
        forms[form] = raw.parse()
    num_tokens = httpx.get(f"{server.url}/admin/prefix-caches/{cache}").json()["num_tokens"]
    assert full.usage is not None
    for reply in forms.values():
        assert reply.usage is not None and reply.usage.prompt_tokens_details is not None
        assert reply.usage.prompt_tokens == full.usage.prompt_tokens
        assert reply.usage.prompt_tokens_details.cached_tokens == num_tokens
        assert_same_greedy(chat_items(full), chat_items(reply))
    assert chat_items(forms["resent"]) == chat_items(forms["prepended"])


def test_chat_system_prompt_resent_or_not(server: Server, client: openai.OpenAI) -> None:
    assert create(server, "resent-sys").status_code == 201
    _chat_three_ways(server, client, "resent-sys", [SYS], [{"role": "user", "content": "hi"}])


def test_chat_multi_turn_cache_resent(server: Server, client: openai.OpenAI) -> None:
    history = [SYS, {"role": "user", "content": "What is PEP 8?"}, {"role": "assistant", "content": "A style guide."}]
    assert create(server, "resent-turns", messages=history).status_code == 201
    _chat_three_ways(server, client, "resent-turns", history, [{"role": "user", "content": "Show an example."}])


def test_chat_resent_streamed_usage(server: Server, client: openai.OpenAI) -> None:
    assert create(server, "resent-stream").status_code == 201
    messages = [SYS, {"role": "user", "content": "hi"}]
    plain = client.chat.completions.create(model="tiny", messages=messages, max_tokens=6, temperature=0)
    stream = client.chat.completions.create(
        model="tiny",
        messages=messages,
        max_tokens=6,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"prefix_cache": "resent-stream"},
    )
    chunks = list(stream)
    usage = chunks[-1].usage
    assert usage is not None and plain.usage is not None and usage.prompt_tokens_details is not None
    assert usage.prompt_tokens == plain.usage.prompt_tokens and usage.prompt_tokens_details.cached_tokens > 300
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == plain.choices[0].message.content


def test_completion_prompt_resent_or_not(server: Server, client: openai.OpenAI, models_dir: Path) -> None:
    prefix = "import os\nimport sys\n\n" + "def helper(value):\n    return value * 2\n\n" * 20
    question = "def main(argv):\n"
    assert create(server, "resent-code", prompt=prefix).status_code == 201
    tok = load_tokenizer(build_model("tiny", models_dir=models_dir))
    head = tok.encode(prefix, add_special_tokens=False)
    ids = head + tok.encode(question, add_special_tokens=False)
    common = {"max_tokens": 12, "temperature": 0, "logit_bias": NO_EOS, "logprobs": 5}
    full = client.completions.create(model="tiny", prompt=ids, **common)
    for form, prompt in (("resent", ids), ("prepended", question)):
        raw = client.completions.with_raw_response.create(
            model="tiny", prompt=prompt, extra_body={"prefix_cache": "resent-code"}, **common
        )
        assert _header(raw)["form"] == form and _header(raw)["hit"] == "true"
        reply = raw.parse()
        assert reply.usage is not None and full.usage is not None and reply.usage.prompt_tokens_details is not None
        assert reply.usage.prompt_tokens == full.usage.prompt_tokens
        assert reply.usage.prompt_tokens_details.cached_tokens == len(head)
        assert_same_greedy(completion_items(full), completion_items(reply))


def test_completion_text_resent_across_a_token_boundary(
    server: Server, client: openai.OpenAI, models_dir: Path
) -> None:
    """A prompt that starts with the cache's text but tokenises differently where the cache ends (its last
    word merges with what follows): the tokens both share are reused, the request keeps its own
    tokenisation (as without a cache), and nothing is doubled."""
    tok = load_tokenizer(build_model("tiny", models_dir=models_dir))
    prefix = (
        "class Handler:\n" + "    def helper(self, value):\n        return value * 2\n\n" * 10 + "    result = self.hel"
    )
    prompt = prefix + "per(value)\n"
    head, ids = tok.encode(prefix, add_special_tokens=False), tok.encode(prompt, add_special_tokens=False)
    shared = next(i for i, (a, b) in enumerate(zip(head, ids, strict=False)) if a != b)
    assert 0 < shared < len(head)  # the premise of this test: the tokens part before the cache ends
    assert create(server, "boundary", prompt=prefix).status_code == 201
    common = {"max_tokens": 12, "temperature": 0, "logit_bias": NO_EOS, "logprobs": 5}
    full = client.completions.create(model="tiny", prompt=prompt, **common)
    raw = client.completions.with_raw_response.create(
        model="tiny", prompt=prompt, extra_body={"prefix_cache": "boundary"}, **common
    )
    assert _header(raw)["form"] == "resent" and _header(raw)["hit"] == "true"
    hit = raw.parse()
    assert hit.usage is not None and full.usage is not None and hit.usage.prompt_tokens_details is not None
    assert hit.usage.prompt_tokens == full.usage.prompt_tokens == len(ids)
    assert hit.usage.prompt_tokens_details.cached_tokens == shared
    assert_same_greedy(completion_items(full), completion_items(hit))


def test_langchain_resends_its_system_message(server: Server) -> None:
    assert create(server, "lc-sys").status_code == 201
    kwargs = {"base_url": server.v1, "api_key": "unused", "model": "tiny", "max_tokens": 8, "temperature": 0}
    cached = ChatOpenAI(**kwargs, max_retries=0, extra_body={"prefix_cache": "lc-sys", "logit_bias": NO_EOS})
    plain = ChatOpenAI(**kwargs, max_retries=0, extra_body={"logit_bias": NO_EOS})
    turns = [SystemMessage(SYSTEM), HumanMessage("hi")]
    for _ in range(2):  # two turns of one conversation, the whole history resent each time
        a, b = cached.invoke(turns), plain.invoke(turns)
        assert a.usage_metadata is not None and b.usage_metadata is not None
        assert a.usage_metadata["input_tokens"] == b.usage_metadata["input_tokens"]
        assert a.usage_metadata.get("input_token_details", {}).get("cache_read", 0) > 300
        assert a.content == b.content
        turns += [AIMessage(str(a.content)), HumanMessage("and then?")]
