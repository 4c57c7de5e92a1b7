"""Retrieval metrics: Recall@K, precision@1, mean average precision and MAP@R over full rankings."""
from __future__ import annotations

from typing import Sequence

import numpy as np

DEFAULT_KS = (1, 2, 4, 8)


def ranking_metrics(relevant: np.ndarray, num_relevant: np.ndarray, ks: Sequence[int] = DEFAULT_KS) -> dict[str, float]:
    """Metrics from boolean rankings.

    relevant: (Q, N) bool, row q says which ranked database items (best first) share the query's label.
    num_relevant: (Q,) how many relevant items the database holds for each query (for AP's denominator; may
    exceed what the ranking shows when the ranking was truncated).
    Returns {"recall@K": fraction of queries with a relevant item among the top K, "map": mean AP,
    "precision@1": fraction of queries whose first item is relevant (equal to recall@1 here),
    "map@r": MAP@R (Musgrave et al., "A metric learning reality check", 2020): with R the query's number of
    relevant items, (1/R) Σ_{i ≤ R} P(i)·rel(i), i.e. AP truncated at rank R, so a perfect ranking scores 1}.
    Queries with no relevant item at all are left out, as is usual.
    """
    relevant = np.asarray(relevant, dtype=bool)
    num_relevant = np.asarray(num_relevant)
    keep = num_relevant > 0
    relevant, num_relevant = relevant[keep], num_relevant[keep]
    if relevant.shape[0] == 0:
        raise ValueError("no query has a relevant item in the database")
    out = {f"recall@{k}": float(relevant[:, :k].any(axis=1).mean()) for k in ks}
    hits = np.cumsum(relevant, axis=1)
    ranks = np.arange(1, relevant.shape[1] + 1)
    precision_at_hits = np.where(relevant, hits / ranks, 0.0)
    out["map"] = float((precision_at_hits.sum(axis=1) / num_relevant).mean())
    out["precision@1"] = float(relevant[:, 0].mean()) if relevant.shape[1] else 0.0
    within_r = ranks[None, :] <= num_relevant[:, None]
    out["map@r"] = float((np.where(within_r, precision_at_hits, 0.0).sum(axis=1) / num_relevant).mean())
    return out


def retrieval_metrics(queries: np.ndarray, query_labels: Sequence, database: np.ndarray, database_labels: Sequence,
                      *, exclude_self: bool = False, ks: Sequence[int] = DEFAULT_KS) -> dict[str, float]:
    """Rank the database by inner product for every query and score the rankings.

    exclude_self: queries and database are the same images in the same order (leave-one-out); each query's own
    entry is removed from its ranking.
    """
    queries, database = np.asarray(queries, np.float32), np.asarray(database, np.float32)
    ql, dl = np.asarray(query_labels), np.asarray(database_labels)
    if exclude_self and len(ql) != len(dl):
        raise ValueError("exclude_self needs the queries and the database to be the same items")
    sims = queries @ database.T
    if exclude_self:
        np.fill_diagonal(sims, -np.inf)
    order = np.argsort(-sims, axis=1, kind="stable")
    if exclude_self:
        order = order[:, :-1]  # the query itself, at -inf, is last
    relevant = dl[order] == ql[:, None]
    num_relevant = (dl[None, :] == ql[:, None]).sum(axis=1) - (1 if exclude_self else 0)
    return ranking_metrics(relevant, num_relevant, ks)
