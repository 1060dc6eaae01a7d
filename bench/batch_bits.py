"""Which layouts change one greedy request's bits, and what a decode step costs, per MKL CNR setting.

    python -m bench.batch_bits                       # MKL as MKL picks, and as the gateway sets it
    python -m bench.batch_bits --settings "off;gateway;MKL_CBWR=COMPATIBLE" --model small

One request (a prompt, then 24 greedy tokens with their logprobs and top-5) through the real
:class:`~adapters.mlx_lm.batching.Batcher`, compared bit for bit with its first run alone in a fresh
process, in these layouts:

- *alone after other traffic*: the same, after other requests went through the batch (the allocator's
  buffers, and so the arrays' alignment, differ);
- *alone, capacity 1024*: slots grow in steps of 1024 positions instead of 256;
- *alone in 4 rows*: the batch starts with four slots, three of them free (masked);
- *beside 1 / beside 3*: other requests decode in the same steps (2 and 4 live rows);
- *alone, in the batch an n=4 request left*: the batch stepped, as the engine steps it, only until that
  request's sequences ended; its four slots are still there when the request arrives;
- *prefix from a file*: the prompt's first half prefilled once, saved and loaded as safetensors (the
  cold path after a restart), then the rest prefilled on a view of it, against the same with the
  in-memory KV (the resident path);
- *sequential path*: strict mode's loop (one sequence a forward pass, plain ``KVCache``).

Then the decode step's time: 32 steps of one sequence and of eight. A setting is ``off`` (MKL left as it
sets itself: ``load_optimised_blas(reproducible=False)``), ``gateway`` (as the gateway sets it) or MKL
variables (``MKL_CBWR=COMPATIBLE MKL_DYNAMIC=FALSE``; what they leave out, the gateway sets). Each runs in a
fresh process (MKL reads its settings once, when it loads).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.mkl_cnr import setting_env

ROOT = Path(__file__).resolve().parent.parent


def child(model_name: str, models_dir: str | None, reproducible: bool) -> dict[str, Any]:
    from adapters.mlx_lm.blas import load_optimised_blas

    blas = load_optimised_blas(reproducible=reproducible)
    import mlx.core as mx
    from mlx_lm.models.cache import KVCache

    from adapters.base import SamplingParams
    from adapters.mlx_lm import slot_kv
    from adapters.mlx_lm.batching import Batcher
    from adapters.mlx_lm.models import ModelSpec, load_model
    from adapters.mlx_lm.sampling import ChoiceSampler, choice_keys

    loaded = load_model(ModelSpec(model_name, model_name, models_dir=models_dir))
    tok = loaded.tokenizer

    def prompt(words: str) -> list[int]:
        return tok.encode(f"<|im_start|>user\n{words}<|im_end|>\n<|im_start|>assistant\n")

    eos = tuple((t, -100.0) for t in tok.eos_token_ids)
    params = SamplingParams(max_tokens=24, temperature=0.0, logprobs=True, top_logprobs=5, logit_bias=eos)
    target = prompt("Review this function for logging issues. " * 6)
    others = [prompt(f"another question {i} about card numbers " * (1 + 3 * i)) for i in range(3)]

    def run(batcher: Batcher, first: list[int], beside: list[list[int]], cache: list[Any] | None = None) -> Any:
        uid = batcher.insert(first, cache or loaded.make_cache(), params, first)[0]
        for p in beside:
            batcher.insert(p, loaded.make_cache(), params, p)
        out: list[Any] = []
        while batcher.busy:
            out += [o.sampled for o in batcher.step() if o.uid == uid]
        return [(s.token, s.logprob, tuple(s.top)) for s in out]

    def alone(cache: list[Any] | None = None, prompt_tokens: list[int] | None = None) -> Any:
        return run(Batcher(loaded, 8), prompt_tokens or target, [], cache)

    results: dict[str, Any] = {"alone, first in the process": alone()}
    for p in others:
        run(Batcher(loaded, 8), p, others[:1])
    results["alone after other traffic"] = alone()
    step = slot_kv.CAPACITY_STEP
    slot_kv.CAPACITY_STEP = 1024
    results["alone, capacity 1024"] = alone()
    slot_kv.CAPACITY_STEP = step
    like = slot_kv.SlotBatch.like.__func__  # type: ignore[attr-defined]
    slot_kv.SlotBatch.like = classmethod(lambda cls, cache, rows, tokens: like(cls, cache, 4, tokens))  # type: ignore[method-assign,assignment]
    results["alone in 4 rows"] = alone()
    slot_kv.SlotBatch.like = classmethod(like)  # type: ignore[method-assign,assignment]
    results["beside 1"] = run(Batcher(loaded, 8), target, others[:1])
    results["beside 3"] = run(Batcher(loaded, 8), target, others)
    left = Batcher(loaded, 8)
    wide = SamplingParams(max_tokens=8, temperature=1.0, n=4)
    unfinished = set(left.insert(others[0], loaded.make_cache(), wide, others[0]))
    while unfinished:  # the engine steps a batch only while a request is in it
        unfinished -= {o.uid for o in left.step() if o.finish_reason is not None}
    results["alone, in the batch an n=4 request left"] = run(left, target, [])

    # The prefix path: resident KV against the same KV saved and loaded (a restart's cold load).
    half = len(target) // 2
    prefix = loaded.make_cache()
    loaded.model(mx.array(target[:half])[None], cache=prefix)
    mx.eval([c.state for c in prefix])

    def view(layers: list[Any]) -> list[Any]:
        out = []
        for layer in layers:
            c = KVCache()
            c.keys, c.values, c.offset = layer.keys[..., :half, :], layer.values[..., :half, :], half
            out.append(c)
        return out

    resident = run(Batcher(loaded, 8), target[half:], [], view(prefix))
    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "kv.safetensors")
        mx.save_safetensors(
            path, {f"{i}.{k}": getattr(c, k)[..., :half, :] for i, c in enumerate(prefix) for k in ("keys", "values")}
        )
        stored = mx.load(path)
        cold = []
        for i in range(len(prefix)):
            c = KVCache()
            c.keys, c.values, c.offset = stored[f"{i}.keys"], stored[f"{i}.values"], half
            cold.append(c)
        results["prefix resident"] = resident
        results["prefix from a file"] = run(Batcher(loaded, 8), target[half:], [], view(cold))

    # strict mode's sequential loop
    cache = loaded.make_cache()
    sampler = ChoiceSampler(params, loaded.vocab_size, choice_keys(None, 1)[0], target, None)
    logits = loaded.model(mx.array(target)[None], cache=cache)[0, -1, :]
    seq = []
    while len(seq) < params.max_tokens:
        s = sampler(logits)
        seq.append((s.token, s.logprob, tuple(s.top)))
        logits = loaded.model(mx.array([s.token])[None], cache=cache)[0, -1, :]
    results["sequential path"] = seq

    # decode-step time: 1 and 8 rows, steady state
    timing = {}
    long = SamplingParams(max_tokens=10_000, temperature=0.0, logit_bias=eos)
    for rows in (1, 8):
        samples = []
        for _ in range(3):
            batcher = Batcher(loaded, rows)
            for _ in range(rows):
                batcher.insert(target, loaded.make_cache(), long, target)
            for _ in range(6):
                batcher.step()
            started = time.perf_counter()
            for _ in range(32):
                batcher.step()
            samples.append((time.perf_counter() - started) / 32 * 1e3)
            batcher.close()
        timing[f"{rows} rows ms/step"] = statistics.median(samples)
    return {"results": results, "timing": timing, "mkl": blas.reproducibility or "as MKL picks"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", default="off;gateway", help="settings, ';' between (see above)")
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--models-dir")
    parser.add_argument("--rounds", type=int, default=1, help="each setting's process this many times (timings)")
    parser.add_argument("--child", choices=("off", "on"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.model, args.models_dir, args.child == "on")))
        return
    refs: dict[str, Any] = {}
    for _ in range(args.rounds):
        for setting in args.settings.split(";"):
            env = setting_env("unset" if setting in ("off", "gateway") else setting)
            mode = "off" if setting == "off" else "on"
            cmd = [sys.executable, "-m", "bench.batch_bits", "--child", mode, "--model", args.model]
            cmd += ["--models-dir", args.models_dir] if args.models_dir else []
            run = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
            if run.returncode != 0:
                print(f"{setting}: failed\n{run.stderr[-3000:]}")
                continue
            out = json.loads(run.stdout)
            res = out["results"]
            ref = res["alone, first in the process"]
            first = refs.setdefault(setting, ref)
            baseline = refs.setdefault("", ref)
            print(f"\n{setting} ({out['mkl']}): {', '.join(f'{k} {v:.2f}' for k, v in out['timing'].items())}")
            print(f"  {'same bits as this setting in an earlier process':>40}: {ref == first}")
            print(f"  {'same bits as the first setting':>40}: {ref == baseline}")
            for name, got in res.items():
                base = res["prefix resident"] if name == "prefix from a file" else ref
                if name == "prefix resident" or got is base:
                    continue
                tokens = [t for t, _, _ in got] == [t for t, _, _ in base]
                diff = max(
                    (abs(a - b) for (ta, a, _), (tb, b, _) in zip(base, got, strict=True) if ta == tb), default=0.0
                )
                what = "identical" if got == base else f"tokens {'equal' if tokens else 'DIFFER'}, logprobs {diff:.1e}"
                print(f"  {name:>40}: {what}")


if __name__ == "__main__":
    main()
