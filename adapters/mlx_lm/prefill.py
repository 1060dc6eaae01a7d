"""Chunked prefill: the one place a prompt goes through the model in ``prefill_step_size`` chunks.

Every path that prefills a prompt alone uses :func:`prefill_chunk`: the sequential path (strict mode,
quantised or sliding-window KV, :mod:`adapters.mlx_lm.engine`), a batch's long arrivals
(:mod:`adapters.mlx_lm.batching`), prefix-cache builds and the start-up calibration
(:mod:`adapters.mlx_lm.prefix_path`). Each call feeds one chunk; the caller keeps its cursor and decides when
the next chunk runs, so that other work runs between two chunks (a build is queued again behind the requests,
a sequential request takes its turn in the round-robin, a batch prefills one chunk per step).

A chunk with more of the prompt after it is evaluated at once and timed: its KV must exist before the next
chunk attends to it anyway, and its time is what the measured prefill rate (cold caches' load-or-recompute
decision) is made of. The final chunk is left lazy unless the caller asks otherwise: its last position's
logits give the first token, sampled in the same graph (no second pass over the last token, unlike
mlx-lm's ``generate_step``). Engine thread only.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import mlx.core as mx

from adapters.mlx_lm.models import LoadedModel

__all__ = ["PrefillChunk", "prefill_chunk", "prefill_step"]


def prefill_step(loaded: LoadedModel) -> int:
    """The model's prefill chunk, in tokens, as resolved when it loaded (``load_steps`` replaces an unset
    ``ModelSpec.prefill_step_size`` with the backend's default).

    Raises:
        ValueError: ``loaded``'s spec was never resolved (a model that did not come from ``load_steps``).
    """
    step = loaded.spec.prefill_step_size
    if step is None or step <= 0:
        raise ValueError(f"model {loaded.spec.name}: prefill_step_size {step!r} was not resolved at load")
    return step


@dataclass(frozen=True)
class PrefillChunk:
    """What one call of :func:`prefill_chunk` did.

    Attributes:
        tokens: prompt tokens this chunk fed.
        done: prompt tokens fed so far, this chunk included (the caller's next cursor).
        finished: whether the prompt is now fed whole.
        logits: the chunk's last position's logits, shape ``(vocab,)`` (lazy unless evaluated).
        seconds: the chunk's time from the forward pass to its evaluated KV; None when it was left lazy.
    """

    tokens: int
    done: int
    finished: bool
    logits: mx.array
    seconds: float | None


def prefill_chunk(
    loaded: LoadedModel,
    prompt: Sequence[int],
    cache: list[Any],
    done: int,
    *,
    quantize: bool = True,
    evaluate_last: bool = False,
) -> PrefillChunk:
    """Feed ``prompt[done : done + step]`` into ``cache`` (mutated in place; the caller's own copy).

    Args:
        loaded: the model (its resolved :func:`prefill_step` sets the chunk's length).
        prompt: the tokens to prefill, all of them; ``done`` of them are already in ``cache``.
        cache: the sequence's own cache.
        done: prompt tokens already fed.
        quantize: apply the spec's KV quantisation after the pass (a build keeps full precision and
            quantises when it saves; a batch's caches are never quantised).
        evaluate_last: evaluate and time the final chunk too (a build saves its KV, calibration times it);
            otherwise the final chunk stays lazy for the caller's first sampling.
    """
    step = prefill_step(loaded)
    chunk = list(prompt[done : done + step])
    started = time.perf_counter()
    logits = loaded.forward(chunk, cache, quantize=quantize)
    done += len(chunk)
    finished = done >= len(prompt)
    seconds = None
    if not finished or evaluate_last:
        mx.eval([c.state for c in cache])
        seconds = time.perf_counter() - started
    return PrefillChunk(len(chunk), done, finished, logits, seconds)
