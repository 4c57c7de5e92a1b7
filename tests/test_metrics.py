"""precision@1 and MAP@R against a plain loop and hand-worked rankings (Recall@K and mAP: tests/test_core.py)."""
from __future__ import annotations

import numpy as np
import pytest

from asymsearch.core.metrics import ranking_metrics, retrieval_metrics


def loop_map_at_r(q, ql, db, dl, exclude_self):
    p1, scores = [], []
    for i in range(len(q)):
        cands = sorted((j for j in range(len(db)) if not (exclude_self and i == j)), key=lambda j: (-float(q[i] @ db[j]), j))
        rel = [dl[j] == ql[i] for j in cands]
        r = sum(rel)
        if r == 0:
            continue
        p1.append(float(rel[0]))
        hits, total = 0, 0.0
        for rank in range(1, r + 1):
            if rel[rank - 1]:
                hits += 1
                total += hits / rank
        scores.append(total / r)
    return float(np.mean(p1)), float(np.mean(scores))


@pytest.mark.parametrize("exclude_self", [True, False])
def test_map_at_r_and_precision_at_1_match_a_loop(exclude_self):
    rng = np.random.default_rng(5)
    db = rng.normal(size=(50, 6)).astype(np.float32)
    dl = rng.integers(0, 5, size=50)
    q, ql = (db, dl) if exclude_self else (rng.normal(size=(15, 6)).astype(np.float32), rng.integers(0, 5, size=15))
    got = retrieval_metrics(q, ql, db, dl, exclude_self=exclude_self)
    p1, map_r = loop_map_at_r(q, ql, db, dl, exclude_self)
    assert got["precision@1"] == pytest.approx(p1, abs=1e-9)
    assert got["map@r"] == pytest.approx(map_r, abs=1e-9)
    assert got["precision@1"] == got["recall@1"]


def test_map_at_r_by_hand():
    # R = 3 relevant; ranking rel = [1, 0, 1, 1]: MAP@R = (1/1 + 2/3) / 3 = 5/9 (the hit at rank 4 > R is not counted)
    # while AP = (1 + 2/3 + 3/4) / 3
    got = ranking_metrics(np.array([[True, False, True, True]]), np.array([3]), ks=(1,))
    assert got["map@r"] == pytest.approx(5 / 9)
    assert got["map"] == pytest.approx((1 + 2 / 3 + 3 / 4) / 3)
    assert got["precision@1"] == 1.0
    perfect = ranking_metrics(np.array([[True, True, False]]), np.array([2]), ks=(1,))
    assert perfect["map@r"] == 1.0
