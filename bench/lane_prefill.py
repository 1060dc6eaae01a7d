"""A lone request's first token through the Batcher's lane (its prompt prefilled in chunks of the model's
prefill step, 512 tokens on a CPU) against one forward pass over the whole prompt, in process:
``python -m bench.lane_prefill [--model small] [--tokens 4096]``. The issue-12 target compares a request's
TTFT with one pass; this shows what one pass costs on the machine at hand."""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="small")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=4)
    args = parser.parse_args()
    from adapters.mlx_lm.blas import load_optimised_blas

    load_optimised_blas()
    import mlx.core as mx

    from adapters.base import SamplingParams
    from adapters.mlx_lm.batching import Batcher
    from adapters.mlx_lm.models import ModelSpec, load_model

    loaded = load_model(ModelSpec(args.model, args.model, max_running=8))
    prose = Path(__file__).resolve().parent.parent.joinpath("tests", "data", "prose.txt").read_text()
    tokens = loaded.tokenizer.encode((prose + " ") * 40)[: args.tokens]
    params = SamplingParams(max_tokens=1, temperature=0.0)

    def lane() -> float:
        batcher = Batcher(loaded, 8)
        started = time.perf_counter()
        batcher.insert(list(tokens), loaded.make_cache(), params, tokens)
        while not batcher.step():
            pass
        return (time.perf_counter() - started) * 1000

    def one_pass() -> float:
        cache = loaded.make_cache()
        started = time.perf_counter()
        mx.eval(loaded.model(mx.array(tokens)[None], cache=cache)[:, -1, :])
        return (time.perf_counter() - started) * 1000

    lane(), one_pass()  # warm-up
    lanes = [lane() for _ in range(args.repeats)]
    passes = [one_pass() for _ in range(args.repeats)]
    step = loaded.spec.prefill_step_size
    print(
        f"{len(tokens)}-token prompt, {args.model}, {mx.default_device()}: lane (chunks of {step}) "
        f"{statistics.median(lanes):.0f} ms, one pass {statistics.median(passes):.0f} ms "
        f"({statistics.median(lanes) / statistics.median(passes):.2f}x), medians of {args.repeats}"
    )


if __name__ == "__main__":
    main()
