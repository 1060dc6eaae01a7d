"""A 10-turn conversation: time to first token of each turn, continued with ``previous_response_id`` (the stored
KV: each turn prefills only what it adds) against the same conversation resent in full to
``/v1/chat/completions`` without a cache (each turn prefills everything so far), in one run on one server.

Each turn adds about ``--turn-tokens`` tokens of real text and asks for ``--output-tokens`` tokens; ``--repeats``
conversations, each with its own text. Both forms stream; TTFT is the time to the first text delta. Decode speed
is (output tokens - 1) / (time after the first token), per turn, for each form: the Responses stream's encoding
against chat's.

    python -m bench.conversation --device cpu                  # the default model, smollm2-135m
    python -m bench.conversation --device gpu --peer           # model 'llama-8b', and mlx_lm.server

``--peer`` also resends the conversation to ``mlx_lm.server`` on the same weights (it keeps the last prompts' KV
and reuses their longest common prefix, its own automatic prompt cache), after our server has stopped.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import openai

from bench.harness import Texts, bench_parser, gateway, summary, write_result

DEFAULT = {"cpu": "smollm2-135m", "gpu": "llama-8b"}
INSTRUCTIONS = "You are a careful reader. Answer questions about the text the user gives you."


def responses_turn(
    client: openai.OpenAI, model: str, text: str, previous: str | None, output_tokens: int
) -> tuple[float, float, str, int, int, int]:
    """(ttft, total, response id, input tokens, cached tokens, output tokens) of one streamed turn."""
    start = time.perf_counter()
    first = None
    final = None
    stream = client.responses.create(
        model=model,
        input=text,
        instructions=INSTRUCTIONS,
        previous_response_id=previous,
        max_output_tokens=output_tokens,
        temperature=0,
        stream=True,
    )
    for event in stream:
        if first is None and event.type == "response.output_text.delta":
            first = time.perf_counter() - start
        if event.type in ("response.completed", "response.incomplete"):
            final = event.response
    total = time.perf_counter() - start
    assert final is not None and final.usage is not None, "no final response"
    usage = final.usage
    return (
        first if first is not None else total,
        total,
        final.id,
        usage.input_tokens,
        usage.input_tokens_details.cached_tokens,
        usage.output_tokens,
    )


def chat_turn(
    client: openai.OpenAI, model: str, messages: list[dict[str, str]], output_tokens: int
) -> tuple[float, float, str, int, int]:
    """(ttft, total, answer, prompt tokens, output tokens) of one streamed chat request with the whole conversation."""
    start = time.perf_counter()
    first = None
    usage = None
    parts: list[str] = []
    stream: Any = client.chat.completions.create(
        model=model,
        messages=messages,  # type: ignore[arg-type]
        max_tokens=output_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            if first is None:
                first = time.perf_counter() - start
            parts.append(chunk.choices[0].delta.content)
        usage = chunk.usage or usage
    total = time.perf_counter() - start
    prompt, made = (usage.prompt_tokens, usage.completion_tokens) if usage is not None else (0, len(parts))
    return first if first is not None else total, total, "".join(parts), prompt, made


def decode_rate(ttft: float, total: float, tokens: int) -> float | None:
    return (tokens - 1) / (total - ttft) if tokens > 1 and total > ttft else None


def questions_of(texts: Texts, repeat: int, turns: int, turn_tokens: int) -> list[str]:
    return [
        texts.text(turn_tokens, offset=((repeat * turns + turn) * (turn_tokens + 50)) % (len(texts.ids) - turn_tokens))
        + "\n\nWhat is this about?"
        for turn in range(turns)
    ]


def conversation(
    client: openai.OpenAI,
    model: str,
    questions: list[str],
    output_tokens: int,
    forms: tuple[str, ...] = ("responses", "chat"),
) -> dict[str, list[dict[str, float]]]:
    out: dict[str, list[dict[str, float]]] = {form: [] for form in forms}
    previous = None
    for q in questions if "responses" in forms else []:
        ttft, total, previous, prompt, cached, made = responses_turn(client, model, q, previous, output_tokens)
        out["responses"].append(
            {"ttft": ttft, "total": total, "prompt_tokens": prompt, "cached_tokens": cached, "output_tokens": made}
        )
    chat = next(form for form in forms if form != "responses")
    messages = [{"role": "system", "content": INSTRUCTIONS}]
    for q in questions:
        messages.append({"role": "user", "content": q})
        ttft, total, answer, prompt, made = chat_turn(client, model, messages, output_tokens)
        messages.append({"role": "assistant", "content": answer})
        out[chat].append(
            {"ttft": ttft, "total": total, "prompt_tokens": prompt, "cached_tokens": 0, "output_tokens": made}
        )
    return out


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--turns", type=int, default=10)
    parser.add_argument("--turn-tokens", type=int, default=300)
    parser.add_argument("--output-tokens", type=int, default=64)
    parser.add_argument("--engine-layout", choices=("auto", "process", "thread"), default="auto")
    parser.add_argument("--peer", action="store_true", help="also resend the conversation to mlx_lm.server")
    args = parser.parse_args()
    model = args.model or DEFAULT[args.device]
    texts = Texts(model)
    runs: list[dict[str, list[dict[str, float]]]] = []
    forms = ("responses", "chat", *(("mlx_lm.server",) if args.peer else ()))
    with tempfile.TemporaryDirectory() as tmp:
        env = {"MLX_GATEWAY_ENGINE_LAYOUT": args.engine_layout}
        log = Path(tmp) / "server.log"
        with gateway(model, Path(tmp) / "caches", log, env=env) as gw:
            client = openai.OpenAI(base_url=gw.v1, api_key="bench", max_retries=0, timeout=1800)
            conversation(client, model, questions_of(texts, 60, 2, 64), 8)  # warm-up: compiles, first allocations
            for repeat in range(args.repeats):
                qs = questions_of(texts, repeat, args.turns, args.turn_tokens)
                runs.append(conversation(client, model, qs, args.output_tokens))
                last = runs[-1]
                print(
                    f"repeat {repeat}: responses turn 1 / {args.turns} TTFT "
                    f"{last['responses'][0]['ttft'] * 1000:.0f} / {last['responses'][-1]['ttft'] * 1000:.0f} ms; "
                    f"chat {last['chat'][0]['ttft'] * 1000:.0f} / {last['chat'][-1]['ttft'] * 1000:.0f} ms",
                    flush=True,
                )
        if args.peer:
            from adapters.mlx_lm.models import ModelSpec, _resolve
            from bench.concurrency import mlx_lm_server

            path = Path(_resolve(ModelSpec(model, model)))
            with mlx_lm_server(path, Path(tmp) / "mlx_lm.log") as url:
                peer = openai.OpenAI(base_url=f"{url}/v1", api_key="bench", max_retries=0, timeout=1800)
                conversation(peer, str(path), questions_of(texts, 60, 2, 64), 8, ("mlx_lm.server",))
                for repeat in range(args.repeats):
                    qs = questions_of(texts, repeat, args.turns, args.turn_tokens)
                    runs[repeat].update(conversation(peer, str(path), qs, args.output_tokens, ("mlx_lm.server",)))
                    got = runs[repeat]["mlx_lm.server"]
                    print(
                        f"repeat {repeat}: mlx_lm.server turn 1 / {args.turns} TTFT "
                        f"{got[0]['ttft'] * 1000:.0f} / {got[-1]['ttft'] * 1000:.0f} ms",
                        flush=True,
                    )
    rows = []
    for form in forms:
        for turn in range(args.turns):
            cells = [run[form][turn] for run in runs]
            rates = [r for c in cells if (r := decode_rate(c["ttft"], c["total"], int(c["output_tokens"])))]
            rows.append(
                {
                    "form": form,
                    "turn": turn + 1,
                    "ttft": summary([c["ttft"] for c in cells]),
                    "prompt_tokens": statistics.median(c["prompt_tokens"] for c in cells),
                    "cached_tokens": statistics.median(c["cached_tokens"] for c in cells),
                    "output_tokens": statistics.median(c["output_tokens"] for c in cells),
                    "decode_tok_s": statistics.median(rates) if rates else None,
                }
            )
    by = {(r["form"], r["turn"]): r for r in rows}
    last = args.turns
    ratio = {form: by[(form, last)]["ttft"]["median"] / by[(form, 1)]["ttft"]["median"] for form in forms}
    decode = {
        form: statistics.median(r["decode_tok_s"] for r in rows if r["form"] == form and r["decode_tok_s"])
        for form in forms
    }
    summary_row = {
        "form": "summary",
        "turn_last_over_first": ratio,
        "decode_tok_s": decode,
        "responses_decode_over_chat": decode["responses"] / decode["chat"],
        "turn_ttft_ms": {form: [by[(form, t + 1)]["ttft"]["median"] * 1000 for t in range(last)] for form in forms},
        "engine_layout": args.engine_layout,
        "turn_tokens": args.turn_tokens,
        "output_tokens": args.output_tokens,
        "repeats": args.repeats,
    }
    rows.append(summary_row)
    print(
        f"turn {last} / turn 1 TTFT: responses {ratio['responses']:.2f}x, chat resent {ratio['chat']:.2f}x; "
        f"decode responses/chat {summary_row['responses_decode_over_chat']:.2f}x"
    )
    write_result("conversation", args.device, model, rows, out=args.out)


if __name__ == "__main__":
    main()
