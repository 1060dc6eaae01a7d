"""Where the engine thread's time goes under concurrent load: the real server with
``MLX_GATEWAY_PROFILE`` set (cProfile of the engine thread), a few bursts of streaming clients, then
the top functions by cumulative time.

    python -m bench.profile_engine --device gpu --clients 8,32
"""

from __future__ import annotations

import argparse
import asyncio
import io
import pstats
import tempfile
from pathlib import Path

import httpx

from bench.concurrency import burst
from bench.harness import DEFAULT_MODEL, Texts, gateway


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    parser.add_argument("--model")
    parser.add_argument("--clients", default="8,32")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--mode", default="balanced")
    parser.add_argument("--out", type=Path, default=Path("engine-profile.txt"))
    args = parser.parse_args()
    model = args.model or DEFAULT_MODEL[args.device]
    texts = Texts(model)
    with tempfile.TemporaryDirectory() as tmp:
        prof = Path(tmp) / "engine.prof"
        env = {
            "MLX_GATEWAY_PROFILE": str(prof),
            "MLX_GATEWAY_ISOLATION_MODE": args.mode,
            "MLX_GATEWAY_MAX_RUNNING": "64",
        }
        report = io.StringIO()
        with gateway(model, Path(tmp) / "caches", Path(tmp) / "server.log", env=env) as gw:
            asyncio.run(burst(gw.url, model, [texts.text(128, offset=50)], 8))  # warm-up
            for n in (int(c) for c in args.clients.split(",")):
                prompts = [texts.text(128, offset=200 + 131 * i) for i in range(n)]
                row = asyncio.run(burst(gw.url, model, prompts, args.max_tokens))
                line = (
                    f"{n} clients: {row['tokens_per_s']:.1f} tok/s, p50 TTFT {row['ttft']['median']:.2f}s, "
                    f"errors {row['errors']}"
                )
                print(line, flush=True)
                report.write(line + "\n")
            health = httpx.get(f"{gw.url}/health").json()
            report.write(f"batch steps: {health['batch_steps']}\nmemory: {health['memory']}\n\n")
        stats = pstats.Stats(str(prof), stream=report)
        stats.sort_stats("cumulative").print_stats(45)
        stats.sort_stats("tottime").print_stats(25)
    args.out.write_text(report.getvalue())
    print(report.getvalue()[:6000])


if __name__ == "__main__":
    main()
