"""top_k, min_p and repetition_penalty through the real server, on the batched (balanced) path and the
sequential (strict) path."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.integration.test_wire import assert_error
from tests.servers import Server, run_server

MESSAGES = [{"role": "user", "content": "Write a sorting function"}]
NO_EOS = {"0": -100, "2": -100}


@pytest.fixture(scope="module")
def strict_server(models_dir: Path, log_dir: Path) -> Iterator[Server]:
    env = {"MLX_GATEWAY_ISOLATION_MODE": "strict"}
    with run_server(["--model", "tiny"], models_dir=models_dir, log_dir=log_dir, env=env) as srv:
        yield srv


@pytest.fixture(params=["balanced", "strict"])
def client(request: pytest.FixtureRequest) -> openai.OpenAI:
    srv: Server = request.getfixturevalue("server" if request.param == "balanced" else "strict_server")
    return openai.OpenAI(base_url=srv.v1, api_key="unused", max_retries=0)


def _texts(client: openai.OpenAI, **kw: object) -> list[str]:
    r = client.chat.completions.create(
        model="tiny",
        messages=MESSAGES,
        max_tokens=16,
        logit_bias=NO_EOS,
        **kw,  # type: ignore[arg-type]
    )
    return [c.message.content or "" for c in r.choices]


@pytest.mark.parametrize("extra", [{"top_k": 1}, {"min_p": 1.0}])
def test_filters_keeping_one_token_equal_greedy(client: openai.OpenAI, extra: dict[str, float]) -> None:
    (greedy,) = _texts(client, temperature=0)
    for _ in range(3):  # unseeded, temperature 1: only the filter makes these deterministic
        assert _texts(client, temperature=1.0, extra_body=extra) == [greedy]
    assert _texts(client, temperature=1.0, n=3, extra_body=extra) == [greedy] * 3


def test_top_k_is_honoured_not_ignored(client: openai.OpenAI) -> None:
    # Without a filter, unseeded sampling at temperature 1 on a random-weight model varies.
    assert len({_texts(client, temperature=1.0)[0] for _ in range(3)}) > 1


def test_repetition_penalty_breaks_greedy_repetition(client: openai.OpenAI) -> None:
    base = client.chat.completions.create(
        model="tiny", messages=MESSAGES, max_tokens=24, temperature=0, logit_bias=NO_EOS, logprobs=True
    )
    penalised = client.chat.completions.create(
        model="tiny",
        messages=MESSAGES,
        max_tokens=24,
        temperature=0,
        logit_bias=NO_EOS,
        logprobs=True,
        extra_body={"repetition_penalty": 1.5},
    )

    def distinct(r: object) -> int:
        return len({t.token for t in r.choices[0].logprobs.content})  # type: ignore[attr-defined]

    assert distinct(penalised) > distinct(base)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("top_k", -2),
        ("top_k", 1.5),
        ("min_p", 1.5),
        ("min_p", -0.1),
        ("repetition_penalty", 0),
        ("repetition_penalty", 11),
    ],
)
def test_bad_sampling_fields_are_400(server: Server, field: str, value: float) -> None:
    body = {"model": "tiny", "messages": MESSAGES, "max_tokens": 2, field: value}
    for path, b in (("chat/completions", body), ("completions", {**body, "prompt": "x", "messages": None})):
        r = httpx.post(f"{server.v1}/{path}", json={k: v for k, v in b.items() if v is not None}, timeout=30)
        err = assert_error(r, 400, "invalid_request_error", None)
        assert field in err["message"] or err["param"] == field, err
