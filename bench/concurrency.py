"""Aggregate tokens/s and TTFT for N concurrent streaming clients: mlx-gateway against mlx_lm.server,
started by this benchmark on the same model and machine, in the same run.

    python -m bench.concurrency --device cpu                 # small; 1, 8, 32 clients
    python -m bench.concurrency --device gpu                 # llama-8b; 1, 8, 32, 64 clients
    python -m bench.concurrency --device gpu --clients 1,8,32,64,128 --closed-duration 30 --ceiling
    python -m bench.concurrency --device gpu --clients 128 --closed-duration 30 --modes balanced \
        --layouts process --api-servers 1,2,4 --skip-mlx-lm --skip-shared      # HTTP front ends: 1 vs 2 vs 4

Two ways of loading a server, both reported:

- *burst*: N clients each stream one chat completion, all sent at once; tokens/s is every token over the
  wall time of the burst, ramp (N prefills) and tail (the last stragglers) included.
- *closed loop* (``--closed-duration S``): N clients each send requests back to back (a new one as soon as
  its last one ends), as vLLM's serving benchmark does with ``--max-concurrency``. After
  ``--closed-warmup`` seconds (the ramp), tokens are counted for S seconds: the steady-state aggregate
  tokens/s, TTFT (p50/p95/p99) of the requests started in that window, the inter-token latency
  (p50/p95 of the gaps between a request's tokens) and errors.

Every request is a ~128-token prompt of real text (each a different slice, so no prompt cache hits),
``--max-tokens`` output, temperature 0.7, no seed (mlx_lm.server runs seeded requests one at a time).
Both servers load the same weights; on CPU both get MKL (mlx_lm.server through LD_PRELOAD).
``--ceiling`` also measures the plain in-process decode loop (``bench.decode_ceiling``, in a process of
its own before the servers start) for the same batch sizes, so each row can say what share of mlx's own
step it gets.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai

from bench.harness import DEFAULT_MODEL, Texts, bench_parser, free_port, gateway, server_process, summary, write_result


@contextmanager
def mlx_lm_server(model_path: Path, log: Path) -> Iterator[str]:
    port = free_port()
    env = {}
    mkl = Path(sys.prefix) / "lib" / "libmkl_rt.so.3"
    if mkl.exists():
        env["LD_PRELOAD"] = str(mkl)
    cmd = [sys.executable, "-m", "mlx_lm", "server", "--model", str(model_path), "--port", str(port)]
    url = f"http://127.0.0.1:{port}"
    with server_process(cmd, url, log, env, any_answer=True):
        yield url


async def one(
    client: openai.AsyncOpenAI,
    model: str,
    prompt: str,
    max_tokens: int,
    system: str | None = None,
    cache: str | None = None,
) -> tuple[float, int] | None:
    """(ttft, tokens) of one streamed chat completion, or None if the server failed it."""
    start = time.perf_counter()
    first = None
    tokens = 0
    messages = [{"role": "system", "content": system}] if system and not cache else []
    messages.append({"role": "user", "content": prompt})
    try:
        stream = await client.chat.completions.create(
            model=model,
            messages=messages,  # type: ignore[arg-type]
            max_tokens=max_tokens,
            temperature=0.7,
            stream=True,
            extra_body={"prefix_cache": cache} if cache else None,
        )
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                tokens += 1  # one chunk per token on both servers
                if first is None:
                    first = time.perf_counter() - start
    except (openai.APIError, httpx.HTTPError) as exc:
        print(f"    request failed: {type(exc).__name__}: {exc}", flush=True)
        return None
    return (first if first is not None else time.perf_counter() - start), tokens


async def burst(
    base: str, model: str, prompts: list[str], max_tokens: int, system: str | None = None, cache: str | None = None
) -> dict[str, Any]:
    client = openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="bench", max_retries=0, timeout=3600)
    start = time.perf_counter()
    results = await asyncio.gather(*(one(client, model, p, max_tokens, system, cache) for p in prompts))
    wall = time.perf_counter() - start
    await client.close()
    ok = [r for r in results if r is not None]
    ttfts = sorted(r[0] for r in ok) or [float("nan")]
    tokens = sum(r[1] for r in ok)
    p95 = ttfts[min(len(ttfts) - 1, int(round(0.95 * (len(ttfts) - 1))))]
    p99 = ttfts[min(len(ttfts) - 1, int(round(0.99 * (len(ttfts) - 1))))]
    return {
        "loop": "burst",
        "clients": len(prompts),
        "errors": len(results) - len(ok),
        "tokens": tokens,
        "wall_s": wall,
        "tokens_per_s": tokens / wall,
        "ttft": summary(ttfts),
        "ttft_p95": p95,
        "ttft_p99": p99,
    }


def _quantile(ordered: list[float], q: float) -> float:
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))] if ordered else float("nan")


@dataclass
class Timed:
    """One streamed request of the closed loop: when it started, and when each token arrived."""

    start: float
    times: list[float] = field(default_factory=list)
    ok: bool = True


async def timed(client: openai.AsyncOpenAI, model: str, prompt: str, max_tokens: int) -> Timed:
    record = Timed(time.perf_counter())
    await stream_into(client, model, prompt, max_tokens, record)
    return record


async def stream_into(client: openai.AsyncOpenAI, model: str, prompt: str, max_tokens: int, record: Timed) -> None:
    """Stream one chat completion, each token's arrival time appended to ``record`` as it comes (a task
    cancelled mid-way leaves what it got)."""
    try:
        stream = await client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": prompt}],
            max_tokens=max_tokens,
            temperature=0.7,
            stream=True,
        )
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                record.times.append(time.perf_counter())  # one chunk per token on both servers
    except (openai.APIError, httpx.HTTPError) as exc:
        print(f"    request failed ({model}): {type(exc).__name__}: {exc}", flush=True)
        record.ok = False


async def closed_loop(
    base: str,
    model: str,
    prompt: Callable[[int], str],
    clients: int,
    duration: float,
    warmup: float,
    max_tokens: int,
) -> dict[str, Any]:
    """``clients`` clients sending requests back to back; steady-state figures over ``duration`` seconds
    after ``warmup``. Requests in flight when the window closes run to their end but count only the
    tokens that arrived inside it."""
    client = openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="bench", max_retries=0, timeout=3600)
    begin = time.perf_counter()
    lo, hi = begin + warmup, begin + warmup + duration
    numbers = itertools.count()
    records: list[Timed] = []

    async def worker() -> None:
        while time.perf_counter() < hi:
            record = await timed(client, model, prompt(next(numbers)), max_tokens)
            records.append(record)
            if not record.ok:
                await asyncio.sleep(0.1)  # a refused connection must not spin

    await asyncio.gather(*(worker() for _ in range(clients)))
    await client.close()
    inside = [r for r in records if lo <= r.start < hi]
    tokens = sum(1 for r in records for t in r.times if lo <= t < hi)
    ttfts = sorted(r.times[0] - r.start for r in inside if r.ok and r.times)
    gaps = sorted(b - a for r in records for a, b in itertools.pairwise(r.times) if lo <= b < hi)
    finished = [r for r in records if r.ok and r.times and lo <= r.times[-1] < hi]
    return {
        "loop": "closed",
        "clients": clients,
        "duration_s": duration,
        "warmup_s": warmup,
        "requests": len(records),
        "requests_finished_in_window": len(finished),
        "errors": sum(1 for r in records if not r.ok),
        "tokens": tokens,
        "tokens_per_s": tokens / duration,
        "tokens_per_s_per_client": tokens / duration / clients,
        "ttft": summary(ttfts or [float("nan")]),
        "ttft_p95": _quantile(ttfts, 0.95),
        "ttft_p99": _quantile(ttfts, 0.99),
        "itl_ms": {"p50": _quantile(gaps, 0.5) * 1e3, "p95": _quantile(gaps, 0.95) * 1e3, "n": len(gaps)},
    }


def _report(label: str, row: dict[str, Any]) -> None:
    itl = f", ITL p50 {row['itl_ms']['p50']:.1f} ms p95 {row['itl_ms']['p95']:.1f} ms" if "itl_ms" in row else ""
    print(
        f"  {label}: {row['tokens_per_s']:.1f} tok/s, p50 TTFT {row['ttft']['median']:.2f}s, "
        f"p95 {row['ttft_p95']:.2f}s{itl}, errors {row['errors']}",
        flush=True,
    )


def run_closed(
    base: str, model: str, texts: Texts, clients: list[int], duration: float, warmup: float, max_tokens: int
) -> list[dict[str, Any]]:
    span = len(texts.ids) - 200

    def prompt(k: int) -> str:  # a different slice for every request: no prompt-cache hits
        return texts.text(128, offset=(1000 + 131 * k) % span)

    rows = []
    for n in clients:
        row = asyncio.run(closed_loop(base, model, prompt, n, duration, warmup, max_tokens))
        _report(f"{n:3d} clients, closed loop {duration:.0f}s", row)
        rows.append(row)
    return rows


def plain_loop_ceiling(device: str, model: str, batches: list[int], tmp: Path) -> list[dict[str, Any]]:
    """``bench.decode_ceiling``'s plain loop for these batch sizes, in its own process (its model must
    not share the device's memory with the servers)."""
    out = tmp / "ceiling.json"
    cmd = [sys.executable, "-m", "bench.decode_ceiling", "--device", device, "--model", model, "--variants", "plain"]
    cmd += ["--batches", ",".join(map(str, batches)), "--repeats", "2", "--out", str(out)]
    subprocess.run(cmd, check=True)
    rows = json.loads(out.read_text())["rows"]
    return [{"server": "plain decode loop (in process)", "loop": "ceiling", "clients": r["batch"], **r} for r in rows]


