"""Isolation, proven on the real server: each test would fail if any state leaked between requests,
between a request and a stored cache, or across a restart.

The seed's promises: no context leakage between requests, clean state per generation, cache
isolation, regular-generation isolation, persistence across restarts.
"""

from __future__ import annotations

import concurrent.futures
import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.greedy import assert_same_greedy
from tests.servers import Server, run_server

SYSTEM = "You are the reviewer of a payments service. Secret policy: " + "never log card numbers. " * 60
NO_EOS = {"0": -100, "2": -100}


@pytest.fixture()
def fresh(models_dir: Path, log_dir: Path, tmp_path: Path) -> Iterator[tuple[Server, Path]]:
    """A server of its own (nothing has run on it yet, default isolation mode) and its cache directory."""
    cache_dir = tmp_path / "caches"
    with run_server(["--model", "tiny", "--cache-dir", str(cache_dir)], models_dir=models_dir, log_dir=log_dir) as s:
        yield s, cache_dir


@pytest.fixture()
def fresh_strict(models_dir: Path, log_dir: Path, tmp_path: Path) -> Iterator[tuple[Server, Path]]:
    cache_dir = tmp_path / "caches"
    env = {"MLX_GATEWAY_ISOLATION_MODE": "strict"}
    args = ["--model", "tiny", "--cache-dir", str(cache_dir)]
    with run_server(args, models_dir=models_dir, log_dir=log_dir, env=env) as s:
        yield s, cache_dir


def create(server: Server, name: str, **body: object) -> dict:
    payload = {"name": name, "model": "tiny", **body}
    if "prompt" not in body and "messages" not in body:
        payload["messages"] = [{"role": "system", "content": SYSTEM}]
    r = httpx.post(f"{server.url}/admin/prefix-caches", json=payload, timeout=120)
    assert r.status_code == 201, r.text
    return r.json()


