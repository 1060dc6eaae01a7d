"""Prototype check: decode with sequences coming and going, on slot KV (``adapters.mlx_lm.slot_kv``,
a departure frees a slot) against mlx-lm's ``BatchKVCache`` (a departure ``filter``s every layer, an
arrival ``extend``s it), with the plain loop (no churn) as the ceiling.

    python -m bench.slot_kv --device cpu --preset small --batch 8 --churn-every 4
    python -m bench.slot_kv --device gpu --batch 64 --churn-every 2 --steps 128

Every ``--churn-every`` steps one sequence leaves and a new one (prefilled beforehand on its own plain
cache; prefill is not timed) takes its place. Greedy; the time is the decode steps plus the departures
and arrivals, per step.
"""

from __future__ import annotations

import copy
import time
from typing import Any, cast

from adapters.mlx_lm.blas import load_optimised_blas

load_optimised_blas()  # before mlx is imported below

import mlx.core as mx  # noqa: E402

from bench.decode_ceiling import _prompts, plain  # noqa: E402
from bench.harness import DEFAULT_MODEL, Texts, bench_parser, summary, write_result  # noqa: E402


def _prefilled(model: Any, prompts: list[list[int]]) -> list[tuple[list[Any], int]]:
    from mlx_lm.models.cache import make_prompt_cache

    out = []
    for p in prompts:
        cache = make_prompt_cache(model)
        token = mx.argmax(model(mx.array(p)[None], cache=cache)[:, -1, :], axis=-1)
        mx.eval(token, [c.state for c in cache])
        out.append((cache, cast(int, token.item())))
    return out


def slots(model: Any, pool: list[tuple[list[Any], int]], batch: int, steps: int, churn: int, capacity: int) -> float:
    from adapters.mlx_lm.slot_kv import SlotBatch

    args = model.args
    head_dim = getattr(args, "head_dim", None) or args.hidden_size // args.num_attention_heads
    dtype = pool[0][0][0].keys.dtype
    sb = SlotBatch(len(model.layers), batch, capacity, args.num_key_value_heads, head_dim, dtype)
    tokens = []
    for i in range(batch):
        cache, token = pool[i]
        sb.admit(i, copy.deepcopy(cache))
        tokens.append(token)
    y = mx.array(tokens)
    arrivals = iter(pool[batch:])
    start = time.perf_counter()
    for step in range(steps):
        sb.prepare_step()
        y = mx.argmax(model(y[:, None], cache=sb.layers)[:, -1, :], axis=-1)
        sb.advance()
        mx.async_eval(y)
        if churn and step % churn == churn - 1:
            leaving = step // churn % batch
            sb.release(leaving)
            cache, token = next(arrivals)
            sb.admit(leaving, copy.deepcopy(cache))
            y[leaving] = token
        y.tolist()
    return time.perf_counter() - start


def batch_kv(model: Any, pool: list[tuple[list[Any], int]], batch: int, steps: int, churn: int) -> float:
    from mlx_lm.models.cache import BatchKVCache

    caches = [
        BatchKVCache.merge([copy.deepcopy(pool[i][0][layer]) for i in range(batch)])
        for layer in range(len(model.layers))
    ]
    y = mx.array([pool[i][1] for i in range(batch)])
    arrivals = iter(pool[batch:])
    start = time.perf_counter()
    for step in range(steps):
        y = mx.argmax(model(y[:, None], cache=caches)[:, -1, :], axis=-1)
        mx.async_eval(y)
        if churn and step % churn == churn - 1:  # as mlx-lm's GenerationBatch: filter out, extend in
            leaving = step // churn % batch
            keep = [i for i in range(batch) if i != leaving]
            cache, token = next(arrivals)
            for c, new in zip(caches, copy.deepcopy(cache), strict=True):
                c.filter(keep)
                c.extend(BatchKVCache.merge([new]))
            y = mx.concatenate([y[mx.array(keep)], mx.array([token])])
        y.tolist()
    return time.perf_counter() - start


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--preset", dest="model", help="same as --model")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--churn-every", type=int, default=4, help="steps between departures (0: none)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if args.device == "cpu":
        mx.set_default_device(mx.cpu)
    from adapters.mlx_lm.models import ModelSpec, load_model
    from adapters.mlx_lm.prefill import prefill_step

    model_name = args.model or DEFAULT_MODEL[args.device]
    steps = args.steps or (32 if args.device == "cpu" else 128)
    loaded = load_model(ModelSpec(model_name, model_name, max_running=args.batch))
    model = loaded.model
    texts = Texts(model_name)
    arrivals = steps // args.churn_every if args.churn_every else 0
    prompts = _prompts(texts, args.batch + arrivals, args.prompt_tokens, mixed=True)
    pool = _prefilled(model, prompts)
    capacity = args.prompt_tokens + steps + 8
    chunk = prefill_step(loaded)
    equal = _prompts(texts, args.batch, args.prompt_tokens, mixed=False)
    times: dict[str, list[float]] = {"plain (no churn)": [], "BatchKVCache filter/extend": [], "slots": []}
    for _ in range(args.repeats):  # interleaved rounds
        times["plain (no churn)"].append(plain(model, equal, chunk, 0, steps))
        times["BatchKVCache filter/extend"].append(batch_kv(model, pool, args.batch, steps, args.churn_every))
        times["slots"].append(slots(model, pool, args.batch, steps, args.churn_every, capacity))
        mx.clear_cache()
    rows = []
    for name, ts in times.items():
        ms = summary([t * 1e3 / steps for t in ts])
        rows.append({"path": name, "batch": args.batch, "churn_every": args.churn_every, "ms_per_step": ms})
        print(f"{name:>28}: {ms['median']:8.2f} ms/step (min {ms['min']:.2f})", flush=True)
    notes = (
        f"batch {args.batch}, prompts {args.prompt_tokens // 2}-{args.prompt_tokens} tokens, {steps} steps, one "
        f"departure and one arrival every {args.churn_every} steps, greedy, medians of {args.repeats} rounds."
    )
    write_result("slot-kv", args.device, model_name, rows, notes=notes, out=args.out)


if __name__ == "__main__":
    main()
