"""Adapters per request: a mixed batch of 4 LoRA adapters and the base model against the base model alone,
the memory each adapter adds, and per-row adapters against grouped ones for one decode step.

    python -m bench.adapters --device cpu                    # small
    python -m bench.adapters --device gpu                    # llama-8b
    python -m bench.adapters --device cpu --closed-duration 30 --rounds 2 --adapters-only

Targets (issue 23): with 32 clients spread over 4 adapters and the base model, aggregate tokens/s >= 0.8x of
32 clients on the base model alone; each extra adapter costs its own size, not a copy of the base.

Three parts, each on the same base model (a preset with random weights) and 4 random rank-``--rank`` LoRA
adapters on q/k/v/o (``bench.random_adapters``, seeds 1-4):

- *serving* (the real server, started once with ``--adapter a0=PATH ... --adapter a3=PATH``, balanced mode,
  ``--max-running`` = clients): closed loops as ``bench.concurrency``'s (each client sends its next request as
  soon as its last ends; ~128-token prompts of real text, each request a different slice; temperature 0.7;
  ``--max-tokens``), tokens counted for ``--closed-duration`` s after a ``--closed-warmup`` s ramp. Phases:
  *base* (every client on the base model) and *mixed* (client k on [base, a0, a1, a2, a3][k % 5]), alternated
  for ``--rounds`` rounds so that drift shows; ``--adapters-only`` adds one phase with every client on an
  adapter (client k on a[k % 4]). Unlike ``bench.concurrency``, requests still running when the window closes
  are cancelled (the client disconnects) rather than run to their end, so phases do not wait for stragglers;
  TTFT is taken over the requests started in the first three quarters of the window (a request started later
  may be cut before its first token).
- *memory* (in process, no server): the base model loaded as the server loads it, then the adapters added to its
  :class:`~adapters.mlx_lm.lora.AdapterBank` one by one; mlx's active memory after each (after ``mx.clear_cache``)
  against the adapter's own size (its factors as read from the file; the bank keeps them in the model's dtype).
- *step* (in process): one decode step of ``--clients`` rows on a KV cache of ``--step-context`` positions
  (filled with random keys and values: attention's cost does not depend on them), ms per step: *base* (no adapter
  row), *per-row* (the rows mixed as in the mixed phase, the bank's path: dense products
  over every adapter's blocks, each row masked to its own), *grouped* (the same rows,
  but each adapter's rows gathered, ``(x[rows] @ A) @ B`` and added back, one adapter after another: a bench-only
  replacement of ``AdaptedLinear.__call__``), and *grouped-steps* (one forward pass per adapter group, 5 passes
  of 6-7 rows, each on its own cache): what "one step per adapter" would cost.
"""

from __future__ import annotations

import asyncio
import gc
import itertools
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import openai

from adapters.mlx_lm.blas import load_optimised_blas

load_optimised_blas()  # before mlx is imported below

import mlx.core as mx  # noqa: E402

from bench.concurrency import Timed, _quantile, stream_into  # noqa: E402
from bench.harness import (  # noqa: E402
    DEFAULT_MODEL,
    Texts,
    bench_parser,
    free_port,
    server_process,
    summary,
    write_result,
)

ADAPTERS = ("a0", "a1", "a2", "a3")


# ---- the adapters ---------------------------------------------------------------------------------------------


def write_adapters(model_path: Path, root: Path, rank: int) -> dict[str, Path]:
    """4 random rank-``rank`` LoRA adapters on q/k/v/o for the model at ``model_path``, in ``root``."""
    from mlx_lm.utils import load_model as mlx_load_model

    from bench.random_adapters import ATTENTION_KEYS, make_random_adapter

    model, _ = mlx_load_model(model_path, lazy=True)
    out = {}
    for i, name in enumerate(ADAPTERS):
        out[name] = make_random_adapter(model, root / name, rank=rank, keys=ATTENTION_KEYS, seed=i + 1)
    del model
    gc.collect()
    mx.clear_cache()
    return out


# ---- serving --------------------------------------------------------------------------------------------------


