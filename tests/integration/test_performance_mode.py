"""performance mode: automatic prefix reuse within one tenant, never across tenants, off for requests
that name a prefix cache; reuse reported in cached_tokens and giving the same tokens."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.greedy import assert_same_greedy
from tests.servers import Server, run_server

SHARED = "You review pull requests for a payments team. " * 20
ALPHA = {"Authorization": "Bearer key-alpha"}
BETA = {"Authorization": "Bearer key-beta"}


@pytest.fixture()
def perf(models_dir: Path, log_dir: Path, tmp_path: Path) -> Iterator[Server]:
    env = {"MLX_GATEWAY_ISOLATION_MODE": "performance", "MLX_GATEWAY_API_KEYS": "key-alpha:alpha,key-beta:beta"}
    args = ["--model", "tiny", "--cache-dir", str(tmp_path / "caches")]
    with run_server(args, models_dir=models_dir, log_dir=log_dir, env=env) as s:
        yield s


def chat(server: Server, headers: dict[str, str], question: str) -> dict:
    r = httpx.post(
        f"{server.v1}/chat/completions",
        headers=headers,
        timeout=60,
        json={
            "model": "tiny",
            "max_tokens": 12,
            "temperature": 0,
            "logprobs": True,
            "top_logprobs": 5,
            "logit_bias": {"0": -100, "2": -100},
            "messages": [{"role": "system", "content": SHARED}, {"role": "user", "content": question}],
        },
    )
    assert r.status_code == 200, r.text
    return r.json()


def items(resp: dict) -> list:
    return [
        (t["token"], t["logprob"], [(x["token"], x["logprob"]) for x in t["top_logprobs"]])
        for t in resp["choices"][0]["logprobs"]["content"]
    ]


def test_reuse_within_a_tenant_only(perf: Server) -> None:
    assert httpx.get(f"{perf.url}/health").json()["models"]["tiny"]["isolation_mode"] == "performance"
    first = chat(perf, ALPHA, "first question")
    assert first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    second = chat(perf, ALPHA, "second question")
    cached = second["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert cached >= 100  # the shared system prompt came from alpha's first request
    # Another tenant with the very same prompt gets nothing of alpha's.
    other = chat(perf, BETA, "second question")
    assert other["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    # Reuse changes nothing in the answer (equal up to float rounding ties).
    assert_same_greedy(items(other), items(second))
    # A request that names a prefix cache uses that cache only.
    r = httpx.post(
        f"{perf.url}/admin/prefix-caches",
        headers=ALPHA,
        timeout=60,
        json={"name": "other", "model": "tiny", "prompt": "unrelated prefix text"},
    )
    assert r.status_code == 201
    named = httpx.post(
        f"{perf.v1}/completions",
        headers=ALPHA,
        timeout=60,
        json={"model": "tiny", "prompt": "x", "max_tokens": 2, "prefix_cache": "other"},
    ).json()
    assert named["usage"]["prompt_tokens_details"]["cached_tokens"] == r.json()["num_tokens"]
