"""Time to first token with and without a named prefix cache: the seed's three scenarios.

End to end over HTTP with the openai SDK, streaming: a 2K-token system prompt, a 4K-token RAG context and
a 1K-token few-shot block, each followed by a short question. Modes: ``full`` (no cache: the whole
prompt is prefilled), ``hot`` (the cache resident in memory) and ``cold`` (a second server whose memory
budget is 0, so every use loads the cache file from disk).

    python -m bench.ttft --device cpu            # model 'small'
    python -m bench.ttft --device gpu            # model 'llama-8b'
    python -m bench.ttft --breakdown             # and where each mode's first token spent its time

The breakdown is read from the server's own ``mlx_gateway_request_phase_seconds`` histograms (their sums and
counts before and after each mode's measured requests, the warm-up left out): the mean of each phase. For
the cold mode it also says how the cache was met: loaded from its file or recomputed (the server measures which
is faster).
"""

from __future__ import annotations

import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai

from bench.harness import DEFAULT_MODEL, Gateway, Texts, bench_parser, gateway, summary, write_result

QUESTION_TOKENS = 32


@dataclass(frozen=True)
class Scenario:
    name: str
    prefix_tokens: int
    kind: str  # chat | completion


SCENARIOS = (
    Scenario("system-prompt-2k", 2048, "chat"),
    Scenario("rag-context-4k", 4096, "chat"),
    Scenario("few-shot-1k", 1024, "completion"),
)


def prefix_body(s: Scenario, texts: Texts) -> dict[str, Any]:
    if s.name.startswith("system"):
        return {"messages": [{"role": "system", "content": texts.text(s.prefix_tokens)}]}
    if s.name.startswith("rag"):
        doc = texts.text(s.prefix_tokens, offset=3000)
        return {"messages": [{"role": "system", "content": "Answer only from this context.\n\n" + doc}]}
    shots = texts.text(s.prefix_tokens, offset=9000)
    return {"prompt": shots}


def question(texts: Texts, i: int) -> str:
    return texts.text(QUESTION_TOKENS, offset=20000 + i * QUESTION_TOKENS) + "?"


def one(
    client: ModelClient, s: Scenario, prefix: dict[str, Any], q: str, cache: str | None, max_tokens: int
) -> tuple[float, float, int, int]:
    """(ttft, total seconds, prompt tokens, cached tokens) of one streamed request."""
    extra = {"prefix_cache": cache} if cache else {}
    start = time.perf_counter()
    if s.kind == "chat":
        messages = ([] if cache else prefix["messages"]) + [{"role": "user", "content": q}]
        stream: Any = client.sdk.chat.completions.create(
            model=client.model,
            messages=messages,
            max_tokens=max_tokens,
            temperature=0,
            logprobs=True,
            stream=True,
            stream_options={"include_usage": True},
            extra_body=extra,
        )
    else:
        prompt = ("" if cache else prefix["prompt"]) + "\n\nQ: " + q + "\nA:"
        stream = client.sdk.completions.create(
            model=client.model,
            prompt=prompt,
            max_tokens=max_tokens,
            temperature=0,
            logprobs=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body=extra,
        )
    first = None
    usage = None
    for chunk in stream:  # the first chunk with a token (the role chunk comes before any)
        if first is None and chunk.choices and (chunk.choices[0].logprobs or chunk.choices[0].finish_reason):
            first = time.perf_counter() - start
        usage = chunk.usage or usage
    total = time.perf_counter() - start
    assert first is not None and usage is not None
    cached = usage.prompt_tokens_details.cached_tokens if usage.prompt_tokens_details else 0
    return first, total, usage.prompt_tokens, cached or 0


@dataclass(frozen=True)
class ModelClient:
    """An OpenAI client and the model its requests name (kept beside it, not set on the SDK's object)."""

    sdk: openai.OpenAI
    model: str


def client_for(gw: Gateway, model: str) -> ModelClient:
    return ModelClient(openai.OpenAI(base_url=gw.v1, api_key="bench", max_retries=0, timeout=600), model)


