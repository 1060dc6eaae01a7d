"""Conversations continued from their stored KV (``previous_response_id``) through the real server and the
openai SDK, on the default model (real weights: its greedy answers are stable enough to compare as text):
each turn prefills only what it adds, the answer is the one a full prefill gives, a chain holds one copy of its
KV, DELETE frees it, another tenant cannot reach it, and what survives a restart."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.servers import Server, run_server

MODEL = "smollm2-135m"
CONFIG = """
admin_key = "admin-secret"

[api_keys]
key-alpha = "alpha"
key-nokv = "nokv"
key-chain = "chain"
key-beta = "beta"

[tenants.nokv]
max_response_kv_bytes = 1  # nothing fits: every continuation prefills its stored ids in full
"""
INSTRUCTIONS = "You are a helpful assistant who answers in one short sentence."
TURNS = ["What is the capital of France?", "And of Germany?", "Which of the two is larger?"]


@pytest.fixture(scope="module")
def kv_server(models_dir: Path, log_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    config = tmp_path_factory.mktemp("config") / "gateway.toml"
    config.write_text(CONFIG)
    cache_dir = tmp_path_factory.mktemp("responses-kv")
    with run_server(
        ["--config", str(config), "--cache-dir", str(cache_dir)], models_dir=models_dir, log_dir=log_dir
    ) as srv:
        yield srv


def client(server: Server, tenant: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.v1, api_key=f"key-{tenant}", max_retries=0)


def converse(c: openai.OpenAI, turns: list[str], stream_turn: int = 1) -> list[openai.types.responses.Response]:
    """Each turn continues the previous one; one of them streamed (the stream keeps its response too)."""
    out: list[openai.types.responses.Response] = []
    for i, text in enumerate(turns):
        kwargs = {
            "model": MODEL,
            "input": text,
            "instructions": INSTRUCTIONS,
            "max_output_tokens": 24,
            "temperature": 0,
            "previous_response_id": out[-1].id if out else None,
        }
        if i == stream_turn:
            with c.responses.stream(**kwargs) as stream:  # type: ignore[arg-type]
                for _ in stream:
                    pass
                out.append(stream.get_final_response())
        else:
            out.append(c.responses.create(**kwargs))  # type: ignore[arg-type]
    return out


def tenant_use(server: Server, tenant: str) -> dict[str, int]:
    r = httpx.get(f"{server.url}/admin/tenants", headers={"Authorization": "Bearer admin-secret"}, timeout=30)
    r.raise_for_status()
    return next(t["use"] for t in r.json()["data"] if t["id"] == tenant)


def test_each_turn_prefills_only_what_it_adds(kv_server: Server) -> None:
    turns = converse(client(kv_server, "alpha"), TURNS)
    for before, after in zip(turns, turns[1:], strict=False):
        assert before.usage is not None and after.usage is not None
        previous = before.usage.input_tokens + before.usage.output_tokens
        # The previous turn's prompt and output (all but, at most, its last token) came from memory.
        assert after.usage.input_tokens_details.cached_tokens >= previous - 1, (before.usage, after.usage)
        assert after.usage.input_tokens > previous


def test_the_answer_is_the_one_a_full_prefill_gives(kv_server: Server) -> None:
    with_kv = converse(client(kv_server, "alpha"), TURNS)
    without = converse(client(kv_server, "nokv"), TURNS)
    for a, b in zip(with_kv, without, strict=True):
        assert b.usage is not None and b.usage.input_tokens_details.cached_tokens == 0
        assert a.usage is not None and a.usage.input_tokens == b.usage.input_tokens  # the same ids
        assert a.output_text == b.output_text


def test_changed_instructions_are_not_taken_from_the_stored_kv(kv_server: Server) -> None:
    c = client(kv_server, "alpha")
    first = c.responses.create(model=MODEL, input=TURNS[0], instructions=INSTRUCTIONS, max_output_tokens=16)
    second = c.responses.create(
        model=MODEL,
        input=TURNS[1],
        instructions="Answer like a pirate.",
        previous_response_id=first.id,
        max_output_tokens=16,
        temperature=0,
    )
    assert first.usage is not None and second.usage is not None
    # The system message differs from the first token on: the stored KV is no prefix of this prompt.
    assert second.usage.input_tokens_details.cached_tokens < first.usage.input_tokens // 2
    alone = c.chat.completions.create(
        model=MODEL,
        messages=[
            {"role": "system", "content": "Answer like a pirate."},
            {"role": "user", "content": TURNS[0]},
            {"role": "assistant", "content": first.output_text},
            {"role": "user", "content": TURNS[1]},
        ],
        max_tokens=16,
        temperature=0,
    )
    assert alone.choices[0].message.content == second.output_text


def test_a_chain_holds_one_copy_of_its_kv_and_delete_frees_it(kv_server: Server) -> None:
    c = client(kv_server, "chain")
    turns = converse(c, [TURNS[0]])
    assert turns[0].usage is not None
    one = tenant_use(kv_server, "chain")["response_kv_bytes"]
    per_position = one / (turns[0].usage.input_tokens + turns[0].usage.output_tokens)
    for question in ["Tell me more.", "And then?", "Why?", "Say it again.", "Thanks."]:
        # instructions resent each turn, as the Agents SDK does (OpenAI does not carry them over)
        r = c.responses.create(
            model=MODEL,
            input=question,
            instructions=INSTRUCTIONS,
            previous_response_id=turns[-1].id,
            max_output_tokens=24,
            temperature=0,
        )
        turns.append(r)
    last = turns[-1].usage
    assert last is not None
    held = tenant_use(kv_server, "chain")["response_kv_bytes"]
    longest = last.input_tokens + last.output_tokens
    assert held <= per_position * longest * 1.01, (held, per_position, longest)  # not a copy per turn
    assert held >= per_position * (longest - 2)
    for r in turns:
        c.responses.delete(r.id)
    assert tenant_use(kv_server, "chain")["response_kv_bytes"] == 0


def test_another_tenant_cannot_continue_or_reach_it(kv_server: Server) -> None:
    mine = client(kv_server, "alpha").responses.create(model=MODEL, input=TURNS[0], max_output_tokens=8)
    theirs = client(kv_server, "beta")
    with pytest.raises(openai.NotFoundError) as exc:
        theirs.responses.create(model=MODEL, input="And?", previous_response_id=mine.id, max_output_tokens=8)
    assert exc.value.body["param"] == "previous_response_id"  # type: ignore[index]
    with pytest.raises(openai.NotFoundError):
        theirs.responses.retrieve(mine.id)
    with pytest.raises(openai.NotFoundError):
        theirs.responses.delete(mine.id)
    assert tenant_use(kv_server, "beta")["response_kv_bytes"] == 0


def test_stored_responses_survive_a_restart(models_dir: Path, log_dir: Path, tmp_path: Path) -> None:
    """Records are on disk: after a restart GET answers and a continuation works. The KV was in memory: the
    continuation prefills the stored ids in full, to the same prompt."""
    args = ["--model", "tiny", "--cache-dir", str(tmp_path)]
    with run_server(args, models_dir=models_dir, log_dir=log_dir) as srv:
        c = openai.OpenAI(base_url=srv.v1, api_key="unused", max_retries=0)
        first = c.responses.create(model="tiny", input="Hello there.", max_output_tokens=6, temperature=0)
        hot = c.responses.create(
            model="tiny", input="Again.", previous_response_id=first.id, max_output_tokens=6, temperature=0
        )
    with run_server(args, models_dir=models_dir, log_dir=log_dir) as srv:
        c = openai.OpenAI(base_url=srv.v1, api_key="unused", max_retries=0)
        assert c.responses.retrieve(first.id).output_text == first.output_text
        cold = c.responses.create(
            model="tiny", input="Again.", previous_response_id=first.id, max_output_tokens=6, temperature=0
        )
        assert hot.usage is not None and cold.usage is not None
        assert hot.usage.input_tokens_details.cached_tokens > 0 and cold.usage.input_tokens_details.cached_tokens == 0
        assert cold.usage.input_tokens == hot.usage.input_tokens
        assert c.responses.retrieve(hot.id).id == hot.id
