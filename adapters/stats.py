"""An engine's counters, kept in one place: ``/health`` reports their totals and ``/metrics`` their detail.

Written by the engine thread, read from the HTTP side at any time, so every access takes a lock. No
Prometheus here: the gateway turns these figures into metrics at scrape time.
"""

from __future__ import annotations

import bisect
import threading
from collections import defaultdict
from dataclasses import dataclass, field

import msgspec

__all__ = ["CANCEL_LAG_BUCKETS", "DECODE_STEP_BUCKETS", "EngineStats", "OUTCOMES", "StatsExport", "StepTimes"]

OUTCOMES = ("completed", "cancelled", "failed")

# Seconds. A decode step takes about a millisecond on a tiny model and tens of ms on an 8B one at batch
# 64; a multi-second step means something is wrong, and still lands in a bucket.
DECODE_STEP_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


# Decode steps of a model between a request's cancellation and its leaving the engine (0 or 1 expected).
CANCEL_LAG_BUCKETS = (0, 1, 2, 4, 8, 16)


@dataclass
class StepTimes:
    """A histogram of step durations: counts per upper bound (not cumulative; +Inf last), sum, count."""

    counts: list[int] = field(default_factory=lambda: [0] * (len(DECODE_STEP_BUCKETS) + 1))
    total: float = 0.0
    count: int = 0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(DECODE_STEP_BUCKETS, seconds)] += 1
        self.total += seconds
        self.count += 1

    def copy(self) -> StepTimes:
        return StepTimes(list(self.counts), self.total, self.count)


class EngineStats:
    """Requests by model and outcome, decode-step times by model and path, batch steps by model."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._requests: dict[tuple[str, str], int] = defaultdict(int)
        self._steps: dict[tuple[str, str], StepTimes] = {}
        # model -> [batch steps, sequences stepped, seconds]
        self._batches: dict[str, list[float]] = defaultdict(lambda: [0, 0, 0.0])
        # model -> decode steps (either path); the steps each cancelled request took to leave
        # (counts per CANCEL_LAG_BUCKETS bound, +Inf last).
        self._decode_steps: dict[str, int] = defaultdict(int)
        self._cancel_lags: dict[str, list[int]] = {}

    def request_done(self, model: str, outcome: str, lag: int | None = None) -> None:
        """One request left the engine: ``completed``, ``cancelled`` or ``failed``; a cancelled one with its
        ``lag``: the model's decode steps between the engine seeing the cancellation and the request leaving."""
        with self._lock:
            self._requests[(model, outcome)] += 1
            if outcome == "cancelled" and lag is not None:
                counts = self._cancel_lags.setdefault(model, [0] * (len(CANCEL_LAG_BUCKETS) + 1))
                counts[bisect.bisect_left(CANCEL_LAG_BUCKETS, lag)] += 1

    def decode_steps(self, model: str) -> int:
        """The model's decode steps so far (either path)."""
        with self._lock:
            return self._decode_steps[model]

    def decode_step(self, model: str, path: str, seconds: float) -> None:
        """One decode step took ``seconds``: ``path`` is ``batch`` (every running sequence of the model) or
        ``sequential`` (one request's choices, strict mode and quantised caches)."""
        with self._lock:
            self._steps.setdefault((model, path), StepTimes()).observe(seconds)
            self._decode_steps[model] += 1

    def batch_step(self, model: str, sequences: int, seconds: float) -> None:
        with self._lock:
            entry = self._batches[model]
            entry[0] += 1
            entry[1] += sequences
            entry[2] += seconds

    # ---- readers (any thread) ------------------------------------------------------------------

    def export(self) -> StatsExport:
        with self._lock:
            return StatsExport(
                requests=[(m, o, n) for (m, o), n in self._requests.items()],
                steps=[(m, p, t.copy()) for (m, p), t in self._steps.items()],
                batches=[(m, list(e)) for m, e in self._batches.items()],
                decode_steps=list(self._decode_steps.items()),
                cancel_lags=[(m, list(c)) for m, c in self._cancel_lags.items()],
            )

    @classmethod
    def restored(cls, export: StatsExport) -> EngineStats:
        """Counters equal to ``export``'s (a front end's read-only copy of the engine process's)."""
        stats = cls()
        stats._requests.update({(m, o): n for m, o, n in export.requests})
        stats._steps.update({(m, p): t for m, p, t in export.steps})
        stats._batches.update({m: list(e) for m, e in export.batches})
        stats._decode_steps.update(dict(export.decode_steps))
        stats._cancel_lags.update({m: list(c) for m, c in export.cancel_lags})
        return stats

    def requests(self) -> dict[tuple[str, str], int]:
        with self._lock:
            return dict(self._requests)

    def request_totals(self) -> dict[str, int]:
        """Requests by outcome over every model (what ``/health`` reports)."""
        with self._lock:
            return {o: sum(n for (_, outcome), n in self._requests.items() if outcome == o) for o in OUTCOMES}

    def cancel_lags(self) -> dict[str, list[int]]:
        """Per model: cancelled requests by the decode steps they took to leave (per CANCEL_LAG_BUCKETS
        bound, not cumulative, +Inf last)."""
        with self._lock:
            return {model: list(counts) for model, counts in self._cancel_lags.items()}

    def step_times(self) -> dict[tuple[str, str], StepTimes]:
        with self._lock:
            return {key: times.copy() for key, times in self._steps.items()}

    def batches(self) -> dict[str, tuple[int, int, float]]:
        with self._lock:
            return {m: (int(e[0]), int(e[1]), e[2]) for m, e in self._batches.items()}

    def batch_totals(self) -> dict[str, float]:
        """Batch steps, sequences stepped and seconds over every model (what ``/health`` reports)."""
        values = self.batches().values()
        return {
            "steps": sum(v[0] for v in values),
            "sequences": sum(v[1] for v in values),
            "seconds": sum(v[2] for v in values),
        }


class StatsExport(msgspec.Struct, frozen=True, kw_only=True):
    """Every counter of an :class:`EngineStats`, as data (what the engine process sends its front ends)."""

    requests: list[tuple[str, str, int]] = []
    steps: list[tuple[str, str, StepTimes]] = []
    batches: list[tuple[str, list[float]]] = []
    decode_steps: list[tuple[str, int]] = []
    cancel_lags: list[tuple[str, list[int]]] = []
