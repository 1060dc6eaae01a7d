"""The decode ceiling: how fast mlx itself decodes a batch, in process, with nothing around the step.

    python -m bench.decode_ceiling --device cpu --preset small --batches 1,8,32
    python -m bench.decode_ceiling --device gpu --batches 1,8,32,64,128 --prompt-tokens 512

Variants, each on the same weights (the gateway's own loading: float32 on CPU):

- *plain*: one mlx-lm ``KVCache`` per layer with a batch dimension, every sequence the same length, no
  attention mask, greedy, pipelined as mlx-lm's ``generate_step`` is (step N+1 is built and queued with
  ``mx.async_eval`` before step N's tokens are read). Nothing a server could do beats this loop.
- *padded*: the same loop on mlx-lm's ``BatchKVCache`` with mixed left padding (prompt lengths spread
  from half to the full ``--prompt-tokens``), so attention is masked as in mlx-lm's continuous batch.
- *batch-generator*: mlx-lm's ``BatchGenerator`` (the engine under the gateway's balanced mode) on the
  same mixed-length prompts, timed once every sequence has its first token.

Each row reports ms per decode step and tokens/s (batch x steps / time), medians over ``--repeats``
timed runs after ``--warmup`` untimed steps. Concurrency tables divide by the *plain* row of the same
batch size ("x% of the ceiling").
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from adapters.mlx_lm.blas import load_optimised_blas

load_optimised_blas()  # before mlx is imported below

import mlx.core as mx  # noqa: E402

from bench.harness import DEFAULT_MODEL, Texts, bench_parser, summary, write_result  # noqa: E402

VARIANTS = ("plain", "padded", "batch-generator")


def _prompts(texts: Texts, batch: int, tokens: int, mixed: bool) -> list[list[int]]:
    """``batch`` prompts of real text: all ``tokens`` long, or (mixed) spread from tokens/2 to tokens."""
    out = []
    for i in range(batch):
        n = tokens if not mixed or batch == 1 else tokens // 2 + (tokens - tokens // 2) * i // (batch - 1)
        start = (97 * i) % max(1, len(texts.ids) - n)
        out.append(texts.ids[start : start + n])
    return out


def _prefill(model: Any, inputs: mx.array, cache: list[Any], chunk: int) -> mx.array:
    """Prefill ``inputs`` (batch, length) in chunks; the greedy first tokens (batch,)."""
    logits = None
    for at in range(0, inputs.shape[1], chunk):
        logits = model(inputs[:, at : at + chunk], cache=cache)
        mx.eval([c.state for c in cache])
    assert logits is not None
    return mx.argmax(logits[:, -1, :], axis=-1)


def _timed_loop(step: Callable[[mx.array], mx.array], first: mx.array, warmup: int, steps: int) -> float:
    """Seconds for ``steps`` pipelined decode steps after ``warmup`` untimed ones."""
    y = step(first)
    mx.async_eval(y)
    start = 0.0
    for i in range(warmup + steps):
        if i == warmup:
            start = time.perf_counter()
        nxt = step(y)
        mx.async_eval(nxt)  # queued before this step's tokens are read, as generate_step does
        y.tolist()
        y = nxt
    y.tolist()
    return time.perf_counter() - start


def plain(model: Any, prompts: list[list[int]], chunk: int, warmup: int, steps: int) -> float:
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    first = _prefill(model, mx.array(prompts), cache, chunk)

    def step(y: mx.array) -> mx.array:
        return mx.argmax(model(y[:, None], cache=cache)[:, -1, :], axis=-1)

    return _timed_loop(step, first, warmup, steps)


def padded(model: Any, prompts: list[list[int]], chunk: int, warmup: int, steps: int) -> float:
    from mlx_lm.models.cache import BatchKVCache

    longest = max(len(p) for p in prompts)
    padding = [longest - len(p) for p in prompts]
    cache = [BatchKVCache(padding) for _ in model.layers]
    first = _prefill(model, mx.array([[0] * pad + p for pad, p in zip(padding, prompts, strict=True)]), cache, chunk)

    def step(y: mx.array) -> mx.array:
        return mx.argmax(model(y[:, None], cache=cache)[:, -1, :], axis=-1)

    return _timed_loop(step, first, warmup, steps)


def batch_generator(model: Any, prompts: list[list[int]], chunk: int, warmup: int, steps: int) -> float:
    from mlx_lm.generate import BatchGenerator

    n = len(prompts)
    gen = BatchGenerator(
        model,
        max_tokens=warmup + steps + 16,
        completion_batch_size=n,
        prefill_batch_size=min(8, n),  # the gateway's setting
        prefill_step_size=chunk,
    )
    try:
        gen.insert(prompts)
        started: set[int] = set()
        while len(started) < n:  # until every sequence has its first token
            started.update(r.uid for r in gen.next_generated())
        for _ in range(warmup):
            gen.next_generated()
        start = time.perf_counter()
        for _ in range(steps):
            gen.next_generated()
        return time.perf_counter() - start
    finally:
        gen.close()


RUNNERS: dict[str, Callable[[Any, list[list[int]], int, int, int], float]] = {
    "plain": plain,
    "padded": padded,
    "batch-generator": batch_generator,
}


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--preset", dest="model", help="same as --model")
    parser.add_argument("--batches", default=None, help="comma-separated batch sizes")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--steps", type=int, default=None, help="timed decode steps per run")
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    args = parser.parse_args()
    if args.device == "cpu":
        mx.set_default_device(mx.cpu)
    from adapters.mlx_lm.models import ModelSpec, load_model
    from adapters.mlx_lm.prefill import prefill_step

    model_name = args.model or DEFAULT_MODEL[args.device]
    batches = [int(b) for b in (args.batches or ("1,8,32" if args.device == "cpu" else "1,8,32,64,128")).split(",")]
    steps = args.steps or (32 if args.device == "cpu" else 128)
    variants = args.variants.split(",")
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variants {sorted(unknown)}; choose from {VARIANTS}")
    loaded = load_model(ModelSpec(model_name, model_name, max_running=max(batches)))
    chunk = prefill_step(loaded)
    texts = Texts(model_name)
    rows: list[dict[str, Any]] = []
    for variant in variants:
        for batch in batches:
            prompts = _prompts(texts, batch, args.prompt_tokens, mixed=variant != "plain")
            times = [RUNNERS[variant](loaded.model, prompts, chunk, args.warmup, steps) for _ in range(args.repeats)]
            ms = summary([t * 1e3 / steps for t in times])
            row = {
                "variant": variant,
                "batch": batch,
                "prompt_tokens": args.prompt_tokens,
                "steps": steps,
                "ms_per_step": ms,
                "tokens_per_s": batch * 1e3 / ms["median"],
            }
            rows.append(row)
            print(
                f"{variant:>15} batch {batch:4d}: {ms['median']:8.2f} ms/step ({ms['min']:.2f}-{ms['max']:.2f}), "
                f"{row['tokens_per_s']:9.1f} tok/s",
                flush=True,
            )
            mx.clear_cache()
    ceiling = {r["batch"]: r["tokens_per_s"] for r in rows if r["variant"] == "plain"}
    for row in rows:
        if row["batch"] in ceiling:
            row["of_ceiling"] = row["tokens_per_s"] / ceiling[row["batch"]]
    notes = (
        f"{args.prompt_tokens}-token prompts (padded and batch-generator: mixed, {args.prompt_tokens // 2}-"
        f"{args.prompt_tokens}), greedy, {steps} timed steps after {args.warmup}, medians of {args.repeats}; "
        f"weights {loaded.dtype}."
    )
    write_result("decode-ceiling", args.device, model_name, rows, notes=notes, out=args.out)


if __name__ == "__main__":
    main()