@contextmanager
def adapter_server(
    model: str, adapters: dict[str, Path], cache_dir: Path, log: Path, max_running: int
) -> Iterator[str]:
    """``mlx-gateway serve`` (the real server) with the adapters; its URL once ready."""
    import sys

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "gateway.cli.main", "serve", "--model", model, "--port", str(port)]
    cmd += ["--cache-dir", str(cache_dir), "--max-running", str(max_running)]
    for name, path in adapters.items():
        cmd += ["--adapter", f"{name}={path}"]
    env = {"PYTHONUNBUFFERED": "1", "MLX_GATEWAY_ISOLATION_MODE": "balanced"}
    with server_process(cmd, url, log, env):
        yield url


async def closed_loop_models(
    base: str, models: list[str], prompt: Callable[[], str], duration: float, warmup: float, max_tokens: int
) -> dict[str, Any]:
    """One client per entry of ``models``, each on its model, sending requests back to back; steady-state
    figures over ``duration`` s after ``warmup`` s. At the window's end the requests in flight are cancelled."""
    client = openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="bench", max_retries=0, timeout=3600)
    begin = time.perf_counter()
    lo, hi = begin + warmup, begin + warmup + duration
    records: list[tuple[str, Timed]] = []

    async def worker(model: str) -> None:
        while time.perf_counter() < hi:
            record = Timed(time.perf_counter())
            records.append((model, record))
            await stream_into(client, model, prompt(), max_tokens, record)
            if not record.ok:
                await asyncio.sleep(0.1)  # a refused connection must not spin

    tasks = [asyncio.create_task(worker(m)) for m in models]
    await asyncio.sleep(max(0.0, hi - time.perf_counter()))
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await client.close()
    ttft_until = lo + 0.75 * duration
    ttfts = sorted(r.times[0] - r.start for _, r in records if r.ok and r.times and lo <= r.start < ttft_until)
    gaps = sorted(b - a for _, r in records for a, b in itertools.pairwise(r.times) if lo <= b < hi)
    per_model: dict[str, int] = {}
    for model, r in records:
        per_model[model] = per_model.get(model, 0) + sum(1 for t in r.times if lo <= t < hi)
    tokens = sum(per_model.values())
    return {
        "clients": len(models),
        "duration_s": duration,
        "warmup_s": warmup,
        "requests": len(records),
        "requests_finished_in_window": sum(1 for _, r in records if r.ok and r.times and lo <= r.times[-1] < hi),
        "errors": sum(1 for _, r in records if not r.ok),
        "tokens": tokens,
        "tokens_per_s": tokens / duration,
        "tokens_per_s_by_model": {m: n / duration for m, n in sorted(per_model.items())},
        "ttft": summary(ttfts or [float("nan")]),
        "ttft_p95": _quantile(ttfts, 0.95),
        "itl_ms": {"p50": _quantile(gaps, 0.5) * 1e3, "p95": _quantile(gaps, 0.95) * 1e3, "n": len(gaps)},
    }


async def prime(base: str, models: list[str], prompt: Callable[[], str]) -> None:
    """One short request on each model, all at once, before anything is timed (first use of each path)."""
    client = openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="bench", max_retries=0, timeout=3600)
    records = [Timed(time.perf_counter()) for _ in models]
    await asyncio.gather(*(stream_into(client, m, prompt(), 8, r) for m, r in zip(models, records, strict=True)))
    await client.close()


def phase_models(phase: str, base_model: str, clients: int) -> list[str]:
    """Each client's model: all on the base, mixed round robin over [base, a0..a3], or adapters only."""
    if phase == "base":
        return [base_model] * clients
    if phase == "mixed":
        names = [base_model, *ADAPTERS]
        return [names[k % len(names)] for k in range(clients)]
    if phase == "adapters-only":
        return [ADAPTERS[k % len(ADAPTERS)] for k in range(clients)]
    raise ValueError(phase)