PHASES = ("planning", "admission", "to_engine", "engine_queue", "prefill", "first_token_out")
_SAMPLE = re.compile(r"^(mlx_gateway_[a-z_]+)\{([^}]*)\} ([0-9.e+-]+)$")


def scrape(url: str) -> dict[tuple[str, str], float]:
    """(metric, labels) -> value of the phase histograms' sums and counts and the prefix-cache counters."""
    out: dict[tuple[str, str], float] = {}
    for line in httpx.get(f"{url}/metrics", timeout=30).text.splitlines():
        m = _SAMPLE.match(line)
        if m and (m.group(1).startswith("mlx_gateway_request_phase_seconds_") or "prefix_cache_" in m.group(1)):
            out[(m.group(1), m.group(2))] = float(m.group(3))
    return out


def breakdown(before: dict[tuple[str, str], float], after: dict[tuple[str, str], float]) -> dict[str, Any]:
    """Mean milliseconds per phase between two scrapes, and the cache loads and recomputes in between."""
    delta = {k: v - before.get(k, 0.0) for k, v in after.items()}
    out: dict[str, Any] = {}
    for phase in PHASES:
        total = sum(v for (n, lab), v in delta.items() if n.endswith("_sum") and f'phase="{phase}"' in lab)
        count = sum(v for (n, lab), v in delta.items() if n.endswith("_count") and f'phase="{phase}"' in lab)
        out[phase] = round(1000 * total / count, 2) if count else None
    for counter in ("loads", "recomputes"):
        out[counter] = int(sum(v for (n, _), v in delta.items() if n == f"mlx_gateway_prefix_cache_{counter}_total"))
    return out


def measure(
    client: ModelClient,
    s: Scenario,
    prefix: dict[str, Any],
    texts: Texts,
    cache: str | None,
    repeats: int,
    max_tokens: int,
    url: str | None = None,
) -> dict[str, Any]:
    """The mode's TTFTs over ``repeats`` requests after one warm-up; with ``url``, the server's own phase
    breakdown of those requests (the warm-up left out)."""
    one(client, s, prefix, question(texts, 99), cache, max_tokens)  # warm-up
    seen = scrape(url) if url else {}
    ttfts, totals, prompt, cached = [], [], 0, 0
    for i in range(repeats):
        t, total, prompt, cached = one(client, s, prefix, question(texts, i), cache, max_tokens)
        ttfts.append(t)
        totals.append(total)
    out = {"ttft": summary(ttfts), "total": summary(totals), "prompt_tokens": prompt, "cached_tokens": cached}
    if url:
        out["breakdown"] = breakdown(seen, scrape(url))
    return out


