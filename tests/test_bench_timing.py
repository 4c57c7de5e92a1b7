"""The interleaved timer (`asymsearch.core.timing`) that every benchmark and `export --report` use: candidates
take turns, each round starting with the next one, and both clocks are recorded per call."""
from __future__ import annotations

import time

import pytest

from asymsearch.core.timing import interleaved, interleaved_timings, rotations, summarise


def test_candidates_alternate_and_each_round_starts_with_the_next():
    calls: list[str] = []
    candidates = {name: (lambda n=name: calls.append(n)) for name in ("a", "b", "c")}
    out = interleaved(candidates, rounds=4, reps=2, warmup=1)
    assert calls[:3] == ["a", "b", "c"]  # warm-up, one each
    timed = calls[3:]
    assert timed == ["a", "a", "b", "b", "c", "c", "b", "b", "c", "c", "a", "a",
                     "c", "c", "a", "a", "b", "b", "a", "a", "b", "b", "c", "c"]
    assert {n: (len(t.wall), len(t.cpu)) for n, t in out.items()} == {n: (8, 8) for n in "abc"}
    assert rotations(["x", "y"], 3) == [["x", "y"], ["y", "x"], ["x", "y"]]


def test_cpu_clock_counts_work_and_not_sleep():
    def spin():
        end = time.process_time() + 0.02
        while time.process_time() < end:
            pass
    out = interleaved({"sleep": lambda: time.sleep(0.02), "spin": spin}, rounds=2, warmup=0)
    assert max(out["sleep"].cpu) < 0.01 <= min(out["sleep"].wall)
    assert min(out["spin"].cpu) >= 0.02
    assert interleaved_timings({"sleep": lambda: time.sleep(0.001)}, rounds=2, warmup=0)["sleep"][0] >= 0.001


def test_summarise_is_per_image_from_the_median():
    s = summarise([0.1, 0.3, 0.2], batch=4, cpu_seconds_per_call=[0.4, 0.8, 0.04])
    assert s["ms_per_batch"] == pytest.approx(200) and s["ms_per_image"] == pytest.approx(50)
    assert s["images_per_s"] == pytest.approx(20) and s["cpu_ms_per_image"] == pytest.approx(100)
    with pytest.raises(ValueError):
        interleaved({"a": lambda: None}, rounds=0)
