"""A lone request's first token through the Batcher's lane (its prompt prefilled in chunks of the model's
prefill step, 512 tokens on a CPU) against one forward pass over the whole prompt, in process:
``python -m bench.lane_prefill [--tokens 4096]``. The issue-12 target compares a request's TTFT with one
pass; this shows what one pass costs on the machine at hand."""

from __future__ import annotations

import statistics
import time

from adapters.mlx_lm.blas import load_optimised_blas

load_optimised_blas()  # before mlx is imported below

import mlx.core as mx  # noqa: E402

from bench.harness import DEFAULT_MODEL, bench_parser, corpus_text, summary, write_result  # noqa: E402


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=4)
    args = parser.parse_args()
    if args.device == "cpu":
        mx.set_default_device(mx.cpu)
    from adapters.base import SamplingParams
    from adapters.mlx_lm.batching import Batcher
    from adapters.mlx_lm.models import ModelSpec, load_model
    from adapters.mlx_lm.prefill import prefill_step

    model_name = args.model or DEFAULT_MODEL[args.device]
    loaded = load_model(ModelSpec(model_name, model_name, max_running=8))
    tokens = loaded.tokenizer.encode(corpus_text())[: args.tokens]
    params = SamplingParams(max_tokens=1, temperature=0.0)

    def lane() -> float:
        batcher = Batcher(loaded, 8)
        started = time.perf_counter()
        batcher.insert(list(tokens), loaded.make_cache(), params, tokens)
        while not batcher.step():
            pass
        return time.perf_counter() - started

    def one_pass() -> float:
        started = time.perf_counter()
        mx.eval(loaded.forward(tokens, loaded.make_cache(), quantize=False))
        return time.perf_counter() - started

    lane(), one_pass()  # warm-up
    lanes = [lane() for _ in range(args.repeats)]
    passes = [one_pass() for _ in range(args.repeats)]
    step = prefill_step(loaded)
    ratio = statistics.median(lanes) / statistics.median(passes)
    print(
        f"{len(tokens)}-token prompt, {model_name}, {mx.default_device()}: lane (chunks of {step}) "
        f"{statistics.median(lanes) * 1000:.0f} ms, one pass {statistics.median(passes) * 1000:.0f} ms "
        f"({ratio:.2f}x), medians of {args.repeats}"
    )
    row = {
        "prompt_tokens": len(tokens),
        "prefill_step_size": step,
        "lane_first_token_seconds": summary(lanes),
        "one_pass_seconds": summary(passes),
        "ratio": ratio,
    }
    write_result("lane-prefill", args.device, model_name, [row], out=args.out)


if __name__ == "__main__":
    main()
