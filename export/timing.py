"""Side-by-side timing: the candidates take turns, round after round, so a noisy machine slows all of them alike.

Only ratios measured in one such run mean anything on a shared machine; absolute figures are printed for scale.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable, Mapping


def interleaved_timings(candidates: Mapping[str, Callable[[], object]], *, rounds: int = 10, reps: int = 1,
                        warmup: int = 1) -> dict[str, list[float]]:
    """Seconds per call of each candidate: `warmup` untimed calls each, then `rounds` rounds in which every
    candidate (in an order rotated each round) makes `reps` timed calls. Returns {name: [seconds, ...]}."""
    if rounds < 1 or reps < 1:
        raise ValueError("rounds and reps must be at least 1")
    names = list(candidates)
    for name in names:
        for _ in range(warmup):
            candidates[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            fn = candidates[name]
            for _ in range(reps):
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
    return times


def summarise(seconds_per_call: list[float], batch: int) -> dict[str, float]:
    """Median seconds per call -> per-image latency (ms) and throughput (images/s) at this batch size."""
    median = statistics.median(seconds_per_call)
    return {"batch": batch, "ms_per_batch": 1000 * median, "ms_per_image": 1000 * median / batch,
            "images_per_s": batch / median, "calls": len(seconds_per_call)}