def run_all(base: str, model: str, texts: Texts, clients: list[int], max_tokens: int) -> list[dict[str, Any]]:
    # Warm-up with the batch sizes and lengths measured, for each server alike: the GPU backend compiles
    # kernels per shape on first use (an H100 run that warmed up with 16-token bursts stalled 5.5 s at 8
    # clients of 128 tokens, on the first server measured only).
    for n in sorted({1, 8, *clients} - {max(clients)}):
        asyncio.run(burst(base, model, [texts.text(128, offset=50 + 7 * i) for i in range(n)], max_tokens))
    rows = []
    for n in clients:
        prompts = [texts.text(128, offset=200 + 131 * i) for i in range(n)]
        row = asyncio.run(burst(base, model, prompts, max_tokens))
        _report(f"{n:3d} clients", row)
        rows.append(row)
    return rows


def every_front_ready(base: str, in_a_row: int = 40) -> None:
    """Until ``in_a_row`` health checks on fresh connections answer 200: with several API servers each loads its
    tokenizer once the model is ready, and the first 200 came from one of them only."""
    ok = 0
    while ok < in_a_row:
        ok = ok + 1 if httpx.get(f"{base}/health", timeout=10).status_code == 200 else 0
        time.sleep(0.01 if ok else 0.25)


SHARED_CLIENTS = 16