def chat(server: Server, content: str, cache: str | None = None, **extra: object) -> dict:
    body: dict = {
        "model": "tiny",
        "messages": [{"role": "user", "content": content}],
        "max_tokens": 24,
        "temperature": 0,
        "logprobs": True,
        "top_logprobs": 5,
        "logit_bias": NO_EOS,
        **extra,
    }
    if cache:
        body["prefix_cache"] = cache
    r = httpx.post(f"{server.v1}/chat/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def fingerprint(resp: dict) -> list:
    """Tokens and every logprob (sampled and top-5), compared bit for bit."""
    out = []
    for choice in resp["choices"]:
        for t in choice["logprobs"]["content"]:
            out.append((t["token"], t["logprob"], [(x["token"], x["logprob"]) for x in t["top_logprobs"]]))
    return out


def warm(server: Server, name: str) -> None:
    """Read the cache's file into memory now. Left cold, a request may recompute its tokens instead, when
    reading was measured dearer than prefilling (a loaded machine's slow reads can make it so)."""
    r = httpx.post(f"{server.url}/admin/prefix-caches/{name}/warm", timeout=60)
    assert r.status_code == 200 and r.json()["was_resident"] is False, r.text


def digests(server: Server, name: str) -> tuple[str, str]:
    info = httpx.get(f"{server.url}/admin/prefix-caches/{name}?verify=true", timeout=60).json()["integrity"]
    assert info["ok"], info
    return info["arrays_sha256"], info["file_sha256"]


def test_strict_same_request_is_bit_identical_whatever_ran_before_or_beside(
    fresh_strict: tuple[Server, Path], models_dir: Path, log_dir: Path
) -> None:
    """strict mode's promise: tokens and logprobs bit-identical alone, beside any other traffic, and after a
    restart with the cache read from disk (on one machine: docs/how-it-works.md, "What is bit-identical")."""
    server, cache_dir = fresh_strict
    assert httpx.get(f"{server.url}/health").json()["models"]["tiny"]["isolation_mode"] == "strict"
    created = create(server, "policy")
    question = "Review this function for logging issues."
    first = fingerprint(chat(server, question, "policy"))  # the very first generation on this server
    seeded_first = chat(server, question, "policy", temperature=1.0, seed=99)["choices"][0]["message"]["content"]

    # Unrelated requests (no cache, other content, long outputs) leave nothing behind.
    for i in range(3):
        chat(server, f"unrelated request {i} " * 30, max_tokens=40)
    assert fingerprint(chat(server, question, "policy")) == first

    # Other requests on the same cache, with other suffixes, leave nothing behind either.
    for i in range(3):
        chat(server, f"another question {i} about card numbers", "policy", max_tokens=40)
    assert fingerprint(chat(server, question, "policy")) == first

    # Interleaved with concurrent requests (the engine steps them round-robin).
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        noise = [pool.submit(chat, server, f"noise {i}", "policy" if i % 2 else None, max_tokens=60) for i in range(5)]
        target = pool.submit(chat, server, question, "policy")
        seeded = pool.submit(chat, server, question, "policy", temperature=1.0, seed=99)
        for f in noise:
            f.result()
        assert fingerprint(target.result()) == first
        assert seeded.result()["choices"][0]["message"]["content"] == seeded_first

    server.process.terminate()
    server.process.wait(20)
    env = {"MLX_GATEWAY_ISOLATION_MODE": "strict"}
    args = ["--model", "tiny", "--cache-dir", str(cache_dir)]
    with run_server(args, models_dir=models_dir, log_dir=log_dir, env=env) as s2:
        warm(s2, "policy")
        cold = chat(s2, question, "policy")
        assert cold["usage"]["prompt_tokens_details"]["cached_tokens"] == created["num_tokens"]
        assert fingerprint(cold) == first


def test_no_context_leaks_into_regular_generation(fresh: tuple[Server, Path]) -> None:
    server, _ = fresh
    baseline = fingerprint(chat(server, "hello"))
    create(server, "policy")
    chat(server, "tell me the secret policy", "policy", max_tokens=50)
    chat(server, "my card number is 4111 1111 1111 1111", max_tokens=50)
    # A request without a cache sees only its own prompt: no conversation history, no reuse.
    after = chat(server, "hello")
    assert fingerprint(after) == baseline
    assert after["usage"]["prompt_tokens_details"]["cached_tokens"] == 0


def test_stored_cache_never_changes(fresh: tuple[Server, Path], models_dir: Path, log_dir: Path) -> None:
    """The stored cache's arrays never change with use or across a restart, and a request that decodes
    alone answers the same bits before and after the restart, its cache resident or read from disk."""
    server, cache_dir = fresh
    # MKL's own conditions for run-to-run identical results (adapters/mlx_lm/blas.py): this server meets them.
    if "BLAS mkl" in server.log_text():
        assert "MKL in its reproducible mode: MKL_CBWR=" in server.log_text()
    created = create(server, "policy")
    arrays_before, file_before = digests(server, "policy")
    first = chat(server, "final question", "policy")  # the server's first generation: a batch of its own
    for i in range(8):
        chat(server, f"question number {i}", "policy", max_tokens=30)
    stream = httpx.post(
        f"{server.v1}/completions",
        timeout=60,
        json={"model": "tiny", "prompt": "x", "max_tokens": 30, "prefix_cache": "policy", "n": 2, "temperature": 1},
    )
    assert stream.status_code == 200
    assert digests(server, "policy") == (arrays_before, file_before)
    # Used many times, the cache still gives the same answer. Bit for bit only once a batch drops its slots
    # when its last sequence ends (test_a_request_alone_answers_the_same_bits_whatever_ran_before): until
    # then this request decodes in the two rows the n=2 request left, and two rows round otherwise than one
    # (on an Intel Xeon's MKL path; on this AMD EPYC's only from four rows on).
    assert_same_greedy(fingerprint(first), fingerprint(chat(server, "final question", "policy")))
    server.process.terminate()
    server.process.wait(20)
    # Persistence across restarts: same file, same arrays once loaded, same answer, counted hits.
    with run_server(["--model", "tiny", "--cache-dir", str(cache_dir)], models_dir=models_dir, log_dir=log_dir) as s2:
        listed = httpx.get(f"{s2.url}/admin/prefix-caches/policy", timeout=30).json()
        assert listed["status"] == "ready" and listed["num_tokens"] == created["num_tokens"]
        assert listed["hits"] >= 10  # hit counters were flushed to the manifest
        warm(s2, "policy")
        again = chat(s2, "final question", "policy")
        assert again["usage"]["prompt_tokens_details"]["cached_tokens"] == created["num_tokens"]
        assert fingerprint(again) == fingerprint(first)  # alone in a batch both times: bit for bit
        assert digests(s2, "policy") == (arrays_before, file_before)


def test_a_request_alone_answers_the_same_bits_whatever_ran_before(fresh: tuple[Server, Path]) -> None:
    """balanced mode: a request that decodes with no other sequence beside it answers the same bits as it
    did alone before, whatever ran earlier (here a request with n=4, which needs four slots)."""
    server, _ = fresh
    create(server, "policy")
    alone = fingerprint(chat(server, "final question", "policy"))
    wide = {"model": "tiny", "prompt": "x", "max_tokens": 30, "n": 4, "temperature": 1}
    assert httpx.post(f"{server.v1}/completions", json=wide, timeout=60).status_code == 200
    assert fingerprint(chat(server, "final question", "policy")) == alone


def test_cache_plus_suffix_equals_full_prompt(fresh: tuple[Server, Path]) -> None:
    server, _ = fresh
    create(server, "policy")
    for question in ("What does the policy forbid?", "Summarise it.", "x"):
        hit = chat(server, question, "policy")
        full = chat(
            server, question, messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]
        )
        assert hit["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
        assert full["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
        # The same greedy tokens, float32 logprobs within 1e-4 (a divergence only at an exact tie).
        assert_same_greedy(fingerprint(full), fingerprint(hit))


def test_quantised_caches_agreement(fresh: tuple[Server, Path]) -> None:
    """q8 and q4 KV against full precision: the greedy-token agreement rate is measured and printed."""
    server, _ = fresh
    create(server, "fp")
    q8 = create(server, "q8", kv_bits=8, kv_group_size=32)
    q4 = create(server, "q4", kv_bits=4, kv_group_size=32)
    full_size = httpx.get(f"{server.url}/admin/prefix-caches/fp").json()["size_bytes"]
    assert q8["size_bytes"] < 0.55 * full_size and q4["size_bytes"] < 0.35 * full_size
    questions = [f"Question {i}: what about case {i * 7}?" for i in range(10)]
    agree = {"q8": 0, "q4": 0}
    tokens = {"q8": 0, "q4": 0}
    for q in questions:
        ref = [t[0] for t in fingerprint(chat(server, q, "fp", max_tokens=16))]
        for name in ("q8", "q4"):
            got = [t[0] for t in fingerprint(chat(server, q, name, max_tokens=16))]
            agree[name] += ref == got
            tokens[name] += sum(a == b for a, b in zip(ref, got, strict=True))
    print(
        f"\nquantised KV agreement over {len(questions)} prompts x 16 greedy tokens (tiny model): "
        f"q8 {agree['q8']}/{len(questions)} identical outputs, {tokens['q8'] / 160:.0%} of tokens; "
        f"q4 {agree['q4']}/{len(questions)}, {tokens['q4'] / 160:.0%} of tokens"
    )
    assert agree["q8"] >= 8  # q8 KV is close to lossless


def test_deleting_a_cache_in_use_does_not_break_the_request(fresh: tuple[Server, Path]) -> None:
    server, _ = fresh
    create(server, "policy")
    body = {
        "model": "tiny",
        "prompt": " go",
        "max_tokens": 400,
        "temperature": 0,
        "stream": True,
        "prefix_cache": "policy",
        "logit_bias": NO_EOS,
    }
    with httpx.stream("POST", f"{server.v1}/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        first = next(line for line in lines if line.startswith("data: {"))
        assert json.loads(first[6:])["choices"][0]["finish_reason"] is None
        assert httpx.delete(f"{server.url}/admin/prefix-caches/policy", timeout=30).status_code == 200
        data = [line[6:] for line in lines if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    assert "error" not in chunks[-1] and chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert httpx.get(f"{server.url}/admin/prefix-caches/policy").status_code == 404


def test_corrupt_file_is_never_used_and_is_rebuilt(fresh: tuple[Server, Path], models_dir: Path, log_dir: Path) -> None:
    server, cache_dir = fresh
    create(server, "policy")
    good = chat(server, "check", "policy")
    server.process.terminate()
    server.process.wait(20)
    (path,) = cache_dir.glob("tenant-*/policy.safetensors")
    data = bytearray(path.read_bytes())
    data[-100:] = b"\x7f" * 100  # garbage in the arrays, the header intact
    path.write_bytes(bytes(data))
    with run_server(["--model", "tiny", "--cache-dir", str(cache_dir)], models_dir=models_dir, log_dir=log_dir) as s2:
        r = httpx.post(
            f"{s2.v1}/chat/completions",
            timeout=60,
            json={
                "model": "tiny",
                "messages": [{"role": "user", "content": "check"}],
                "max_tokens": 24,
                "temperature": 0,
                "logprobs": True,
                "top_logprobs": 5,
                "logit_bias": NO_EOS,
                "prefix_cache": "policy",
            },
        )
        assert r.status_code == 200
        assert "hit=false" in r.headers["x-prefix-cache"]
        assert r.json()["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
        assert_same_greedy(fingerprint(good), fingerprint(r.json()))  # recomputed, correct
        deadline = time.monotonic() + 60  # rebuilt from the manifest's tokens, then used again
        while httpx.get(f"{s2.url}/admin/prefix-caches/policy").json()["status"] != "ready":
            assert time.monotonic() < deadline
            time.sleep(0.1)
        rebuilt = chat(s2, "check", "policy")
        assert rebuilt["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
        assert_same_greedy(fingerprint(good), fingerprint(rebuilt))


def test_cache_for_other_weights_is_rebuilt(
    fresh: tuple[Server, Path], models_dir: Path, log_dir: Path, tmp_path: Path
) -> None:
    server, cache_dir = fresh
    created = create(server, "policy")
    server.process.terminate()
    server.process.wait(20)
    # The same model name now serves other weights (seed 1): the stored KV must not be used.
    config = tmp_path / "c.toml"
    config.write_text('[[models]]\nname = "tiny"\npath = "tiny"\nseed = 1\n')
    args = ["--config", str(config), "--cache-dir", str(cache_dir)]
    with run_server(args, models_dir=models_dir, log_dir=log_dir) as s2:
        deadline = time.monotonic() + 60
        while (info := httpx.get(f"{s2.url}/admin/prefix-caches/policy").json())["status"] != "ready":
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert info["model_fingerprint"] != created["model_fingerprint"]
        hit = chat(s2, "check", "policy")
        full = chat(s2, "check", messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": "check"}])
        assert hit["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
        assert_same_greedy(fingerprint(full), fingerprint(hit))


def test_balanced_concurrency_leaks_nothing(fresh: tuple[Server, Path]) -> None:
    """balanced mode's promise: no data of one request reaches another; outputs may differ from a solo
    run only by float effects of batch shape. Measured here: how often greedy tokens differ."""
    server, _ = fresh
    assert httpx.get(f"{server.url}/health").json()["models"]["tiny"]["isolation_mode"] == "balanced"
    create(server, "policy")
    questions = [f"question {i}: " + "details " * (i * 5) for i in range(8)]
    solo = [fingerprint(chat(server, q, "policy" if i % 2 else None)) for i, q in enumerate(questions)]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        together = list(
            pool.map(lambda iq: fingerprint(chat(server, iq[1], "policy" if iq[0] % 2 else None)), enumerate(questions))
        )
    differing = 0
    for a, b in zip(solo, together, strict=True):
        assert_same_greedy(a, b)  # the same tokens and logprobs within 1e-4, parting only at a tie
        differing += [t[0] for t in a] != [t[0] for t in b]
    print(f"\nbalanced mode: {differing}/{len(questions)} greedy outputs differ from their solo run (ties only)")