def serve_phases(
    url: str,
    model: str,
    texts: Texts,
    phases: list[tuple[int, str]],
    clients: int,
    duration: float,
    warmup: float,
    max_tokens: int,
) -> list[dict[str, Any]]:
    span = len(texts.ids) - 200
    numbers = itertools.count()

    def prompt() -> str:  # a different slice for every request of the run: no prompt-cache hits
        return texts.text(128, offset=(1000 + 131 * next(numbers)) % span)

    listed = httpx.get(f"{url}/v1/models", timeout=30).json()["data"]
    print("  models:", ", ".join(f"{m['id']} (parent {m.get('parent')})" for m in listed), flush=True)
    asyncio.run(prime(url, [model, *ADAPTERS], prompt))
    rows = []
    for round_, phase in phases:
        load = os.getloadavg()[0]
        row = asyncio.run(
            closed_loop_models(url, phase_models(phase, model, clients), prompt, duration, warmup, max_tokens)
        )
        row = {"part": "serving", "phase": phase, "round": round_, "load_before": round(load, 2), **row}
        by = ", ".join(f"{m} {v:.1f}" for m, v in row["tokens_per_s_by_model"].items())
        print(
            f"  round {round_} {phase:13s}: {row['tokens_per_s']:.1f} tok/s, p50 TTFT {row['ttft']['median']:.2f}s, "
            f"ITL p50 {row['itl_ms']['p50']:.1f} ms, errors {row['errors']}, load {load:.2f} [{by}]",
            flush=True,
        )
        rows.append(row)
    return rows


def serving_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    by_round: dict[int, dict[str, float]] = {}
    for r in rows:
        by_round.setdefault(r["round"], {})[r["phase"]] = r["tokens_per_s"]
    ratios = [p["mixed"] / p["base"] for _, p in sorted(by_round.items()) if "base" in p and "mixed" in p]
    base = [r["tokens_per_s"] for r in rows if r["phase"] == "base"]
    out: dict[str, Any] = {
        "part": "serving-summary",
        "base_tokens_per_s": summary(base),
        "mixed_over_base_per_round": ratios,
        "mixed_over_base": statistics.median(ratios) if ratios else float("nan"),
        "target": 0.8,
    }
    for phase in ("mixed", "adapters-only"):
        rates = [r["tokens_per_s"] for r in rows if r["phase"] == phase]
        if rates:
            out[f"{phase}_tokens_per_s"] = summary(rates)
    if "adapters-only_tokens_per_s" in out:
        only = out["adapters-only_tokens_per_s"]["median"]
        out["adapters_only_over_base"] = only / out["base_tokens_per_s"]["median"]
    out["met"] = bool(ratios) and out["mixed_over_base"] >= 0.8
    return out


def server_problems(log: Path) -> list[str]:
    """Lines of the server's log that say something went wrong."""
    words = ("Traceback", "ERROR", "Error:", "exception")
    lines = log.read_text(errors="replace").splitlines() if log.exists() else []
    return [line[:300] for line in lines if any(w in line for w in words)][:40]


# ---- memory ---------------------------------------------------------------------------------------------------


def _active() -> int:
    gc.collect()
    mx.synchronize()
    mx.clear_cache()
    return int(mx.get_active_memory())


def memory(loaded: Any, adapters: dict[str, Path]) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Active memory after the base model and after each adapter added; the adapters' bank indices."""
    from mlx.utils import tree_flatten

    from adapters.mlx_lm.lora import read_adapter

    base_bytes = sum(v.nbytes for _, v in tree_flatten(loaded.model.parameters()) if isinstance(v, mx.array))
    before = _active()
    rows: list[dict[str, Any]] = [
        {"part": "memory", "what": "base", "active_bytes": before, "weights_bytes": base_bytes, "dtype": loaded.dtype}
    ]
    print(f"  base model: {base_bytes / 1e6:.1f} MB of weights, active {before / 1e6:.1f} MB", flush=True)
    indices = {}
    bank = loaded.bank
    for name, path in adapters.items():
        files = read_adapter(path)
        size, rank = files.nbytes, files.rank
        bank_before = bank.nbytes()
        indices[name] = bank.add(name, files)
        del files
        now = _active()
        row = {
            "part": "memory",
            "what": name,
            "rank": rank,
            "adapter_bytes": size,  # its factors as read (float32 in the file)
            "bank_bytes_added": bank.nbytes() - bank_before,  # as the bank keeps them (the model's dtype)
            "active_bytes": now,
            "active_added": now - before,
            "active_added_over_adapter": (now - before) / size,
            "active_added_over_base": (now - before) / base_bytes,
        }
        print(
            f"  + {name}: file factors {size / 1e6:.2f} MB, bank +{row['bank_bytes_added'] / 1e6:.2f} MB, "
            f"active +{(now - before) / 1e6:.2f} MB ({row['active_added_over_adapter']:.2f}x its size, "
            f"{row['active_added_over_base']:.2%} of the base)",
            flush=True,
        )
        rows.append(row)
        before = now
    return rows, indices


