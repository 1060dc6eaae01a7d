"""The cost of structured output: decode tokens/s through the gateway with a JSON schema against the same
requests without one, alone and in a batch, in one run on one server.

    python -m bench.structured --device cpu      # small; 1 and 4 concurrent streams
    python -m bench.structured --device gpu      # llama-8b; 1, 8 and 32 concurrent streams

Every request is a streamed chat completion of exactly ``--max-tokens`` tokens (greedy): the plain ones
with EOS banned by ``logit_bias``, the constrained ones with a schema whose one string the random-weight
model never closes (and the same bias), so both decode the same number of tokens and only the per-token
work differs: the grammar's mask on the CPU (llguidance), its copy to the device, and the sync on the
sampled token that any per-token grammar needs. In the batched rows, half the streams are constrained
and half are not, so they share the batch (the schema's cost must not leave the batch).
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
    """``clients`` streams at once; a single stream alternates plain and constrained, a batch mixes both."""
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="bench", max_retries=0, timeout=900)
    rows = []
    kinds = [("plain", False), ("schema", True)]
    per_kind: dict[str, dict[str, list[float]]] = {k: {"decode": [], "ttft": [], "tokens": []} for k, _ in kinds}
    aggregate: list[float] = []
    for i in range(repeats + 1):
        if clients == 1:
            for name, schema in kinds:
                r = one_stream(client, model, prompt, max_tokens, schema)
                if i:
                    for key in ("decode", "ttft", "tokens"):
                        per_kind[name][key].append(r[key])
            continue
        flags = [j % 2 == 1 for j in range(clients)]
        start = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            results = list(pool.map(lambda s: one_stream(client, model, prompt, max_tokens, s), flags))
        wall = time.perf_counter() - start
        if i:
            aggregate.append(sum(r["tokens"] for r in results) / wall)
            for flag, r in zip(flags, results, strict=True):
                for key in ("decode", "ttft", "tokens"):
                    per_kind["schema" if flag else "plain"][key].append(r[key])
    for name, _ in kinds:
        rows.append(
            {
                "clients": clients,
                "requests": name,
                "decode_tokens_per_s_per_stream": summary(per_kind[name]["decode"]),
                "ttft": summary(per_kind[name]["ttft"]),
                "completion_tokens": summary(per_kind[name]["tokens"]),
            }
        )
    plain, constrained = (r["decode_tokens_per_s_per_stream"]["median"] for r in rows)
    rows[1]["ratio_to_plain"] = constrained / plain if plain else 0.0
    if aggregate:
        rows.append({"clients": clients, "requests": "mixed (all streams)", "tokens_per_s": summary(aggregate)})
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
                if "decode_tokens_per_s_per_stream" in row:
                    d = row["decode_tokens_per_s_per_stream"]["median"]
                    print(f"{clients} client(s), {row['requests']}: {d:.1f} tok/s per stream", flush=True)
                else:
                    print(f"{clients} clients, all streams: {row['tokens_per_s']['median']:.1f} tok/s", flush=True)
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
            "with llguidance's mask as the sequence's last logits processor."
        ),
    )


if __name__ == "__main__":
    main()
