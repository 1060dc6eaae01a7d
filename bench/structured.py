"""The cost of structured output: decode tokens/s through the gateway with a JSON schema against the same
requests without one, alone and in a batch, in one run on one server.

    python -m bench.structured --device cpu      # small; 1 and 4 concurrent streams
    python -m bench.structured --device gpu      # llama-8b; 1, 8 and 32 concurrent streams

Every request is a streamed chat completion of exactly ``--max-tokens`` tokens (greedy): the plain ones
with EOS banned by ``logit_bias``, the constrained ones with a schema whose one string the random-weight
model never closes (and the same bias), so both decode the same number of tokens and only the per-token
work differs: the grammar's mask on the CPU (llguidance), its copy to the device, and the wait for the
sampled token that any per-token grammar needs. Batched rows compare bursts of all-plain, half- and
all-constrained streams: constrained sequences share the batch with the others, so their cost is the
whole batch's.
"""

from __future__ import annotations

import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import openai

from bench.harness import DEFAULT_MODEL, Texts, bench_parser, gateway, summary, write_result

PROMPT_TOKENS = 128
SCHEMA = {
    "type": "json_schema",
    "json_schema": {
        "name": "note",
        "strict": True,
        "schema": {
            "type": "object",
            "properties": {"title": {"type": "string"}, "body": {"type": "string"}},
            "required": ["title", "body"],
            "additionalProperties": False,
        },
    },
}


def one_stream(client: openai.OpenAI, model: str, prompt: str, max_tokens: int, schema: bool) -> dict[str, float]:
    """TTFT and decode tokens/s of one streamed request (tokens counted from usage)."""
    extra: dict[str, Any] = {"logit_bias": {str(t): -100 for t in EOS}}
    if schema:
        extra["response_format"] = SCHEMA
    start = time.perf_counter()
    first = None
    n = 0
    stream = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": prompt}],
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body=extra,
    )
    for chunk in stream:
        if first is None and chunk.choices and chunk.choices[0].delta.content:
            first = time.perf_counter() - start
        if chunk.usage is not None:
            n = chunk.usage.completion_tokens
    total = time.perf_counter() - start
    first = first or total
    return {"ttft": first, "tokens": n, "decode": (n - 1) / (total - first) if total > first else 0.0}


EOS: list[int] = []


def run_level(url: str, model: str, prompt: str, max_tokens: int, clients: int, repeats: int) -> list[dict[str, Any]]:
    """One stream: plain and constrained requests alternate. A batch of ``clients`` streams: all plain, half
    constrained, all constrained, each as one burst; the aggregate tokens/s against the all-plain burst."""
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="bench", max_retries=0, timeout=900)
    if clients == 1:
        runs: dict[str, list[dict[str, float]]] = {"plain": [], "schema": []}
        for i in range(repeats + 1):
            for name in runs:
                r = one_stream(client, model, prompt, max_tokens, name == "schema")
                if i:  # the first round warms up
                    runs[name].append(r)
        rows = [
            {
                "clients": 1,
                "requests": name,
                "decode_tokens_per_s": summary([r["decode"] for r in rs]),
                "ttft": summary([r["ttft"] for r in rs]),
                "completion_tokens": summary([r["tokens"] for r in rs]),
            }
            for name, rs in runs.items()
        ]
        rows[1]["ratio_to_plain"] = rows[1]["decode_tokens_per_s"]["median"] / rows[0]["decode_tokens_per_s"]["median"]
        return rows
    mixes = {"all plain": 0.0, "half constrained": 0.5, "all constrained": 1.0}
    # The mixes take turns within each round, so that the machine's drift (seen: +-30% between minutes on
    # the lent GPUs) falls on all of them alike; each round's ratios are taken against its own plain burst.
    rates: dict[str, list[float]] = {name: [] for name in mixes}
    ratios: dict[str, list[float]] = {name: [] for name in mixes}
    tokens: dict[str, list[float]] = {name: [] for name in mixes}
    for i in range(repeats + 1):
        this_round = {}
        for name, share in mixes.items():
            flags = [j < round(share * clients) for j in range(clients)]
            start = time.perf_counter()
            with ThreadPoolExecutor(clients) as pool:
                results = list(pool.map(lambda f: one_stream(client, model, prompt, max_tokens, f), flags))
            this_round[name] = sum(r["tokens"] for r in results) / (time.perf_counter() - start)
            if i:  # the first round warms up
                rates[name].append(this_round[name])
                tokens[name].append(min(r["tokens"] for r in results))
        if i:
            for name in mixes:
                ratios[name].append(this_round[name] / this_round["all plain"])
    rows = [
        {
            "clients": clients,
            "requests": name,
            "tokens_per_s": summary(rates[name]),
            "min_tokens": summary(tokens[name]),
            "ratio_per_round": summary(ratios[name]),
        }
        for name in mixes
    ]
    for row in rows:
        row["ratio_to_plain"] = row["ratio_per_round"]["median"]
    return rows


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--clients", type=int, nargs="*", default=None)
    args = parser.parse_args()
    model = args.model or DEFAULT_MODEL[args.device]
    levels = args.clients or ([1, 4] if args.device == "cpu" else [1, 8, 32])
    texts = Texts(model)
    prompt = texts.text(PROMPT_TOKENS)
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    from adapters.mlx_lm.models import ModelSpec, _resolve

    EOS.extend(sorted(load_tokenizer(Path(_resolve(ModelSpec(model, model)))).eos_token_ids))
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp, gateway(model, Path(tmp) / "c", Path(tmp) / "server.log") as gw:
        for clients in levels:
            level = run_level(gw.url, model, prompt, args.max_tokens, clients, args.repeats)
            for row in level:
                rate = row.get("decode_tokens_per_s", row.get("tokens_per_s"))
                print(
                    f"{clients} client(s), {row['requests']}: {rate['median']:.1f} tok/s "  # type: ignore[index]
                    f"({row.get('ratio_to_plain', 1.0):.2f}x)",
                    flush=True,
                )
            rows += level
    write_result(
        "structured",
        args.device,
        model,
        rows,
        out=args.out,
        notes=(
            f"{PROMPT_TOKENS}-token prompt, {args.max_tokens} tokens per stream (EOS banned), greedy, balanced "
            f"mode, medians of {args.repeats}; schema rows: response_format json_schema (strict) decoded "
            "with llguidance's masks, filled and applied batch-wide on each decode step."
        ),
    )


if __name__ == "__main__":
    main()