def suffix_floor(
    model: str, texts: Texts, repeats: int, scenarios: tuple[Scenario, ...] = SCENARIOS
) -> dict[str, dict[str, float]]:
    """One bare forward pass over a 32-token suffix on a cached prefix, in process: what a hit can reach."""
    import mlx.core as mx

    from adapters.mlx_lm.models import ModelSpec, load_model
    from adapters.mlx_lm.prefill import prefill_step
    from prefix_caches import kv

    loaded = load_model(ModelSpec(model, model))
    out = {}
    for s in scenarios:
        cache = loaded.make_cache()
        prefix = texts.ids[: s.prefix_tokens]
        step = prefill_step(loaded)
        for i in range(0, len(prefix), step):
            loaded.model(mx.array(prefix[i : i + step])[None], cache=cache)
            mx.eval([c.state for c in cache])
        stored = kv.exact(cache)
        suffix = mx.array(texts.ids[30000 : 30000 + QUESTION_TOKENS])[None]
        times = []
        for _ in range(repeats + 1):
            mine = kv.view(stored, s.prefix_tokens)
            start = time.perf_counter()
            token = mx.argmax(loaded.model(suffix, cache=mine)[0, -1, :])
            mx.eval(token)
            times.append(time.perf_counter() - start)
        out[s.name] = summary(times[1:])
    return out


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--quick", action="store_true", help="2 repeats")
    parser.add_argument("--breakdown", action="store_true", help="print each mode's mean phases up to the first token")
    parser.add_argument("--engine-layout", choices=("auto", "process", "thread"), default="auto")
    parser.add_argument(
        "--scenarios",
        default=",".join(s.name for s in SCENARIOS),
        help="a comma-separated subset (a 4K-token prefill of a 135M model takes about a minute on 2 cores)",
    )
    args = parser.parse_args()
    model = args.model or DEFAULT_MODEL[args.device]
    repeats = 2 if args.quick else args.repeats
    chosen = args.scenarios.split(",")
    assert set(chosen) <= {s.name for s in SCENARIOS}, f"unknown scenario in {chosen}"
    scenarios = tuple(s for s in SCENARIOS if s.name in chosen)
    texts = Texts(model)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        cache_dir, log = Path(tmp) / "caches", Path(tmp) / "server.log"
        prefixes = {s.name: prefix_body(s, texts) for s in scenarios}
        layout = {"MLX_GATEWAY_ENGINE_LAYOUT": args.engine_layout}
        with gateway(model, cache_dir, log, env=layout) as gw:
            client = client_for(gw, model)
            for s in scenarios:
                r = httpx.post(
                    f"{gw.url}/admin/prefix-caches",
                    timeout=3600,
                    json={"name": s.name, "model": model, **prefixes[s.name]},
                )
                r.raise_for_status()
                build = r.json()
                full = measure(client, s, prefixes[s.name], texts, None, repeats, args.max_tokens, gw.url)
                hot = measure(client, s, prefixes[s.name], texts, s.name, repeats, args.max_tokens, gw.url)
                rows.append(
                    {
                        "scenario": s.name,
                        "cache_tokens": build["num_tokens"],
                        "cache_bytes": build["size_bytes"],
                        "build_seconds": build["build_seconds"],
                        "full": full,
                        "hot": hot,
                    }
                )
                print(s.name, "full", full["ttft"]["median"], "hot", hot["ttft"]["median"], flush=True)
        # Cold: a server that keeps nothing resident, so every hit reads the file.
        with gateway(model, cache_dir, log, env={**layout, "MLX_GATEWAY_PREFIX_CACHE_MEMORY_BYTES": "0"}) as gw:
            client = client_for(gw, model)
            for row, s in zip(rows, scenarios, strict=True):
                row["cold"] = measure(client, s, prefixes[s.name], texts, s.name, repeats, args.max_tokens, gw.url)
                print(s.name, "cold", row["cold"]["ttft"]["median"], flush=True)
        if args.device == "gpu":
            print(log.read_text()[-4000:])
    floors = suffix_floor(model, texts, repeats, scenarios)
    for row in rows:
        row["floor"] = floors[row["scenario"]]
        row["hot_over_floor"] = row["hot"]["ttft"]["median"] / row["floor"]["median"]
        f = row["full"]["ttft"]["median"]
        row["speedup_hot"] = f / row["hot"]["ttft"]["median"]
        row["speedup_cold"] = f / row["cold"]["ttft"]["median"]
        row["engine_layout"] = args.engine_layout
        row["breakdown_warmup"] = "excluded"
    if args.breakdown:
        print_breakdown(rows)
    write_result("ttft", args.device, model, rows, out=args.out)


def print_breakdown(rows: list[dict[str, Any]]) -> None:
    """Mean ms per phase, per scenario and mode, beside the client's median TTFT."""
    print(f"{'scenario':18} {'mode':5} {'ttft':>8} " + " ".join(f"{p:>15}" for p in PHASES) + "  cache")
    for row in rows:
        for mode in ("full", "hot", "cold"):
            b = row[mode]["breakdown"]
            cells = " ".join(f"{b[p]:>15}" if b[p] is not None else f"{'-':>15}" for p in PHASES)
            met = f"loaded {b['loads']}, recomputed {b['recomputes']}" if mode == "cold" else ""
            print(f"{row['scenario']:18} {mode:5} {1000 * row[mode]['ttft']['median']:8.2f} {cells}  {met}")


if __name__ == "__main__":
    main()
