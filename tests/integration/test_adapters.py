"""Adapters per request on the real server and the real SmolLM2-135M, with adapters trained in the test setup by
``mlx_lm lora`` (``tests/lora_training.py``): each teaches one answer format the base model never writes, so
which adapter answered is checked by the answer's format.

Covered: adapters listed with their base, each request in a mixed batch answering with its own adapter (the
base model's requests untouched), a prefix cache built under one adapter never lending its KV to another,
tenants' adapters invisible to other tenants and counted against their quotas, registration that refuses
what it cannot serve, and unloading that lets running requests finish and takes its caches along.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.lora_training import HELD_OUT_QUESTIONS, check_format, trained_adapter
from tests.servers import Server, run_server

BASE = "smollm2-135m"
ADMIN = {"authorization": "Bearer admin-secret"}
ALPHA = {"authorization": "Bearer key-alpha"}
BETA = {"authorization": "Bearer key-beta"}

CONFIG = """
[tenants.beta]
max_adapters = 1
"""


@pytest.fixture(scope="module")
def trained(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    work = tmp_path_factory.mktemp("lora-runs")
    return {kind: trained_adapter(kind, models_dir, work) for kind in ("json", "shout")}


@pytest.fixture(scope="module")
def adapters_dir(trained: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The server's adapters directory: copies of the trained adapters, and a full fine-tune's files."""
    root = tmp_path_factory.mktemp("adapters-dir")
    for kind, path in trained.items():
        shutil.copytree(path, root / kind)
    full = root / "full"
    full.mkdir()
    config = json.loads((trained["json"] / "adapter_config.json").read_text())
    (full / "adapter_config.json").write_text(json.dumps({**config, "fine_tune_type": "full"}))
    shutil.copy(trained["json"] / "adapters.safetensors", full / "adapters.safetensors")
    return root


