"""Side-by-side timing: the candidates take turns, round after round, so a noisy machine slows all of them alike.

Only ratios measured in one such run mean anything on a shared machine; absolute figures are printed for scale.
Each timed call records both clocks: wall time (`time.perf_counter`) and this process's CPU time
(`time.process_time`, all threads), which a busy neighbour on a shared machine disturbs far less.

Ground floor (standard library only): `asymsearch export --report` and the benchmarks (`asymsearch.bench`) use it.
"""
from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Callable, Mapping


@dataclasses.dataclass
class Timings:
    """Seconds per call of one candidate, on both clocks, in the order the calls were made."""

    wall: list[float] = dataclasses.field(default_factory=list)
    cpu: list[float] = dataclasses.field(default_factory=list)


def rotations(names: list[str], rounds: int) -> list[list[str]]:
    """The order of each round: round r starts with candidate r mod n, so every candidate runs first, second, ...
    equally often and none always follows the same neighbour's leftovers (warm caches, a busy core)."""
    n = len(names)
    return [names[r % n:] + names[:r % n] for r in range(rounds)] if n else []


def interleaved(candidates: Mapping[str, Callable[[], object]], *, rounds: int = 10, reps: int = 1,
                warmup: int = 1) -> dict[str, Timings]:
    """`warmup` untimed calls of each candidate, then `rounds` rounds in which every candidate (in the order of
    `rotations`) makes `reps` timed calls. Returns {name: Timings}."""
    if rounds < 1 or reps < 1:
        raise ValueError("rounds and reps must be at least 1")
    names = list(candidates)
    for name in names:
        for _ in range(warmup):
            candidates[name]()
    out = {name: Timings() for name in names}
    for order in rotations(names, rounds):
        for name in order:
            fn = candidates[name]
            for _ in range(reps):
                wall0, cpu0 = time.perf_counter(), time.process_time()
                fn()
                out[name].cpu.append(time.process_time() - cpu0)
                out[name].wall.append(time.perf_counter() - wall0)
    return out


def interleaved_timings(candidates: Mapping[str, Callable[[], object]], *, rounds: int = 10, reps: int = 1,
                        warmup: int = 1) -> dict[str, list[float]]:
    """Wall seconds per call of each candidate, measured as `interleaved` does. Returns {name: [seconds, ...]}."""
    return {name: t.wall for name, t in interleaved(candidates, rounds=rounds, reps=reps, warmup=warmup).items()}


def summarise(seconds_per_call: list[float], batch: int, cpu_seconds_per_call: list[float] | None = None
              ) -> dict[str, float]:
    """Median seconds per call -> per-image latency (ms) and throughput (images/s) at this batch size; with CPU
    seconds too, the median CPU ms per image beside them."""
    median = statistics.median(seconds_per_call)
    out = {"batch": batch, "ms_per_batch": 1000 * median, "ms_per_image": 1000 * median / batch,
           "images_per_s": batch / median, "calls": len(seconds_per_call)}
    if cpu_seconds_per_call:
        out["cpu_ms_per_image"] = 1000 * statistics.median(cpu_seconds_per_call) / batch
    return out