# ---- one decode step: per row against grouped -----------------------------------------------------------------

# The grouped variant's rows: (stack index, row indices) per adapter present; set around its passes only.
_GROUPS: list[tuple[int, mx.array]] | None = None


def _grouped_call(self: Any, x: mx.array) -> mx.array:
    """Bench-only ``AdaptedLinear.__call__`` (LoRA only): each adapter's rows gathered, their delta computed with
    that adapter's factors alone and added back at those rows."""
    y = self.base(x)
    if _GROUPS is None or not self._used or self._a is None or self._b is None:
        return y
    assert self._g is None, "the grouped variant is LoRA only"
    for stack, rows in _GROUPS:
        delta = (x[rows] @ self._a[:, stack, :]) @ self._b[stack]
        y = y.at[rows].add(delta.astype(y.dtype))
    return y


def _filled_cache(loaded: Any, batch: int, context: int) -> list[Any]:
    """The model's prompt cache for ``batch`` rows holding ``context`` positions of random keys and values."""
    from mlx_lm.models.cache import make_prompt_cache

    inner = getattr(loaded.model, "wrapped", loaded.model)
    args = inner.args
    heads = args.num_attention_heads
    kv_heads = getattr(args, "num_key_value_heads", None) or heads
    head_dim = getattr(args, "head_dim", None) or args.hidden_size // heads
    dtype = getattr(mx, loaded.dtype, None)  # the weights' dtype: the activations', so the KV's
    if dtype not in (mx.float32, mx.float16, mx.bfloat16):  # quantised weights
        dtype = mx.float32 if mx.default_device() == mx.cpu else mx.bfloat16
    cache = make_prompt_cache(loaded.model)
    for layer in cache:
        k = (0.1 * mx.random.normal((batch, kv_heads, context, head_dim))).astype(dtype)
        v = (0.1 * mx.random.normal((batch, kv_heads, context, head_dim))).astype(dtype)
        layer.update_and_fetch(k, v)
    mx.eval([c.state for c in cache])
    return cache


def _rows_of(loaded: Any, cache: list[Any], rows: list[int]) -> list[Any]:
    """A prompt cache holding ``rows`` of ``cache``'s KV (a group's own cache for one pass per group)."""
    from mlx_lm.models.cache import make_prompt_cache

    index = mx.array(rows)
    out = make_prompt_cache(loaded.model)
    for mine, theirs in zip(out, cache, strict=True):
        n = theirs.offset
        mine.update_and_fetch(theirs.keys[index, :, :n], theirs.values[index, :, :n])
    mx.eval([c.state for c in out])
    return out