@pytest.fixture(scope="module")
def server(
    models_dir: Path, log_dir: Path, adapters_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    config = tmp_path_factory.mktemp("adapters-config") / "gateway.toml"
    config.write_text(CONFIG)
    env = {"MLX_GATEWAY_API_KEYS": "key-alpha:alpha,key-beta:beta", "MLX_GATEWAY_ADMIN_KEY": "admin-secret"}
    args = [
        "--config",
        str(config),
        "--cache-dir",
        str(tmp_path_factory.mktemp("adapters-caches")),
        "--adapter",
        f"json={adapters_dir / 'json'}",
        "--adapters-dir",
        str(adapters_dir),
    ]
    with run_server(args, models_dir=models_dir, log_dir=log_dir, env=env) as srv:
        yield srv


def client(server: Server, key: str = "key-alpha") -> openai.OpenAI:
    return openai.OpenAI(base_url=server.v1, api_key=key, max_retries=0)


def ask(server: Server, model: str, question: str, key: str = "key-alpha", **extra: Any) -> str:
    r = client(server, key).chat.completions.create(
        model=model, messages=[{"role": "user", "content": question}], temperature=0, max_tokens=24, **extra
    )
    return r.choices[0].message.content or ""


def register(server: Server, body: dict[str, Any], headers: dict[str, str] = ADMIN) -> httpx.Response:
    return httpx.post(f"{server.url}/admin/adapters", json=body, headers=headers, timeout=60)


def unregister(server: Server, name: str, headers: dict[str, str] = ADMIN) -> httpx.Response:
    return httpx.delete(f"{server.url}/admin/adapters/{name}", headers=headers, timeout=60)


def test_adapters_are_listed_with_their_base(server: Server) -> None:
    models = {m.id: m for m in client(server).models.list().data}
    assert models["json"].model_extra == {"parent": BASE, "root": BASE}
    assert not (models[BASE].model_extra or {}).get("parent")
    assert client(server).models.retrieve("json").model_extra == {"parent": BASE, "root": BASE}
    health = httpx.get(f"{server.url}/health").json()
    assert health["adapters"]["count"] >= 1 and health["adapters"]["bytes"] > 0


def test_each_request_in_a_mixed_batch_answers_with_its_own_adapter(server: Server) -> None:
    assert register(server, {"name": "shout", "path": "shout"}).status_code == 201  # every tenant's
    try:
        jobs = [(model, q) for q in HELD_OUT_QUESTIONS for model in ("json", "shout", BASE)]
        with ThreadPoolExecutor(len(jobs)) as pool:
            answers = list(pool.map(lambda job: ask(server, *job), jobs))
        for (model, question), answer in zip(jobs, answers, strict=True):
            if model == BASE:
                assert not check_format("json", answer) and not check_format("shout", answer), (question, answer)
            else:
                assert check_format(model, answer), (model, question, answer)
        # Alone, each gives what it gave in the batch's company (greedy; float rounding aside, same format).
        assert check_format("json", ask(server, "json", HELD_OUT_QUESTIONS[0]))
    finally:
        unregister(server, "shout")


def test_the_responses_api_and_completions_take_an_adapter(server: Server) -> None:
    r = client(server).responses.create(
        model="json", input=HELD_OUT_QUESTIONS[1], temperature=0, max_output_tokens=24, store=False
    )
    assert r.model == "json" and check_format("json", r.output_text), r.output_text
    c = client(server).completions.create(model="json", prompt="The sky is", max_tokens=4, temperature=0)
    assert c.model == "json" and c.choices[0].text


def test_a_cache_built_under_one_adapter_never_lends_its_kv_to_another(server: Server) -> None:
    system = {"role": "system", "content": "You are a concise assistant. Answer every question briefly. " * 4}
    built = httpx.post(
        f"{server.url}/admin/prefix-caches",
        json={"name": "under-json", "model": "json", "messages": [system]},
        headers=ALPHA,
        timeout=120,
    )
    assert built.status_code == 201, built.text
    assert built.json()["model"] == "json" and built.json()["adapter_fingerprint"]
    assert register(server, {"name": "shout2", "path": "shout"}).status_code == 201
    try:
        question = {"role": "user", "content": HELD_OUT_QUESTIONS[2]}
        common: dict[str, Any] = {"messages": [system, question], "temperature": 0, "max_tokens": 24}
        own = httpx.post(f"{server.v1}/chat/completions", json={"model": "shout2", **common}, headers=ALPHA, timeout=60)
        cache = {"name": "under-json", "on_mismatch": "recompute"}
        other = httpx.post(
            f"{server.v1}/chat/completions",
            json={"model": "shout2", "prefix_cache": cache, **common},
            headers=ALPHA,
            timeout=60,
        )
        assert own.status_code == other.status_code == 200, other.text
        answer = other.json()["choices"][0]["message"]["content"]
        assert answer == own.json()["choices"][0]["message"]["content"] and check_format("shout", answer)
        assert other.json()["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
        assert "built for model 'json': recomputed" in other.headers["x-prefix-cache"]
        refused = httpx.post(
            f"{server.v1}/chat/completions",
            json={"model": BASE, "prefix_cache": "under-json", **common},
            headers=ALPHA,
            timeout=60,
        )
        assert refused.status_code == 400 and refused.json()["error"]["code"] == "prefix_cache_mismatch"
        hit = httpx.post(
            f"{server.v1}/chat/completions",
            json={"model": "json", "prefix_cache": "under-json", **common},
            headers=ALPHA,
            timeout=60,
        )
        assert hit.json()["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
        assert check_format("json", hit.json()["choices"][0]["message"]["content"])
    finally:
        unregister(server, "shout2")


def test_a_tenants_adapter_is_a_404_to_other_tenants(server: Server) -> None:
    r = register(server, {"name": "alpha-json", "path": "json", "tenant": "alpha"})
    assert r.status_code == 201 and r.json()["tenant"] == "alpha" and r.json()["parent"] == BASE
    try:
        assert "alpha-json" in [m.id for m in client(server).models.list().data]
        assert "alpha-json" not in [m.id for m in client(server, "key-beta").models.list().data]
        with pytest.raises(openai.NotFoundError) as err:
            ask(server, "alpha-json", "Hi", key="key-beta")
        assert err.value.body["code"] == "model_not_found"  # type: ignore[index]
        with pytest.raises(openai.NotFoundError):
            client(server, "key-beta").models.retrieve("alpha-json")
        assert check_format("json", ask(server, "alpha-json", HELD_OUT_QUESTIONS[0]))
        # Beta cannot see it among its adapters, nor unload it.
        listed = httpx.get(f"{server.url}/admin/adapters", headers=BETA).json()["data"]
        assert "alpha-json" not in [a["id"] for a in listed]
        assert unregister(server, "alpha-json", BETA).status_code == 404
    finally:
        assert unregister(server, "alpha-json").status_code == 200


def test_a_tenant_registers_its_own_within_its_quota(server: Server) -> None:
    mine = register(server, {"name": "beta-shout", "path": "shout"}, BETA)
    assert mine.status_code == 201 and mine.json()["tenant"] == "beta"
    try:
        over = register(server, {"name": "beta-more", "path": "json"}, BETA)
        assert over.status_code == 403 and over.json()["error"]["code"] == "adapter_count_quota"
        assert "max_adapters 1" in over.json()["error"]["message"]
        other = register(server, {"name": "for-alpha", "path": "json", "tenant": "alpha"}, BETA)
        assert other.status_code == 403
        assert check_format("shout", ask(server, "beta-shout", HELD_OUT_QUESTIONS[3], key="key-beta"))
        with pytest.raises(openai.NotFoundError):
            ask(server, "beta-shout", "Hi", key="key-alpha")
    finally:
        assert unregister(server, "beta-shout", BETA).status_code == 200


@pytest.mark.parametrize(
    ("body", "status", "param", "words"),
    [
        ({"name": "x", "path": "../"}, 400, "path", "must lie in the server's adapters directory"),
        ({"name": "x", "path": "/etc"}, 400, "path", "must lie in the server's adapters directory"),
        ({"name": "x", "path": "missing"}, 400, "path", "No adapter directory"),
        ({"name": "x", "path": "full"}, 400, "path", "full fine-tune: it is a model, not an adapter"),
        ({"name": "x", "path": "shout", "base": "nope"}, 400, "base", "not served here"),
        ({"name": "json", "path": "shout"}, 409, "name", "configured adapter"),
        ({"name": BASE, "path": "shout"}, 409, "name", "model"),
        ({"name": "a/b", "path": "shout"}, 400, "name", "matching regex"),
    ],
)
def test_registration_refuses_what_it_cannot_serve(
    server: Server, body: dict[str, Any], status: int, param: str, words: str
) -> None:
    r = register(server, body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["param"] == param and words in error["message"]
    assert "x" not in [m.id for m in client(server).models.list().data]


def test_registration_needs_a_key(server: Server) -> None:
    assert register(server, {"name": "x", "path": "json"}, {}).status_code == 401


def test_unloading_lets_running_requests_finish_and_takes_its_caches(server: Server) -> None:
    assert register(server, {"name": "temp", "path": "json"}).status_code == 201
    built = httpx.post(
        f"{server.url}/admin/prefix-caches",
        json={"name": "under-temp", "model": "temp", "prompt": "Once upon a time"},
        headers=ALPHA,
        timeout=120,
    )
    assert built.status_code == 201, built.text
    stream = client(server).chat.completions.create(
        model="temp",
        messages=[{"role": "user", "content": "Write a long story about a dragon."}],
        max_tokens=200,
        temperature=0.8,
        stream=True,
    )
    pieces, finish = [], None
    for i, chunk in enumerate(stream):
        if i == 2:
            assert unregister(server, "temp").status_code == 200
            with pytest.raises(openai.NotFoundError):
                ask(server, "temp", "Hi")
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    assert finish in ("stop", "length") and "".join(pieces)
    caches = httpx.get(f"{server.url}/admin/prefix-caches", headers=ALPHA).json()["data"]
    assert "under-temp" not in [c["id"] for c in caches]
