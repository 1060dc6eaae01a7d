"""Planning with a named chat cache, on chat templates the built-in models do not have.

The tiny model's ChatML template renders a cached conversation the same whatever follows it, so the
mismatch case needs a template that does not: here one that folds the system message into the first
user turn, as Mistral's and Llama 2's do. Planning is pure apart from the tokenizer, so a character
tokenizer and an in-memory manifest stand in for the model and the store.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import pytest

from gateway.config import ModelConfig
from gateway.errors import InvalidRequest
from gateway.planning import plan_chat
from gateway.schemas.openai import ChatCompletionRequest, ChatMessage, PrefixCacheRef
from prefix_caches import Manifest
from prefix_caches.store import CacheStatus

SYSTEM = {"role": "system", "content": "Be brief."}
USER = {"role": "user", "content": "hi"}


def chatml(messages: Sequence[Mapping[str, object]], add_generation_prompt: bool) -> str:
    text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")


def folds_system(messages: Sequence[Mapping[str, object]], add_generation_prompt: bool) -> str:
    system = "".join(str(m["content"]) + "\n\n" for m in messages if m["role"] == "system")
    rest = [m for m in messages if m["role"] != "system"]
    if not rest:
        return f"<s>{system}"
    out, first = "<s>", True
    for m in rest:
        if m["role"] == "user":
            out += f"[INST] {system if first else ''}{m['content']} [/INST]"
            first = False
        else:
            out += f"{m['content']}</s>"
    return out


class CharTokenizer:
    def __init__(self, template: object) -> None:
        self.template = template

    def encode(self, text: str) -> list[int]:
        return [ord(c) for c in text]

    def encode_after(self, prefix_text: str, prefix_tokens: Sequence[int], text: str) -> list[int]:
        return self.encode(text)  # no special tokens: the whole text, as the real one does at a plain boundary

    def decode(self, tokens: Sequence[int]) -> str:
        return "".join(chr(t) for t in tokens)

    def render_chat(
        self, messages: Sequence[Mapping[str, object]], *, add_generation_prompt: bool, tools: object = None
    ) -> str:
        return self.template(messages, add_generation_prompt)  # type: ignore[operator]

    @property
    def vocab_size(self) -> int:
        return 0x110000


class OneCacheStore:
    def __init__(self, manifest: Manifest) -> None:
        self.manifest = manifest

    def get(self, tenant: str, name: str) -> Manifest:
        return self.manifest

    def status(self, tenant: str, name: str) -> CacheStatus:
        return CacheStatus()


def plan(template: object, messages: list[dict], on_mismatch: str = "error"):  # noqa: ANN201
    tok = CharTokenizer(template)
    cached = [SYSTEM]
    tokens = tok.encode(tok.render_chat(cached, add_generation_prompt=False))
    manifest = Manifest(
        name="sys",
        tenant="default",
        model="m",
        model_fingerprint="",
        tokenizer_fingerprint="",
        chat_template_fingerprint="",
        mlx_version="",
        mlx_lm_version="",
        source="messages",
        messages=cached,
        tokens=tokens,
        tokens_sha256="",
    )
    req = ChatCompletionRequest(
        model="m",
        messages=[ChatMessage(**m) for m in messages],
        max_tokens=4,
        prefix_cache=PrefixCacheRef(name="sys", on_mismatch=on_mismatch),  # type: ignore[arg-type]
    )
    store = OneCacheStore(manifest)
    return plan_chat(req, tok, ModelConfig(name="m", path="m"), 4096, "default", store), tokens  # type: ignore[arg-type]


@pytest.mark.parametrize(("messages", "form"), [([SYSTEM, USER], "resent"), ([USER], "prepended")])
def test_consistent_template_reuses_the_whole_cache(messages: list[dict], form: str) -> None:
    planned, cached = plan(chatml, messages)
    (p,) = planned.plans
    assert planned.prefix_form == form and planned.prefix_miss_reason is None
    assert p.prefix is not None and p.prefix.reuse == len(cached)
    assert list(p.prompt_tokens) == CharTokenizer(chatml).encode(chatml([SYSTEM, USER], True))


@pytest.mark.parametrize(("messages", "form"), [([SYSTEM, USER], "resent"), ([USER], "prepended")])
def test_template_that_renders_the_cache_differently_is_a_mismatch(messages: list[dict], form: str) -> None:
    with pytest.raises(InvalidRequest) as err:
        plan(folds_system, messages)
    assert err.value.code == "prefix_cache_mismatch" and err.value.param == "prefix_cache"
    assert "'sys'" in str(err.value) and "position 3 of" in str(err.value)
    planned, _ = plan(folds_system, messages, on_mismatch="recompute")
    (p,) = planned.plans
    assert p.prefix is None and planned.prefix_miss_reason == "mismatch: recomputed"
    assert planned.prefix_form == form
    assert list(p.prompt_tokens) == CharTokenizer(folds_system).encode(folds_system([SYSTEM, USER], True))
