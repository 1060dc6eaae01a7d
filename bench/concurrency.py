"""Aggregate tokens/s and TTFT for N concurrent streaming clients: mlx-gateway against mlx_lm.server,
started by this benchmark on the same model and machine, in the same run.

    python -m bench.concurrency --device cpu                 # small; 1, 8, 32 clients
    python -m bench.concurrency --device gpu                 # llama-8b; 1, 8, 32, 64 clients

Each client streams one chat completion (a ~128-token prompt of real text, ``--max-tokens`` output,
temperature 0.7, no seed: mlx_lm.server runs seeded requests one at a time). Both servers load the same
weights; on CPU both get MKL (mlx_lm.server through LD_PRELOAD).
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
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
        "clients": len(prompts),
        "errors": len(results) - len(ok),
        "tokens": tokens,
        "wall_s": wall,
        "tokens_per_s": tokens / wall,
        "ttft": summary(ttfts),
        "ttft_p95": p95,
        "ttft_p99": p99,
    }


def _report(label: str, row: dict[str, Any]) -> None:
    print(
        f"  {label}: {row['tokens_per_s']:.1f} tok/s, p50 TTFT {row['ttft']['median']:.2f}s, "
        f"p95 {row['ttft_p95']:.2f}s, errors {row['errors']}",
        flush=True,
    )


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
    args = parser.parse_args()
    model = args.model or DEFAULT_MODEL[args.device]
    clients = [int(c) for c in (args.clients or ("1,8,32" if args.device == "cpu" else "1,8,32,64")).split(",")]
    max_tokens = args.max_tokens or (64 if args.device == "cpu" else 128)
    texts = Texts(model)
    from adapters.mlx_lm.models import ModelSpec, _resolve

    path = Path(_resolve(ModelSpec(model, model)))  # mlx_lm.server gets the same converted directory
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "server.log"
        for mode in args.modes.split(","):
            print(f"mlx-gateway ({mode})", flush=True)
            env = {"MLX_GATEWAY_ISOLATION_MODE": mode, "MLX_GATEWAY_MAX_RUNNING": str(max(clients))}
            counts = clients if mode != "strict" else [int(c) for c in args.strict_clients.split(",")]
            with gateway(model, Path(tmp) / "caches", log, env=env) as gw:
                for r in run_all(gw.url, model, texts, counts, max_tokens):
                    rows.append({"server": f"mlx-gateway {mode}", **r})
                health = httpx.get(f"{gw.url}/health").json()
                print("  engine:", health["batch_steps"], health["memory"], flush=True)
                if mode == "balanced":
                    r = shared_prefix(gw.url, model, texts, args.shared_max_tokens, "shared-4k", args.shared_clients)
                    rows.append({"server": "mlx-gateway balanced", **r})
        if not args.skip_mlx_lm:
            print("mlx_lm.server", flush=True)
            with mlx_lm_server(path, log) as url:
                for r in run_all(url, str(path), texts, clients, max_tokens):
                    rows.append({"server": "mlx_lm.server", **r})
                r = shared_prefix(url, str(path), texts, args.shared_max_tokens, None, args.shared_clients)
                rows.append({"server": "mlx_lm.server", **r})
    notes = f"max_tokens {max_tokens}, temperature 0.7, no seed; prompts ~128 tokens of real text."
    write_result("concurrency", args.device, model, rows, notes=notes, out=args.out)


if __name__ == "__main__":
    main()
