"""The revisited Oxford / Paris protocol (Radenović, Iscen, Tolias, Avrithis, Chum, CVPR 2018), from its definition.

Each query q has ground-truth lists of database images: `easy`, `hard` and `junk`. Three protocols:

| protocol | positives        | ignored (removed from the ranking) |
|----------|------------------|------------------------------------|
| easy     | easy             | junk + hard                        |
| medium   | easy + hard      | junk                               |
| hard     | hard             | junk + easy                        |

For a query, the ranking of the whole database is taken with the ignored images deleted (they neither help nor
hurt); with r_1 < r_2 < … < r_n the 0-based positions of the n positives in that ranking, the average
precision is the Oxford benchmark's trapezoidal rule over the precision-recall curve:

    AP = Σ_j (1/n) · ½ (P_before_j + P_at_j),  P_before_j = j / r_j (1 when r_j = 0),  P_at_j = (j + 1) / (r_j + 1)

(j = 0 … n−1). mP@k: with p_j = r_j + 1 the 1-based positions, k' = min(max_j p_j, k), precision = #{p_j ≤ k'} / k'
(a query with fewer than k positives is not penalised for them). Queries with no positive under a protocol are
left out of that protocol's means. Scores are fractions in [0, 1] (papers print them ×100).
"""
from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Sequence

import numpy as np

from asymsearch.core.errors import UserError

PROTOCOLS = ("easy", "medium", "hard")
DEFAULT_KAPPAS = (1, 5, 10)


def protocol_lists(gnd: dict, protocol: str) -> tuple[np.ndarray, np.ndarray]:
    """(positives, ignored) database indices of one query's ground truth under `protocol`."""
    easy = np.asarray(gnd.get("easy", []), dtype=np.int64)
    hard = np.asarray(gnd.get("hard", []), dtype=np.int64)
    junk = np.asarray(gnd.get("junk", []), dtype=np.int64)
    if protocol == "easy":
        return easy, np.concatenate([junk, hard])
    if protocol == "medium":
        return np.concatenate([easy, hard]), junk
    if protocol == "hard":
        return hard, np.concatenate([junk, easy])
    raise ValueError(f"unknown protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)}")


def positive_positions(ranking: np.ndarray, positives: np.ndarray, ignored: np.ndarray) -> np.ndarray:
    """0-based positions of the positives in `ranking` once the ignored images are deleted from it."""
    ranking = np.asarray(ranking)
    kept = ranking[~np.isin(ranking, ignored)]
    return np.flatnonzero(np.isin(kept, positives))


def trapezoid_ap(positions: np.ndarray, num_positives: int) -> float:
    """The Oxford benchmark's AP from the sorted 0-based positions of the positives found."""
    ap = 0.0
    for j, r in enumerate(np.asarray(positions)):
        before = 1.0 if r == 0 else j / r
        at = (j + 1) / (r + 1)
        ap += (before + at) / 2.0 / num_positives
    return ap


def precision_at(positions: np.ndarray, kappas: Sequence[int]) -> list[float]:
    pos = np.asarray(positions) + 1
    if pos.size == 0:
        return [0.0 for _ in kappas]
    out = []
    for k in kappas:
        kq = min(int(pos.max()), int(k))
        out.append(float((pos <= kq).sum() / kq))
    return out


def evaluate_rankings(rankings: np.ndarray, ground_truth: Sequence[dict], *,
                      kappas: Sequence[int] = DEFAULT_KAPPAS) -> dict[str, dict[str, float]]:
    """{protocol: {"map": ..., "mp@k": ...}} for `rankings` (Q, N): row q the database indices, best first.

    `ground_truth[q]` is a dict with "easy", "hard" and "junk" index lists (the revisited data sets' `gnd`).
    """
    rankings = np.asarray(rankings)
    if rankings.ndim != 2 or rankings.shape[0] != len(ground_truth):
        raise ValueError(f"rankings of shape {rankings.shape} for {len(ground_truth)} queries")
    result = {}
    for protocol in PROTOCOLS:
        aps, precisions = [], []
        for ranking, gnd in zip(rankings, ground_truth):
            positives, ignored = protocol_lists(gnd, protocol)
            if positives.size == 0:
                continue
            positions = positive_positions(ranking, positives, ignored)
            aps.append(trapezoid_ap(positions, positives.size))
            precisions.append(precision_at(positions, kappas))
        if not aps:
            result[protocol] = {"map": float("nan"), **{f"mp@{k}": float("nan") for k in kappas}}
            continue
        mean_p = np.mean(precisions, axis=0)
        result[protocol] = {"map": float(np.mean(aps)), **{f"mp@{k}": float(p) for k, p in zip(kappas, mean_p)}}
    return result


def evaluate_embeddings(queries: np.ndarray, database: np.ndarray, ground_truth: Sequence[dict], *,
                        kappas: Sequence[int] = DEFAULT_KAPPAS) -> dict[str, dict[str, float]]:
    """Rank the database by inner product for every query (queries and database may come from different models,
    e.g. student queries against a teacher database) and score with `evaluate_rankings`."""
    sims = np.asarray(queries, np.float32) @ np.asarray(database, np.float32).T
    return evaluate_rankings(np.argsort(-sims, axis=1, kind="stable"), ground_truth, kappas=kappas)


def load_ground_truth(path: str | os.PathLike) -> dict:
    """Read a revisited data set's `gnd_<name>.pkl` -> {"imlist": [...], "qimlist": [...], "gnd": [{...}, ...]}.

    The file is a Python pickle: read only files from the data set's publishers.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"ground-truth file not found: {path}")
    try:
        with open(path, "rb") as f:
            cfg = pickle.load(f)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the user's to fix
        raise UserError(f"cannot read ground truth {path}: {e.__class__.__name__}: {e}") from None
    if not isinstance(cfg, dict) or not {"imlist", "qimlist", "gnd"} <= set(cfg):
        raise UserError(f"{path} is not a revisited Oxford/Paris ground truth (needs imlist, qimlist, gnd)")
    if len(cfg["gnd"]) != len(cfg["qimlist"]):
        raise UserError(f"{path}: {len(cfg['gnd'])} ground-truth entries for {len(cfg['qimlist'])} queries")
    return cfg
