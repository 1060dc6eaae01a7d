"""Where a continued conversation's first token goes, in process (no HTTP): a stored sequence of ``--cached`` tokens
continued by ``--new`` tokens, against the same ``--new`` tokens alone and the whole prompt prefilled, in each
isolation mode (strict: the sequential path; balanced: the batch). Prints TTFT and the KV hand-over time.

    python -m bench.continuation_profile --model llama-8b --cached 3400 --new 318
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

from adapters.mlx_lm.blas import load_optimised_blas

load_optimised_blas()

from adapters.base import Plan, ResponseKVUse, SamplingParams, Started, TokenEvent  # noqa: E402
from adapters.mlx_lm.engine import MlxEngine  # noqa: E402
from adapters.mlx_lm.models import ModelSpec  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="small")
    parser.add_argument("--cached", type=int, default=3400)
    parser.add_argument("--new", type=int, default=318)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--modes", default="balanced,strict")
    args = parser.parse_args()
    modes = args.modes.split(",")
    engine = MlxEngine([ModelSpec(mode, args.model, isolation_mode=mode) for mode in modes])
    engine.start()
    while any(m["state"] == "loading" for m in engine.health()["models"].values()):
        time.sleep(0.2)

    def ask(model: str, tokens: list[int], use: ResponseKVUse | None, max_tokens: int = 1) -> tuple[float, float, int]:
        plan = Plan(
            "p", model, "t", tuple(tokens), SamplingParams(max_tokens=max_tokens, temperature=0), response_kv=use
        )

        async def go() -> tuple[float, float, int, list[int]]:
            start, first, load, cached, out = time.perf_counter(), 0.0, 0.0, 0, []
            async for event in engine.submit(plan):
                if isinstance(event, Started):
                    load, cached = event.prefix_load_ms, event.cached_tokens
                if isinstance(event, TokenEvent):
                    first = first or time.perf_counter() - start
                    out.extend(event.token_ids)
            return first, load, cached, out

        first, load, cached, out = asyncio.run(go())
        ask.out = out  # type: ignore[attr-defined]
        return first, load, cached

    for mode in modes:
        base = [100 + (i * 7) % 20000 for i in range(args.cached)]
        ask(mode, base[:64], None)  # warm-up
        ask(mode, base, ResponseKVUse(keep_as="parent"), max_tokens=8)
        seq = base + ask.out  # type: ignore[attr-defined]
        new = [300 + (i * 13) % 20000 for i in range(args.new)]
        rows = {"continued": [], "new alone": [], "whole prompt": []}
        loads = []
        for _ in range(args.repeats):
            t, load, cached = ask(mode, seq + new, ResponseKVUse(parent="parent", reuse=len(seq)))
            rows["continued"].append(t)
            loads.append(load)
            rows["new alone"].append(ask(mode, new, None)[0])
            rows["whole prompt"].append(ask(mode, seq + new, None)[0])
        print(f"{args.model} {mode}: cached {cached} of {len(seq) + len(new)} tokens", flush=True)
        for name, times in rows.items():
            each = [round(x * 1000, 1) for x in times]
            print(f"  {name:>13}: TTFT median {statistics.median(times) * 1000:.1f} ms  {each}")
        print(f"  KV hand-over (view): median {statistics.median(loads):.2f} ms", flush=True)
    engine.stop()


if __name__ == "__main__":
    main()
