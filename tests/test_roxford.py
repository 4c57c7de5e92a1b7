"""The revisited Oxford/Paris protocol on a hand-written ground truth, every figure worked out by hand."""
from __future__ import annotations

import pickle

import numpy as np
import pytest

from asymsearch.core.errors import UserError
from asymsearch.core.roxford import (evaluate_embeddings, evaluate_rankings, load_ground_truth, positive_positions,
                                     trapezoid_ap)

# database images 0..7; three queries
GND = [
    {"easy": [0, 3], "hard": [5], "junk": [2]},
    {"easy": [], "hard": [], "junk": [1]},  # no positive under any protocol: left out everywhere
    {"easy": [6], "hard": [], "junk": []},  # no hard positive: left out of "hard" only
]
RANKINGS = np.array([[2, 0, 5, 1, 3, 7, 4, 6],
                     [1, 0, 2, 3, 4, 5, 6, 7],
                     [0, 1, 2, 3, 4, 5, 6, 7]])

# query 0, medium: junk 2 deleted -> [0, 5, 1, 3, ...]; positives at 0, 1, 3:
#   AP = 1/3 [ (1 + 1)/2 + (1/1 + 2/2)/2 + (2/3 + 3/4)/2 ] = 65/72; mP@1 = 1, mP@5 = mP@10 = 3/4 (k' = 4)
# query 0, easy: 2 and 5 deleted -> [0, 1, 3, ...]; positives at 0, 2: AP = 1/2 [1 + (1/2 + 2/3)/2] = 19/24;
#   mP@1 = 1, mP@5 = mP@10 = 2/3 (k' = 3)
# query 0, hard: 2, 0, 3 deleted -> [5, ...]: AP = 1, mP@k = 1
# query 2, easy = medium: positive at position 6: AP = (0/6 + 1/7)/2 = 1/14; mP@1 = mP@5 = 0, mP@10 = 1/7 (k' = 7)
WANT = {
    "easy": {"map": (19 / 24 + 1 / 14) / 2, "mp@1": 0.5, "mp@5": (2 / 3 + 0) / 2, "mp@10": (2 / 3 + 1 / 7) / 2},
    "medium": {"map": (65 / 72 + 1 / 14) / 2, "mp@1": 0.5, "mp@5": (3 / 4 + 0) / 2, "mp@10": (3 / 4 + 1 / 7) / 2},
    "hard": {"map": 1.0, "mp@1": 1.0, "mp@5": 1.0, "mp@10": 1.0},
}


def test_hand_worked_ground_truth():
    got = evaluate_rankings(RANKINGS, GND)
    assert list(got) == ["easy", "medium", "hard"]
    for protocol, metrics in WANT.items():
        assert got[protocol].keys() == metrics.keys()
        for key, value in metrics.items():
            assert got[protocol][key] == pytest.approx(value, abs=1e-12), (protocol, key)


def test_junk_is_ignored_not_counted_as_a_miss():
    # the same positives with the junk image moved anywhere give the same AP
    for ranking in ([2, 0, 5, 3, 1, 4, 6, 7], [0, 5, 3, 2, 1, 4, 6, 7], [0, 5, 3, 1, 4, 6, 7, 2]):
        assert evaluate_rankings(np.array([ranking]), GND[:1])["medium"]["map"] == pytest.approx(1.0)
    assert positive_positions(np.array([2, 0, 5, 1, 3]), np.array([0, 3, 5]), np.array([2])).tolist() == [0, 1, 3]
    assert trapezoid_ap(np.array([0, 1, 2]), 3) == pytest.approx(1.0)
    assert trapezoid_ap(np.array([0]), 2) == pytest.approx(0.5)  # half the positives never found


def test_embeddings_rank_by_inner_product():
    rng = np.random.default_rng(0)
    db = rng.normal(size=(8, 4)).astype(np.float32)
    queries = db[[0, 6]] + 0.01
    gnd = [{"easy": [0], "hard": [], "junk": []}, {"easy": [6], "hard": [], "junk": []}]
    got = evaluate_embeddings(queries, db, gnd)
    want = evaluate_rankings(np.argsort(-(queries @ db.T), axis=1, kind="stable"), gnd)
    assert got["easy"] == want["easy"] and got["medium"] == want["medium"]
    assert np.isnan(got["hard"]["map"])  # no query has a hard positive


def test_load_ground_truth(tmp_path):
    good = {"imlist": ["a", "b"], "qimlist": ["q"], "gnd": [{"easy": [0], "hard": [], "junk": [1]}]}
    (tmp_path / "gnd.pkl").write_bytes(pickle.dumps(good))
    assert load_ground_truth(tmp_path / "gnd.pkl")["gnd"][0]["junk"] == [1]
    (tmp_path / "bad.pkl").write_bytes(pickle.dumps({"imlist": []}))
    with pytest.raises(UserError, match="not a revisited"):
        load_ground_truth(tmp_path / "bad.pkl")
    with pytest.raises(UserError, match="not found"):
        load_ground_truth(tmp_path / "missing.pkl")
