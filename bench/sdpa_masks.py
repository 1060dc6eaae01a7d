"""Decode attention alone, Llama-3.1-8B shape (32 query heads, 8 KV heads, head dim 128, 32 layers): the
backend's fused kernel without a mask, against a boolean and an additive mask (what a batch of sequences of
different lengths needs).

    python -m bench.sdpa_masks --device gpu

On CUDA (mlx 0.32.4) a decode query with an array mask leaves the fused vector kernel; the ms per step of 32
layers' attention show what that costs at each batch and window.
"""

from __future__ import annotations

import time

import mlx.core as mx

from bench.harness import bench_parser, write_result

HEADS, KV_HEADS, HEAD_DIM, LAYERS = 32, 8, 128, 32


def timed(q: mx.array, k: mx.array, v: mx.array, mask: mx.array | None, repeats: int) -> float:
    def step() -> None:
        mx.eval([mx.fast.scaled_dot_product_attention(q, k, v, scale=HEAD_DIM**-0.5, mask=mask) for _ in range(LAYERS)])

    step()
    step()
    started = time.perf_counter()
    for _ in range(repeats):
        step()
    return (time.perf_counter() - started) / repeats * 1e3


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--batches", default="64,128")
    parser.add_argument("--windows", default="640,2048")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    if args.device == "cpu":
        mx.set_default_device(mx.cpu)
    rows = []
    for batch in map(int, args.batches.split(",")):
        for window in map(int, args.windows.split(",")):
            q = mx.random.normal((batch, HEADS, 1, HEAD_DIM)).astype(mx.bfloat16)
            k = mx.random.normal((batch, KV_HEADS, window, HEAD_DIM)).astype(mx.bfloat16)
            v = mx.random.normal((batch, KV_HEADS, window, HEAD_DIM)).astype(mx.bfloat16)
            lengths = mx.random.randint(window // 2, window, (batch,))
            boolean = (mx.arange(window)[None] < lengths[:, None])[:, None, None, :]
            additive = mx.where(boolean, 0.0, -mx.inf).astype(mx.bfloat16)
            mx.eval(q, k, v, boolean, additive)
            for name, mask in (("none", None), ("bool", boolean), ("additive", additive)):
                ms = timed(q, k, v, mask, args.repeats)
                rows.append({"batch": batch, "window": window, "mask": name, "ms_per_32_layers": ms})
                print(f"batch {batch} window {window} mask {name}: {ms:.2f} ms per 32 layers", flush=True)
    write_result("sdpa-masks", args.device, "none", rows, notes="decode attention only, bf16", out=args.out)


if __name__ == "__main__":
    main()
