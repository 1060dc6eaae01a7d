"""Gateway overhead: one streamed completion through HTTP (the openai SDK against the real server)
against mlx-lm's in-process ``stream_generate`` on the same model, prompt and settings, in one run.

    python -m bench.overhead --device cpu      # small
    python -m bench.overhead --device gpu      # llama-8b
    python -m bench.overhead --device cpu --modes balanced --no-stream   # adds a non-streamed row

Not streamed, there is no first token to time: that row's decode rate takes the streamed rows' median
TTFT off its total time (the same prompt, so the same prefill).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import openai

from bench.harness import DEFAULT_MODEL, Texts, bench_parser, gateway, summary, write_result

PROMPT_TOKENS = 128


def in_process(model: str, prompt: list[int], max_tokens: int, repeats: int) -> dict[str, Any]:
    from mlx_lm import stream_generate

    from adapters.mlx_lm.models import ModelSpec, load_model

    loaded = load_model(ModelSpec(model, model))  # the gateway's own loading: same dtype and logits
    ttfts, rates = [], []
    for i in range(repeats + 1):
        start = time.perf_counter()
        first = None
        n = 0
        for _ in stream_generate(loaded.model, loaded.tokenizer.wrapper, prompt, max_tokens=max_tokens):
            n += 1
            if first is None:
                first = time.perf_counter() - start
        total = time.perf_counter() - start
        if i:  # the first run warms up
            ttfts.append(first or total)
            rates.append((n - 1) / (total - (first or 0)))
    return {"ttft": summary(ttfts), "decode_tokens_per_s": summary(rates)}


def over_http(
    url: str,
    model: str,
    prompt: list[int],
    max_tokens: int,
    mode: str,
    repeats: int,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="bench", max_retries=0, timeout=600)
    ttfts, rates = [], []
    for i in range(repeats + 1):
        start = time.perf_counter()
        first = None
        n = 0
        stream = client.completions.create(
            model=model,
            prompt=prompt,
            max_tokens=max_tokens,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body=extra,
        )
        for chunk in stream:  # tokens counted from usage: asking for logprobs would add a sync per token
            if first is None and chunk.choices and chunk.choices[0].text:
                first = time.perf_counter() - start
            if chunk.usage is not None:
                n = chunk.usage.completion_tokens
        total = time.perf_counter() - start
        if i:
            ttfts.append(first or total)
            rates.append((n - 1) / (total - (first or 0)))
    return {"mode": mode, "ttft": summary(ttfts), "decode_tokens_per_s": summary(rates)}


def not_streamed(url: str, model: str, prompt: list[int], max_tokens: int, repeats: int, ttft: float) -> dict[str, Any]:
    """One completion, not streamed: the whole answer at once (no SSE); decode rate after ``ttft``."""
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="bench", max_retries=0, timeout=600)
    totals, rates = [], []
    for i in range(repeats + 1):
        start = time.perf_counter()
        done = client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0)
        total = time.perf_counter() - start
        n = done.usage.completion_tokens if done.usage else max_tokens
        if i:
            totals.append(total)
            rates.append((n - 1) / (total - ttft))
    return {"ttft": summary([ttft]), "total_s": summary(totals), "decode_tokens_per_s": summary(rates)}


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--modes", default="balanced,strict", help="our isolation modes to measure")
    parser.add_argument("--no-stream", action="store_true", help="also time non-streamed completions")
    args = parser.parse_args()
    model = args.model or DEFAULT_MODEL[args.device]
    texts = Texts(model)
    prompt = texts.ids[:PROMPT_TOKENS]
    rows = [{"path": "in-process stream_generate", **in_process(model, prompt, args.max_tokens, args.repeats)}]
    with tempfile.TemporaryDirectory() as tmp:
        for mode in args.modes.split(","):
            env = {"MLX_GATEWAY_ISOLATION_MODE": mode}
            with gateway(model, Path(tmp) / "c", Path(tmp) / "server.log", env=env) as gw:
                streamed = over_http(gw.url, model, prompt, args.max_tokens, mode, args.repeats)
                rows.append({"path": f"HTTP, {mode}", **streamed})
                if args.no_stream:
                    ttft = streamed["ttft"]["median"]
                    whole = not_streamed(gw.url, model, prompt, args.max_tokens, args.repeats, ttft)
                    rows.append({"path": f"HTTP, {mode}, not streamed", "mode": mode, **whole})
    base = rows[0]["decode_tokens_per_s"]["median"]
    for row in rows:
        row["ratio_to_in_process"] = row["decode_tokens_per_s"]["median"] / base
        print(
            f"{row['path']}: TTFT {row['ttft']['median'] * 1e3:.1f} ms, decode "
            f"{row['decode_tokens_per_s']['median']:.1f} tok/s ({row['ratio_to_in_process']:.2f}x)",
            flush=True,
        )
    write_result(
        "overhead",
        args.device,
        model,
        rows,
        out=args.out,
        notes=f"{PROMPT_TOKENS}-token prompt, {args.max_tokens} tokens, greedy, medians of {args.repeats}.",
    )


if __name__ == "__main__":
    main()
