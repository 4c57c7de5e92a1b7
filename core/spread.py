"""The collapse guard: refuse embeddings whose spread is degenerate before they are kept, exported or indexed.

A network can "train" into one constant vector (a student started from random weights whose loss found the
trivial minimum; all rows equal to 1e-8 after the L2 normalisation), or into vectors that all point the same way.
Search with such embeddings is chance, and nothing downstream notices: the model exports, indexes and serves.
`check_spread` looks at a batch of embeddings of different images and refuses, in one line, when

- any value is not finite;
- every dimension's variance across the batch is below `MIN_VARIANCE` (the rows are one constant vector: the
  model ignores its input), or the rows have (near-)zero norm where unit vectors are expected;
- the mean pairwise cosine similarity of the rows exceeds `MAX_MEAN_COSINE` (0.9999: all rows within about a
  degree of one direction, total variance of the unit rows below 1e-4, differences that a float16 or int8 variant
  or a PQ index would not keep). Not 0.99: embeddings in a narrow cone still rank well in float32; the small CNNs
  of the tests, trained for one or two epochs, measure 0.991-0.9992 on their validation images while their
  validation Recall@1 is 0.5-0.9. A collapsed model measures 1.0 (its rows are one vector).

The mean over the n(n − 1) ordered pairs of distinct rows of unit vectors u_i is (‖Σ u_i‖² − n) / (n(n − 1)),
computed in O(n·d) without the n × n matrix. numpy only: `core` imports no stage.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from asymsearch.core.errors import UserError

MAX_MEAN_COSINE = 0.9999
MIN_VARIANCE = 1e-10  # per dimension, across the batch; below it in every dimension the rows are constant
MIN_NORM = 1e-4  # an embedding of a unit-norm model (and of any usable one) is far above this


class DegenerateEmbeddings(UserError):
    """Embeddings of different images that are (nearly) all the same: search with them is chance."""


@dataclasses.dataclass(frozen=True)
class Spread:
    rows: int
    mean_cosine: float  # over pairs of distinct rows, of the rows scaled to unit norm
    max_variance: float  # the largest per-dimension variance across the rows
    median_norm: float

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def spread(embeddings) -> Spread:
    """The statistics `check_spread` judges, for a (n, d) batch with n >= 2 (finite values)."""
    x = np.asarray(embeddings, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"spread needs a (n >= 2, d) batch of embeddings, got shape {x.shape}")
    norms = np.linalg.norm(x, axis=1)
    unit = x / np.maximum(norms, 1e-300)[:, None]
    n = x.shape[0]
    total = unit.sum(axis=0)
    mean_cosine = float((total @ total - n) / (n * (n - 1)))
    return Spread(rows=n, mean_cosine=mean_cosine, max_variance=float(x.var(axis=0).max()),
                  median_norm=float(np.median(norms)))


def check_spread(embeddings, what: str, *, max_mean_cosine: float = MAX_MEAN_COSINE,
                 min_variance: float = MIN_VARIANCE) -> Spread | None:
    """Refuse (`DegenerateEmbeddings`, one line naming `what`) a batch of embeddings of different images that is
    degenerate (module doc); return its `Spread` (None for fewer than 2 rows: nothing to judge)."""
    x = np.asarray(embeddings)
    if x.ndim != 2:
        raise ValueError(f"check_spread needs a (n, d) batch, got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise DegenerateEmbeddings(f"{what}: the embeddings hold NaN or infinite values; the model is broken "
                                   f"(retrain with a lower learning rate)")
    if x.shape[0] < 2:
        return None
    s = spread(x)
    if s.max_variance < min_variance or s.median_norm < MIN_NORM:
        raise DegenerateEmbeddings(
            f"{what}: the embeddings of {s.rows} different images are one constant vector (largest per-dimension "
            f"variance {s.max_variance:.2g}, median norm {s.median_norm:.2g}): the model collapsed and search "
            f"with it is chance; start from pretrained weights (--pretrained imagenet or --from-teacher) or "
            f"lower the learning rate")
    if s.mean_cosine > max_mean_cosine:
        raise DegenerateEmbeddings(
            f"{what}: the embeddings of {s.rows} different images are nearly parallel (mean pairwise cosine "
            f"{s.mean_cosine:.4f} > {max_mean_cosine}): the model collapsed and search with it is close to "
            f"chance; start from pretrained weights (--pretrained imagenet or --from-teacher) or lower the "
            f"learning rate")
    return s


__all__ = ["MAX_MEAN_COSINE", "MIN_VARIANCE", "DegenerateEmbeddings", "Spread", "check_spread", "spread"]