def step_times(
    loaded: Any, indices: dict[str, int], batch: int, context: int, steps: int, repeats: int
) -> list[dict[str, Any]]:
    global _GROUPS
    from adapters.mlx_lm.lora import AdaptedLinear

    order = [0, *(indices[n] for n in ADAPTERS)]
    rows = [order[k % len(order)] for k in range(batch)]
    vocab = loaded.vocab_size
    x = mx.random.randint(0, vocab, (batch, 1))
    cache = _filled_cache(loaded, batch, context)
    groups = {idx: [k for k, r in enumerate(rows) if r == idx] for idx in order}
    group_caches = {idx: _rows_of(loaded, cache, ks) for idx, ks in groups.items()}
    adapter_groups = [(idx - 1, mx.array(ks)) for idx, ks in groups.items() if idx]
    original = AdaptedLinear.__call__

    def one(cache: list[Any], x: mx.array, adapters: list[int]) -> mx.array:
        with loaded.rows(adapters):
            out = loaded.model(x, cache=cache)[:, -1, :]
        return out

    def trim(*caches: list[Any]) -> None:  # back to ``context`` positions: every step sees the same length
        for c in caches:
            for layer in c:
                layer.trim(layer.offset - context)

    def base() -> mx.array:
        return one(cache, x, [0] * batch)

    def per_row() -> mx.array:
        return one(cache, x, rows)

    def grouped() -> mx.array:
        global _GROUPS
        AdaptedLinear.__call__ = _grouped_call  # type: ignore[method-assign]
        _GROUPS = adapter_groups
        try:
            # The bank's rows are what marks the pass as adapted; _grouped_call reads _GROUPS instead.
            return one(cache, x, rows)
        finally:
            AdaptedLinear.__call__ = original  # type: ignore[method-assign]
            _GROUPS = None

    def grouped_steps() -> mx.array:
        outs = [one(group_caches[idx], x[mx.array(ks)], [idx] * len(ks)) for idx, ks in groups.items()]
        return mx.concatenate(outs)

    variants: dict[str, Callable[[], mx.array]] = {
        "base": base,
        "per-row": per_row,
        "grouped": grouped,
        "grouped-steps": grouped_steps,
    }

    def run(fn: Callable[[], mx.array]) -> tuple[float, mx.array]:
        start = time.perf_counter()
        out = fn()
        mx.eval(out)
        took = time.perf_counter() - start
        trim(cache, *group_caches.values())
        return took, out

    # Agreement: grouped must give the per-row logits (the same adapters on the same rows).
    _, a = run(per_row)
    _, b = run(grouped)
    _, c = run(grouped_steps)
    inverse = mx.array([k for ks in groups.values() for k in ks])
    c_rows = mx.zeros_like(c)
    c_rows[inverse] = c
    _, plain = run(base)
    diff = {
        "grouped_vs_per_row": float(mx.abs(a - b).max()),
        "grouped_steps_vs_per_row": float(mx.abs(a - c_rows).max()),
        "per_row_vs_base": float(mx.abs(a - plain).max()),
    }
    print(f"  max |logit difference|: {', '.join(f'{k} {v:.2e}' for k, v in diff.items())}", flush=True)
    for fn in variants.values():  # warm-up
        run(fn)
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):  # interleaved, so that drift spreads over every variant alike
        for name, fn in variants.items():
            times[name] += [run(fn)[0] for _ in range(steps)]
    base_ms = statistics.median(times["base"]) * 1e3
    out = []
    for name, seconds in times.items():
        ms = [s * 1e3 for s in seconds]
        row = {
            "part": "step",
            "variant": name,
            "batch": batch,
            "context": context,
            "rows": "all base" if name == "base" else "[base, a0, a1, a2, a3][k % 5]",
            "passes": len(groups) if name == "grouped-steps" else 1,
            "ms_per_step": summary(ms),
            "over_base": statistics.median(ms) / base_ms,
        }
        print(
            f"  {name:13s}: {row['ms_per_step']['median']:.2f} ms/step ({min(ms):.2f}-{max(ms):.2f}), "
            f"{row['over_base']:.2f}x base",
            flush=True,
        )
        out.append(row)
    out.append({"part": "step-check", "max_abs_logit_difference": diff})
    return out


