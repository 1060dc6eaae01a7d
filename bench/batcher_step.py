"""The gateway's batched decode step in process, against the plain loop, with and without the engine's
per-token hand-off to an event loop: where the time between two decode steps goes.

    python -m bench.batcher_step --device cpu --preset small --batches 1,8
    python -m bench.batcher_step --device gpu --batches 1,8,32,64

Rows, each in steady state (every sequence has its first token), greedy, equal-length prompts:

- *plain*: ``bench.decode_ceiling``'s plain loop (one ``KVCache`` with a batch dimension, no mask).
- *batcher*: ``adapters.mlx_lm.batching.Batcher.step()`` in a loop, nothing done with its tokens.
- *batcher + per-token work*: each token is detokenised (the engine's ``StopTextAssembler``) and sent to
  an asyncio loop on another thread with one ``call_soon_threadsafe`` per token, as the engine's
  ``emit`` does today; the loop encodes a chunk per token (JSON), as the SSE side does.
- *batcher + per-step hand-off*: the same work, but one ``call_soon_threadsafe`` per step carrying all
  the step's events (what the engine could do instead).

The gap between *plain* and *batcher* is mlx-lm's BatchGenerator and our wrapper; the gap between
*batcher* and the hand-off rows is the engine's per-token work and the GIL it shares with the HTTP side.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable
from typing import Any

from adapters.mlx_lm.blas import load_optimised_blas

load_optimised_blas()  # before mlx is imported below

import mlx.core as mx  # noqa: E402

from bench.decode_ceiling import _prompts, plain  # noqa: E402
from bench.harness import DEFAULT_MODEL, Texts, bench_parser, summary, write_result  # noqa: E402

ROWS = ("plain", "batcher", "batcher + per-token work", "batcher + per-step hand-off")


class _Loop:
    """An asyncio loop on its own thread that encodes one JSON chunk per token it receives."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.received = 0
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def take(self, event: tuple[int, str]) -> None:
        chunk = {"object": "chat.completion.chunk", "choices": [{"index": event[0], "delta": {"content": event[1]}}]}
        json.dumps(chunk)
        self.received += 1

    def take_all(self, events: list[tuple[int, str]]) -> None:
        for event in events:
            self.take(event)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()


def batcher_loop(loaded: Any, prompts: list[list[int]], warmup: int, steps: int, hand_off: str) -> float:
    from adapters.base import SamplingParams
    from adapters.mlx_lm.batching import Batcher
    from adapters.mlx_lm.text import StopTextAssembler

    batcher = Batcher(loaded, len(prompts))
    params = SamplingParams(max_tokens=warmup + steps + 64, temperature=0.0)
    texts = {}
    for p in prompts:
        (uid,) = batcher.insert(p, loaded.make_cache(), params, p)
        texts[uid] = StopTextAssembler(loaded.tokenizer.detokenizer(), ())
    sink = _Loop() if hand_off != "none" else None
    try:
        started: set[int] = set()
        while len(started) < len(prompts):
            started.update(o.uid for o in batcher.step())
        start = 0.0
        for i in range(warmup + steps):
            if i == warmup:
                start = time.perf_counter()
            outs = batcher.step()
            if sink is None:
                continue
            events = [(o.uid, texts[o.uid].add(o.sampled.token)) for o in outs]
            if hand_off == "token":
                for event in events:
                    sink.loop.call_soon_threadsafe(sink.take, event)
            else:
                sink.loop.call_soon_threadsafe(sink.take_all, events)
        return time.perf_counter() - start
    finally:
        if sink is not None:
            sink.close()
        batcher.close()


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--preset", dest="model", help="same as --model")
    parser.add_argument("--batches", default=None, help="comma-separated batch sizes")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3, help="rounds; each round runs every row once")
    args = parser.parse_args()
    if args.device == "cpu":
        mx.set_default_device(mx.cpu)
    from adapters.mlx_lm.models import ModelSpec, load_model
    from adapters.mlx_lm.prefill import prefill_step

    model_name = args.model or DEFAULT_MODEL[args.device]
    batches = [int(b) for b in (args.batches or ("1,8" if args.device == "cpu" else "1,8,32,64")).split(",")]
    steps = args.steps or (32 if args.device == "cpu" else 128)
    loaded = load_model(ModelSpec(model_name, model_name, max_running=max(batches)))
    chunk = prefill_step(loaded)
    texts = Texts(model_name)
    runs: dict[str, Callable[[list[list[int]]], float]] = {
        "plain": lambda p: plain(loaded.model, p, chunk, args.warmup, steps),
        "batcher": lambda p: batcher_loop(loaded, p, args.warmup, steps, "none"),
        "batcher + per-token work": lambda p: batcher_loop(loaded, p, args.warmup, steps, "token"),
        "batcher + per-step hand-off": lambda p: batcher_loop(loaded, p, args.warmup, steps, "step"),
    }
    rows: list[dict[str, Any]] = []
    for batch in batches:
        prompts = _prompts(texts, batch, args.prompt_tokens, mixed=False)
        times: dict[str, list[float]] = {name: [] for name in ROWS}
        for _ in range(args.repeats):  # rows interleaved, so that a busy moment of the machine hits all alike
            for name in ROWS:
                times[name].append(runs[name](prompts) * 1e3 / steps)
                mx.clear_cache()
        base = summary(times["plain"])["median"]
        for name in ROWS:
            ms = summary(times[name])
            row = {"path": name, "batch": batch, "steps": steps, "ms_per_step": ms}
            row |= {"tokens_per_s": batch * 1e3 / ms["median"], "of_plain": base / ms["median"]}
            rows.append(row)
            print(
                f"batch {batch:3d} {name:>28}: {ms['median']:7.2f} ms/step (min {ms['min']:.2f}), "
                f"{row['tokens_per_s']:8.1f} tok/s, {row['of_plain']:.2f}x plain",
                flush=True,
            )
    notes = (
        f"{args.prompt_tokens}-token prompts, greedy, {steps} timed steps after {args.warmup}, medians of "
        f"{args.repeats} interleaved rounds; weights {loaded.dtype}."
    )
    write_result("batcher-step", args.device, model_name, rows, notes=notes, out=args.out)


if __name__ == "__main__":
    main()
