"""Which weight format and thread count make mlx fastest for a small model on this CPU, in process.

Each variant runs in its own subprocess (thread counts are read when MKL loads): the gateway's loader
resolves the model (for ``smollm2-135m``, the Q4_1 GGUF converted with its 4-bit weights kept), then the
weights are put in one form and measured with mlx-lm's ``stream_generate``, greedy:

- ``float32``: dequantised at load, matmuls in MKL (what the gateway does on a Linux CPU);
- ``q4-as-stored``: the file's own 4-bit weights (group 32), mlx's quantised CPU kernels;
- ``q8``: dequantised, then re-quantised to 8 bits (group 64), mlx's quantised CPU kernels;
- ``bfloat16``: no BLAS path on mlx's CPU backend (kept as a reference point).

    python -m bench.cpu_paths --model smollm2-135m
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Any

from bench.harness import bench_parser, summary, write_result

PROMPT_TOKENS = 128
PREFILL_TOKENS = 1024


def measure(model_name: str, form: str, max_tokens: int, repeats: int) -> dict[str, Any]:
    """Runs in the child: load, convert to ``form``, time decode and a 1K-token prefill."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx_lm import stream_generate
    from mlx_lm.utils import dequantize_model, load

    from adapters.mlx_lm.models import ModelSpec, _resolve
    from bench.harness import Texts

    path = _resolve(ModelSpec(model_name, model_name))
    model, wrapper = load(path)[:2]
    if form != "q4-as-stored":
        dequantize_model(model)
        model.set_dtype(mx.bfloat16 if form == "bfloat16" else mx.float32)
    if form == "q8":
        nn.quantize(model, group_size=64, bits=8)
    mx.eval(model.parameters())
    texts = Texts(model_name)
    prompt = texts.ids[:PROMPT_TOKENS]
    rates = []
    for i in range(repeats + 1):
        start, first, n = time.perf_counter(), 0.0, 0
        for _ in stream_generate(model, wrapper, prompt, max_tokens=max_tokens):
            n += 1
            if n == 1:
                first = time.perf_counter() - start
        if i:
            rates.append((n - 1) / (time.perf_counter() - start - first))
    print("DECODE " + json.dumps(summary(rates)), flush=True)  # kept if the prefill runs out of time
    from mlx_lm.models.cache import make_prompt_cache

    prefill = []
    for i in range(repeats + 1):
        cache = make_prompt_cache(model)
        ids = texts.ids[:PREFILL_TOKENS]
        start = time.perf_counter()
        for j in range(0, len(ids), 512):  # the gateway's CPU prefill step
            logits = model(mx.array(ids[j : j + 512])[None], cache=cache)
            mx.eval(logits)
        if i:
            prefill.append(time.perf_counter() - start)
    return {"decode_tokens_per_s": summary(rates), "prefill_1k_s": summary(prefill)}


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--forms", default="float32,q4-as-stored,q8,bfloat16")
    parser.add_argument("--threads", default="2,1", help="MKL/OpenMP thread counts to try")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child-timeout", type=float, default=240, help="seconds per form before giving up")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    model = args.model or "smollm2-135m"
    if args.child:
        print("RESULT " + json.dumps(measure(model, args.child, args.max_tokens, args.repeats)), flush=True)
        return
    rows = []
    for form in args.forms.split(","):
        for threads in args.threads.split(","):
            if form != "float32" and threads != args.threads.split(",")[0]:
                continue  # mlx's own kernels do not read MKL's thread count
            env = {**os.environ, "MKL_NUM_THREADS": threads, "OMP_NUM_THREADS": threads}
            cmd = [sys.executable, "-m", "bench.cpu_paths", "--model", model, "--child", form]
            cmd += ["--max-tokens", str(args.max_tokens), "--repeats", str(args.repeats)]
            try:
                done = subprocess.run(
                    cmd, env=env, capture_output=True, text=True, check=False, timeout=args.child_timeout
                )
            except subprocess.TimeoutExpired as exc:  # mlx's quantised CPU kernels can be that slow: say so
                out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
                partial = [x for x in out.splitlines() if x.startswith("DECODE ")]
                row = {"form": form, "mkl_threads": int(threads), "timed_out_s": args.child_timeout}
                if partial:
                    row["decode_tokens_per_s"] = json.loads(partial[0].removeprefix("DECODE "))
                rows.append(row)
                print(f"{form} MKL threads {threads}: no result in {args.child_timeout} s", flush=True)
                continue
            if done.returncode != 0:
                print(done.stderr[-2000:], file=sys.stderr)
                raise SystemExit(f"{form} failed")
            line = next(x for x in reversed(done.stdout.splitlines()) if x.startswith("RESULT "))
            row = {"form": form, "mkl_threads": int(threads), **json.loads(line.removeprefix("RESULT "))}
            rows.append(row)
            print(
                f"{form} MKL threads {threads}: decode {row['decode_tokens_per_s']['median']:.1f} tok/s, "
                f"1K prefill {row['prefill_1k_s']['median'] * 1e3:.0f} ms",
                flush=True,
            )
    base = next(r for r in rows if r["form"] == "float32")
    for r in rows:
        if "decode_tokens_per_s" in r:
            r["decode_vs_float32"] = r["decode_tokens_per_s"]["median"] / base["decode_tokens_per_s"]["median"]
        if "timed_out_s" in r:
            continue
        r["decode_vs_float32"] = r["decode_tokens_per_s"]["median"] / base["decode_tokens_per_s"]["median"]
        r["prefill_vs_float32"] = r["prefill_1k_s"]["median"] / base["prefill_1k_s"]["median"]
    write_result(
        "cpu-paths",
        "cpu",
        model,
        rows,
        out=args.out,
        notes=(
            f"In process, mlx-lm stream_generate, greedy: a {PROMPT_TOKENS}-token prompt, {args.max_tokens} tokens "
            f"(tok/s without the first); prefill: {PREFILL_TOKENS} tokens in 512-token chunks. Medians of "
            f"{args.repeats} after a warm-up; each row in a fresh process."
        ),
    )


if __name__ == "__main__":
    main()
