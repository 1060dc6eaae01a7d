"""Measured costs that decide how a cold prefix cache is served: loaded from its file, or recomputed.

A rate is seconds per unit (byte read, token prefilled), an exponential moving average of what the
engine saw; ``None`` until first measured, so the first cold hit always loads (and measures).

A ``Rate`` has no lock: it belongs to the thread that adds samples to it (the engine), which publishes what
other threads need (``PrefixCacheStore.stats`` reads a figure it copies under the store's lock).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["MIN_PREFILL_SAMPLE_TOKENS", "Rate", "cheaper_to_recompute"]

# Shorter prefill chunks cost mostly fixed time per pass: timing them would overstate the cost per token.
MIN_PREFILL_SAMPLE_TOKENS = 256


@dataclass
class Rate:
    seconds_per_unit: float | None = None
    weight: float = 0.3  # of the newest sample

    def add(self, units: float, seconds: float) -> None:
        if units <= 0 or seconds <= 0:
            return
        sample = seconds / units
        old = self.seconds_per_unit
        self.seconds_per_unit = sample if old is None else (1 - self.weight) * old + self.weight * sample

    def estimate(self, units: float) -> float | None:
        return None if self.seconds_per_unit is None else self.seconds_per_unit * units

    def per_second(self) -> float | None:
        return None if not self.seconds_per_unit else 1.0 / self.seconds_per_unit


def cheaper_to_recompute(load_seconds: float | None, prefill_seconds: float | None) -> bool:
    """Recompute only when both costs are known and loading is the dearer one."""
    return load_seconds is not None and prefill_seconds is not None and load_seconds > prefill_seconds
