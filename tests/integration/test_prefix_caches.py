"""Named prefix caches through the real server: the admin API, the seed aliases, and using a cache from
the openai SDK on both endpoints."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import openai
import pytest
from mlx_lm.tokenizer_utils import load as load_tokenizer

from adapters.mlx_lm.presets import build_model
from tests.greedy import assert_same_greedy
from tests.integration.test_wire import assert_error, sse_events
from tests.servers import Server

SYSTEM = "You are a careful assistant for a Python team. " + "Follow PEP 8 and explain your reasoning. " * 40
NO_EOS = {"0": -100, "2": -100}


def create(server: Server, name: str, headers: dict[str, str] | None = None, **body: object) -> httpx.Response:
    payload = {"name": name, "model": "tiny", **body}
    if "prompt" not in body and "messages" not in body:
        payload["messages"] = [{"role": "system", "content": SYSTEM}]
    return httpx.post(f"{server.url}/admin/prefix-caches", json=payload, headers=headers or {}, timeout=60)


def test_admin_crud(server: Server) -> None:
    r = create(server, "crud-sys")
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["id"] == "crud-sys" and body["object"] == "prefix_cache" and body["status"] == "ready"
    assert body["num_tokens"] > 300 and body["size_bytes"] > 0 and body["source"] == "messages"
    assert body["mlx_lm_version"] == "0.32.2" and body["hits"] == 0
    assert_error(create(server, "crud-sys"), 409, "invalid_request_error", "prefix_cache_exists")
    replaced = create(server, "crud-sys", prompt="a different prefix", replace=True)
    assert replaced.status_code == 201 and replaced.json()["source"] == "prompt"
    listing = httpx.get(f"{server.url}/admin/prefix-caches", timeout=30).json()
    assert listing["object"] == "list" and "crud-sys" in [c["id"] for c in listing["data"]]
    one = httpx.get(f"{server.url}/admin/prefix-caches/crud-sys", timeout=30).json()
    assert one["num_tokens"] == replaced.json()["num_tokens"] and one["integrity"] is None
    deleted = httpx.delete(f"{server.url}/admin/prefix-caches/crud-sys", timeout=30)
    assert deleted.status_code == 200 and deleted.json() == {
        "id": "crud-sys",
        "object": "prefix_cache.deleted",
        "deleted": True,
    }
    missing = httpx.get(f"{server.url}/admin/prefix-caches/crud-sys", timeout=30)
    assert_error(missing, 404, "invalid_request_error", "prefix_cache_not_found")
    again = httpx.delete(f"{server.url}/admin/prefix-caches/crud-sys", timeout=30)
    assert_error(again, 404, "invalid_request_error", "prefix_cache_not_found")


def test_streamed_create_sends_progress_then_the_cache(server: Server) -> None:
    prompt = " ".join(["self", "value", "the", "return"] * 300)  # 1,200 tokens: several prefill chunks
    url = f"{server.url}/admin/prefix-caches"
    r = httpx.post(url, json={"name": "streamed", "model": "tiny", "prompt": prompt, "stream": True}, timeout=60)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    *progress, built = [json.loads(e) for e in events[:-1]]
    assert len(progress) >= 2 and all(set(p) == {"id", "object", "done", "total"} for p in progress)
    assert {(p["id"], p["object"], p["total"]) for p in progress} == {("streamed", "prefix_cache.progress", 1200)}
    done = [p["done"] for p in progress]
    assert done == sorted(set(done)) and done[-1] == 1200 and all(d % done[0] == 0 for d in done[:-1])
    # The last event is the cache, as the non-streamed answer and GET give it.
    assert built == httpx.get(f"{url}/streamed", timeout=30).json()
    assert built["object"] == "prefix_cache" and built["status"] == "ready" and built["num_tokens"] == 1200
    # Errors known before the build starts (the engine's refusal too) are plain JSON errors, not streams.
    again = {"name": "streamed", "model": "tiny", "prompt": "x", "stream": True}
    assert_error(httpx.post(url, json=again, timeout=30), 409, "invalid_request_error", "prefix_cache_exists")
    nope = {"name": "s2", "model": "nope", "prompt": "x", "stream": True}
    assert_error(httpx.post(url, json=nope, timeout=30), 404, "invalid_request_error", "model_not_found")
    kv = {"name": "s2", "model": "tiny", "prompt": "x", "stream": True, "kv_bits": 8, "kv_group_size": 64}
    assert_error(httpx.post(url, json=kv, timeout=30), 400, "invalid_request_error", "invalid_kv_settings")
    assert httpx.delete(f"{url}/streamed", timeout=30).status_code == 200


def test_warm_wire(server: Server) -> None:
    assert create(server, "warm-wire", prompt="a short prefix").status_code == 201
    r = httpx.post(f"{server.url}/admin/prefix-caches/warm-wire/warm", timeout=30)
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"id", "object", "was_resident", "load_ms", "bytes_in_memory"}
    assert body["id"] == "warm-wire" and body["object"] == "prefix_cache.warmed"
    assert body["was_resident"] is True and body["bytes_in_memory"] > 0  # a cache just built stays in memory
    missing = httpx.post(f"{server.url}/admin/prefix-caches/never-built/warm", timeout=30)
    assert_error(missing, 404, "invalid_request_error", "prefix_cache_not_found")
    bad = httpx.post(f"{server.url}/admin/prefix-caches/.bad/warm", timeout=30)
    assert_error(bad, 400, "invalid_request_error", "invalid_prefix_cache_name")
    assert httpx.delete(f"{server.url}/admin/prefix-caches/warm-wire", timeout=30).status_code == 200


@pytest.mark.parametrize("name", ["../escape", "a/b", ".hidden", "-dash", "x" * 129, "", "sp ace", "a.json"])
def test_bad_names_are_400(server: Server, name: str) -> None:
    assert_error(create(server, name), 400, "invalid_request_error", "invalid_prefix_cache_name")
    assert not any(c["id"] == name for c in httpx.get(f"{server.url}/admin/prefix-caches").json()["data"])


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({"name": "x1", "model": "nope", "prompt": "a"}, 404, "model_not_found"),
        ({"name": "x1", "model": "tiny"}, 400, None),
        ({"name": "x1", "model": "tiny", "prompt": "a", "messages": [{"role": "user", "content": "b"}]}, 400, None),
        ({"name": "x1", "model": "tiny", "prompt": "a", "kv_bits": 3}, 400, None),
        ({"name": "x1", "model": "tiny", "prompt": "a", "kv_bits": 8, "kv_group_size": 64}, 400, "invalid_kv_settings"),
        ({"name": "x1", "model": "tiny", "prompt": "a", "typo_field": 1}, 400, None),
        ({"name": "x1", "model": "tiny", "prompt": ""}, 400, None),
        ({"name": "x1", "model": "tiny-short", "prompt": "word " * 100}, 400, "context_length_exceeded"),
    ],
)
def test_bad_create_requests(server: Server, body: dict, status: int, code: str | None) -> None:
    r = httpx.post(f"{server.url}/admin/prefix-caches", json=body, timeout=30)
    err = assert_error(r, status, "invalid_request_error", code)
    assert err["message"]


def test_a_prefix_too_long_to_fit_is_refused_before_it_is_tokenised(server: Server) -> None:
    """More characters than the context could hold at gateway.limits.MAX_CHARS_PER_TOKEN a token: refused
    without tokenising (a 16 MiB prompt once took about a minute to tokenise first)."""
    body = {"name": "x1", "model": "tiny-short", "prompt": "x" * (64 * 32 + 1)}
    r = httpx.post(f"{server.url}/admin/prefix-caches", json=body, timeout=30)
    err = assert_error(r, 400, "invalid_request_error", "context_length_exceeded")
    assert err["param"] == "prompt" and "characters" in err["message"]


def chat_items(r: object) -> list[tuple[str, float, list[tuple[str, float]]]]:
    content = r.choices[0].logprobs.content  # type: ignore[attr-defined]
    return [(t.token, t.logprob, [(x.token, x.logprob) for x in t.top_logprobs]) for t in content]


def completion_items(r: object) -> list[tuple[str, float, list[tuple[str, float]]]]:
    lp = r.choices[0].logprobs  # type: ignore[attr-defined]
    return [(t, p, list(top.items())) for t, p, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True)]


def test_chat_with_cache_matches_full_prompt(server: Server, client: openai.OpenAI) -> None:
    assert create(server, "chat-sys").status_code == 201
    user = [{"role": "user", "content": "How do I sort a dict by value?"}]
    common = {"max_tokens": 16, "temperature": 0, "logprobs": True, "top_logprobs": 5, "logit_bias": NO_EOS}
    full = client.chat.completions.create(
        model="tiny", messages=[{"role": "system", "content": SYSTEM}, *user], **common
    )
    raw = client.chat.completions.with_raw_response.create(
        model="tiny", messages=user, extra_body={"prefix_cache": "chat-sys"}, **common
    )
    hit = raw.parse()
    header = raw.headers["x-prefix-cache"]
    assert header.startswith("name=chat-sys; form=prepended; hit=true; cached_tokens=") and "load_ms=" in header
    assert hit.usage is not None and full.usage is not None
    assert hit.usage.prompt_tokens == full.usage.prompt_tokens
    assert hit.usage.prompt_tokens_details.cached_tokens == int(header.split("cached_tokens=")[1].split(";")[0]) > 300
    assert_same_greedy(chat_items(full), chat_items(hit))


def test_completion_with_cache_continues_the_prefix(server: Server, client: openai.OpenAI, models_dir: Path) -> None:
    prefix = "import os\nimport sys\n\n" + "def helper(value):\n    return value * 2\n\n" * 30
    assert create(server, "code-prefix", prompt=prefix).status_code == 201
    # For completions the prompt's tokens follow the cache's tokens (the cache is a token prefix).
    tok = load_tokenizer(build_model("tiny", models_dir=models_dir))
    ids = tok.encode(prefix, add_special_tokens=False) + tok.encode("def main(", add_special_tokens=False)
    common = {"max_tokens": 12, "temperature": 0, "logit_bias": NO_EOS, "logprobs": 5}
    full = client.completions.create(model="tiny", prompt=ids, **common)
    hit = client.completions.create(
        model="tiny", prompt="def main(", extra_body={"prefix_cache": {"name": "code-prefix"}}, **common
    )
    assert_same_greedy(completion_items(full), completion_items(hit))
    assert hit.usage is not None and full.usage is not None
    assert hit.usage.prompt_tokens == full.usage.prompt_tokens
    cached = hit.usage.prompt_tokens_details.cached_tokens  # type: ignore[union-attr]
    assert cached == len(ids) - len(tok.encode("def main(", add_special_tokens=False))
    # Streaming gives the same text, and its usage chunk reports the reuse too.
    body = {
        "model": "tiny",
        "prompt": "def main(",
        "prefix_cache": "code-prefix",
        "stream": True,
        "stream_options": {"include_usage": True},
        **common,
    }
    r = httpx.post(f"{server.v1}/completions", json=body, timeout=30)
    chunks = [json.loads(e) for e in sse_events(r.text)[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == hit.choices[0].text
    assert chunks[-1]["usage"]["prompt_tokens_details"]["cached_tokens"] == cached
    assert "hit=true" in r.headers["x-prefix-cache"]


def test_exact_hit_leaves_the_last_token(server: Server) -> None:
    assert create(server, "exact", prompt="print('hello world')").status_code == 201
    cached = httpx.get(f"{server.url}/admin/prefix-caches/exact").json()["num_tokens"]
    r = httpx.post(
        f"{server.v1}/completions",
        timeout=30,
        json={"model": "tiny", "prompt": "", "max_tokens": 4, "temperature": 0, "prefix_cache": "exact"},
    )
    assert r.status_code == 200, r.text
    usage = r.json()["usage"]
    assert usage["prompt_tokens"] == cached and usage["prompt_tokens_details"]["cached_tokens"] == cached - 1
    plain = httpx.post(
        f"{server.v1}/completions",
        timeout=30,
        json={"model": "tiny", "prompt": "print('hello world')", "max_tokens": 4, "temperature": 0},
    ).json()
    assert r.json()["choices"][0]["text"] == plain["choices"][0]["text"]


def test_unknown_cache_and_mismatch(server: Server) -> None:
    r = httpx.post(
        f"{server.v1}/chat/completions",
        timeout=30,
        json={"model": "tiny", "messages": [{"role": "user", "content": "x"}], "prefix_cache": "no-such-cache"},
    )
    assert_error(r, 404, "invalid_request_error", "prefix_cache_not_found", "prefix_cache")
    # A prompt-built cache used by a chat request whose rendering does not start with it.
    assert create(server, "not-a-chat-prefix", prompt="zzz unrelated text").status_code == 201
    body = {
        "model": "tiny",
        "messages": [{"role": "user", "content": "x"}],
        "max_tokens": 3,
        "temperature": 0,
        "prefix_cache": "not-a-chat-prefix",
    }
    r = httpx.post(f"{server.v1}/chat/completions", json=body, timeout=30)
    err = assert_error(r, 400, "invalid_request_error", "prefix_cache_mismatch", "prefix_cache")
    assert "position 0" in err["message"]
    body["prefix_cache"] = {"name": "not-a-chat-prefix", "on_mismatch": "recompute"}
    r = httpx.post(f"{server.v1}/chat/completions", json=body, timeout=30)
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert "hit=false" in r.headers["x-prefix-cache"] and "mismatch" in r.headers["x-prefix-cache"]
    wrong_model = {**body, "model": "tiny-short", "prefix_cache": "not-a-chat-prefix"}
    r = httpx.post(f"{server.v1}/chat/completions", json=wrong_model, timeout=30)
    assert_error(r, 400, "invalid_request_error", "prefix_cache_mismatch", "prefix_cache")
    bad = {**body, "prefix_cache": {"name": "x", "on_mismatch": "explode"}}
    assert_error(httpx.post(f"{server.v1}/chat/completions", json=bad, timeout=30), 400, "invalid_request_error", None)


def test_seed_api_aliases(server: Server) -> None:
    r = httpx.post(
        f"{server.v1}/prefix-cache/create",
        timeout=30,
        json={"model": "tiny", "cache_name": "seed-cache", "prefix_prompt": "You are a poet. " * 20},
    )
    assert r.status_code == 201 and r.json()["id"] == "seed-cache"
    names = [c["id"] for c in httpx.get(f"{server.v1}/prefix-cache/list", timeout=30).json()["data"]]
    assert "seed-cache" in names
    plain = httpx.post(
        f"{server.v1}/generate",
        timeout=30,
        json={"model": "tiny", "prompt": "You are a poet. " * 20 + "Write:", "max_tokens": 8, "temperature": 0},
    ).json()
    hit = httpx.post(
        f"{server.v1}/generate-with-prefix",
        timeout=30,
        json={
            "model": "tiny",
            "cache_name": "seed-cache",
            "prompt": "Write:",
            "max_tokens": 8,
            "temperature": 0,
            "stop_strings": ["\x00"],
        },
    ).json()
    assert hit["text"] == plain["text"] and hit["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
    assert hit["cache_name"] == "seed-cache" and plain["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert httpx.delete(f"{server.v1}/prefix-cache/seed-cache", timeout=30).status_code == 200
    r = httpx.post(
        f"{server.v1}/generate-with-prefix",
        timeout=30,
        json={"model": "tiny", "cache_name": "seed-cache", "prompt": "x"},
    )
    assert_error(r, 404, "invalid_request_error", "prefix_cache_not_found")


def test_health_reports_cache_statistics(server: Server) -> None:
    h = httpx.get(f"{server.url}/health", timeout=30).json()
    assert h["isolation_enabled"] is True
    stats = h["prefix_caches"]
    keys = {"count", "bytes_on_disk", "bytes_in_memory", "resident", "hits", "misses", "loads", "recomputes"}
    keys.add("load_bytes_per_second")
    assert set(stats) == keys
    assert stats["count"] >= 0 and stats["hits"] >= 0


def test_tenants_never_see_each_other(auth_server: Server) -> None:
    alpha = {"Authorization": "Bearer key-alpha"}
    beta = {"Authorization": "Bearer key-beta"}
    admin = {"Authorization": "Bearer admin-secret"}
    assert create(auth_server, "team-prompt", headers=alpha).status_code == 201
    # Beta cannot list, read, use or delete it; the answer is the same as for a name that never existed.
    listing = httpx.get(f"{auth_server.url}/admin/prefix-caches", headers=beta).json()
    assert "team-prompt" not in [c["id"] for c in listing["data"]]
    assert_error(
        httpx.get(f"{auth_server.url}/admin/prefix-caches/team-prompt", headers=beta),
        404,
        "invalid_request_error",
        "prefix_cache_not_found",
    )
    use = {
        "model": "tiny",
        "messages": [{"role": "user", "content": "x"}],
        "max_tokens": 2,
        "prefix_cache": "team-prompt",
    }
    assert_error(
        httpx.post(f"{auth_server.v1}/chat/completions", json=use, headers=beta, timeout=30),
        404,
        "invalid_request_error",
        "prefix_cache_not_found",
    )
    assert httpx.delete(f"{auth_server.url}/admin/prefix-caches/team-prompt", headers=beta).status_code == 404
    assert httpx.post(f"{auth_server.v1}/chat/completions", json=use, headers=alpha, timeout=30).status_code == 200
    # Beta may have its own cache of the same name.
    assert create(auth_server, "team-prompt", headers=beta, prompt="beta's own").status_code == 201
    a = httpx.get(f"{auth_server.url}/admin/prefix-caches/team-prompt", headers=alpha).json()
    b = httpx.get(f"{auth_server.url}/admin/prefix-caches/team-prompt", headers=beta).json()
    assert a["source"] == "messages" and b["source"] == "prompt"
    # A tenant key cannot act for another tenant; the admin key can.
    r = httpx.get(f"{auth_server.url}/admin/prefix-caches?tenant=alpha", headers=beta)
    assert r.status_code == 403 and r.json()["error"]["type"] == "permission_error"
    r = httpx.get(f"{auth_server.url}/admin/prefix-caches?tenant=alpha", headers=admin)
    assert [c["id"] for c in r.json()["data"]] == ["team-prompt"]
    assert_error(httpx.get(f"{auth_server.url}/admin/prefix-caches"), 401, "authentication_error", "invalid_api_key")