def in_process(
    model: str, adapters: dict[str, Path], batch: int, context: int, steps: int, repeats: int
) -> list[dict[str, Any]]:
    from adapters.mlx_lm.models import ModelSpec, load_model

    loaded = load_model(ModelSpec(model, model, max_running=batch))
    print(f"  loaded {model}: {loaded.dtype}, weights: {loaded.weights}", flush=True)
    rows, indices = memory(loaded, adapters)
    load = os.getloadavg()[0]
    print(f"step: batch {batch}, context {context}, load {load:.2f}", flush=True)
    rows += [{**r, "load_before": round(load, 2)} for r in step_times(loaded, indices, batch, context, steps, repeats)]
    return rows


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--closed-duration", type=float, default=None, help="tokens counted for this long, s")
    parser.add_argument("--closed-warmup", type=float, default=None, help="ramp left out before the window, s")
    parser.add_argument("--max-tokens", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=2, help="rounds of base then mixed")
    parser.add_argument("--adapters-only", action="store_true", help="also one phase with every client on an adapter")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--step-context", type=int, default=512, help="KV positions of the step comparison")
    parser.add_argument("--step-steps", type=int, default=None, help="timed steps per variant and repeat")
    parser.add_argument("--step-repeats", type=int, default=3)
    parser.add_argument("--skip-serving", action="store_true")
    parser.add_argument("--skip-in-process", action="store_true")
    parser.add_argument("--server-log", type=Path, help="keep the server's log here (default: a temporary file)")
    args = parser.parse_args()
    model = args.model or DEFAULT_MODEL[args.device]
    gpu = args.device == "gpu"
    duration = args.closed_duration or (20.0 if gpu else 30.0)
    warmup = args.closed_warmup if args.closed_warmup is not None else (8.0 if gpu else 10.0)
    max_tokens = args.max_tokens or (128 if gpu else 64)
    steps = args.step_steps or (10 if gpu else 8)
    texts = Texts(model)  # builds the preset if needed
    from adapters.mlx_lm.models import ModelSpec, _resolve

    path = Path(_resolve(ModelSpec(model, model)))
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        print(f"writing {len(ADAPTERS)} random rank-{args.rank} LoRA adapters on q/k/v/o", flush=True)
        adapters = write_adapters(path, Path(tmp) / "adapters", args.rank)
        if not args.skip_serving:
            phases = [(r, p) for r in range(1, args.rounds + 1) for p in ("base", "mixed")]
            if args.adapters_only:
                phases.append((args.rounds, "adapters-only"))
            log = args.server_log or Path(tmp) / "server.log"
            print(f"serving: {args.clients} clients, closed loop {duration:.0f} s after {warmup:.0f} s", flush=True)
            with adapter_server(model, adapters, Path(tmp) / "caches", log, max(32, args.clients)) as url:
                serving = serve_phases(url, model, texts, phases, args.clients, duration, warmup, max_tokens)
                health = httpx.get(f"{url}/health", timeout=30).json()
            problems = server_problems(log)
            rows += serving
            total = serving_summary(serving)
            total["server_log_problems"] = problems
            total["health"] = {k: health.get(k) for k in ("batch_steps", "memory", "models") if k in health}
            rows.append(total)
            if problems:
                print(f"  server log: {len(problems)} problem lines, first: {problems[0]}", flush=True)
        if not args.skip_in_process:
            print("in process: memory", flush=True)
            rows += in_process(model, adapters, args.clients, args.step_context, steps, args.step_repeats)
    notes = (
        f"4 random rank-{args.rank} LoRA adapters on q/k/v/o (bench.random_adapters); {args.clients} clients, "
        f"max_tokens {max_tokens}, temperature 0.7, ~128-token prompts of real text, closed loop "
        f"{duration:.0f} s counted after a {warmup:.0f} s ramp, requests in flight at the end cancelled; "
        f"step comparison: batch {args.clients}, {args.step_context} KV positions, {steps} steps x "
        f"{args.step_repeats} interleaved repeats per variant."
    )
    write_result("adapters", args.device, model, rows, notes=notes, out=args.out)
    for r in rows:
        if r["part"] == "serving-summary":
            print(
                f"mixed / base: {r['mixed_over_base']:.2f}x (per round "
                + ", ".join(f"{x:.2f}" for x in r["mixed_over_base_per_round"])
                + f"), target 0.8x: {'met' if r['met'] else 'missed'}",
                flush=True,
            )


if __name__ == "__main__":
    main()