def shared_prefix(
    base: str, model: str, texts: Texts, max_tokens: int, cache: str | None, clients: int = SHARED_CLIENTS
) -> dict[str, Any]:
    """16 clients on one 4K-token system prompt: through a named cache, or sent in full."""
    system = texts.text(4096, offset=3000)
    if cache:
        r = httpx.post(
            f"{base}/admin/prefix-caches",
            timeout=3600,
            json={"name": cache, "model": model, "messages": [{"role": "system", "content": system}]},
        )
        r.raise_for_status()
    prompts = [texts.text(32, offset=40000 + 37 * i) for i in range(clients)]
    row = asyncio.run(burst(base, model, prompts, max_tokens, system=system, cache=cache))
    row["scenario"] = f"{clients} clients, one 4K-token system prompt" + (" (named cache)" if cache else "")
    _report(row["scenario"], row)
    return row


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--clients", default=None, help="comma-separated client counts")
    parser.add_argument("--max-tokens", type=int, default=None)
    parser.add_argument("--modes", default="balanced,strict", help="our isolation modes to measure")
    parser.add_argument("--skip-mlx-lm", action="store_true")
    parser.add_argument("--strict-clients", default="1,32", help="client counts for strict mode")
    parser.add_argument("--shared-max-tokens", type=int, default=128)
    parser.add_argument("--shared-clients", type=int, default=SHARED_CLIENTS)
    parser.add_argument("--skip-shared", action="store_true", help="no 4K-token shared-prefix scenario")
    parser.add_argument("--skip-burst", action="store_true", help="closed loop only")
    parser.add_argument("--closed-duration", type=float, default=0.0, help="closed-loop window, s (0: none)")
    parser.add_argument("--closed-warmup", type=float, default=None, help="closed-loop ramp left out, s")
    parser.add_argument("--closed-clients", default=None, help="client counts for the closed loop (default --clients)")
    parser.add_argument("--ceiling", action="store_true", help="also measure the plain decode loop first")
    parser.add_argument(
        "--layouts", default="auto", help="engine layouts to measure, comma-separated: auto, process, thread"
    )
    parser.add_argument(
        "--api-servers",
        default="1",
        help="API server counts to measure, comma-separated (e.g. 1,2,4; more than 1 runs the process layout only)",
    )
    args = parser.parse_args()
    model = args.model or DEFAULT_MODEL[args.device]
    clients = [int(c) for c in (args.clients or ("1,8,32" if args.device == "cpu" else "1,8,32,64")).split(",")]
    max_tokens = args.max_tokens or (64 if args.device == "cpu" else 128)
    closed = [int(c) for c in args.closed_clients.split(",")] if args.closed_clients else clients
    closed = closed if args.closed_duration > 0 else []
    # The ramp: every client's first prefill and the first kernels of each shape.
    warmup = args.closed_warmup if args.closed_warmup is not None else (10.0 if args.device == "cpu" else 5.0)
    texts = Texts(model)
    from adapters.mlx_lm.models import ModelSpec, _resolve

    path = Path(_resolve(ModelSpec(model, model)))  # mlx_lm.server gets the same converted directory
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        if args.ceiling:
            print("plain decode loop (in process)", flush=True)
            rows += plain_loop_ceiling(args.device, model, sorted(set(clients) | set(closed)), Path(tmp))
        log = Path(tmp) / "server.log"
        layouts = args.layouts.split(",")
        api_servers = [int(n) for n in args.api_servers.split(",")]
        for mode, layout, fronts in itertools.product(args.modes.split(","), layouts, api_servers):
            if fronts > 1 and layout == "thread":
                continue  # several API servers feed one engine process
            name = f"mlx-gateway {mode}" + (f" ({layout})" if len(layouts) > 1 else "")
            name += f" [{fronts} API server{'s' if fronts > 1 else ''}]" if len(api_servers) > 1 else ""
            print(name, flush=True)
            env = {
                "MLX_GATEWAY_ISOLATION_MODE": mode,
                "MLX_GATEWAY_MAX_RUNNING": str(max(clients + closed)),
                "MLX_GATEWAY_ENGINE_LAYOUT": layout,
                "MLX_GATEWAY_API_SERVERS": str(fronts),
            }
            counts = clients if mode != "strict" else [int(c) for c in args.strict_clients.split(",")]
            with gateway(model, Path(tmp) / "caches", log, env=env) as gw:
                if fronts > 1:
                    every_front_ready(gw.url)
                if not args.skip_burst:
                    for r in run_all(gw.url, model, texts, counts, max_tokens):
                        rows.append({"server": name, **r})
                for r in run_closed(gw.url, model, texts, closed, args.closed_duration, warmup, max_tokens):
                    rows.append({"server": name, **r})
                health = httpx.get(f"{gw.url}/health").json()
                print("  engine:", health["batch_steps"], health["memory"], flush=True)
                if mode == "balanced" and not args.skip_shared:
                    r = shared_prefix(gw.url, model, texts, args.shared_max_tokens, "shared-4k", args.shared_clients)
                    rows.append({"server": name, **r})
        if not args.skip_mlx_lm:
            print("mlx_lm.server", flush=True)
            with mlx_lm_server(path, log) as url:
                if not args.skip_burst:
                    for r in run_all(url, str(path), texts, clients, max_tokens):
                        rows.append({"server": "mlx_lm.server", **r})
                for r in run_closed(url, str(path), texts, closed, args.closed_duration, warmup, max_tokens):
                    rows.append({"server": "mlx_lm.server", **r})
                if not args.skip_shared:
                    r = shared_prefix(url, str(path), texts, args.shared_max_tokens, None, args.shared_clients)
                    rows.append({"server": "mlx_lm.server", **r})
    notes = f"max_tokens {max_tokens}, temperature 0.7, no seed; prompts ~128 tokens of real text."
    if closed:
        notes += f" Closed loop: {args.closed_duration:.0f} s counted after a {warmup:.0f} s ramp."
    write_result("concurrency", args.device, model, rows, notes=notes, out=args.out)


if __name__ == "__main__":
    main()
