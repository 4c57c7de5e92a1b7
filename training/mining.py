"""Mining, a piece of its own (Budnik & Avrithis 2021): which reference items each anchor is compared with.

- `HardNegativeMiner`: in-batch hard negatives, N(a) = the k reference items most similar to anchor a among
  those of another label (teacher training, symmetric students).
- `mine_hard_negatives`: the seed's mining for asymmetric students, "k nearest neighbours from non-matching
  classes, at most one image per class, according to learned descriptors": the student's anchors f_θ(a) are
  searched against the **teacher** embeddings g(x) of the whole training set (cached once, see
  `training.teacher_cache`), by s_θ^asym(a, x) = f_θ(a)·g(x).
- `random_pool`: the random pools U(a) of RKD and DarkRank (a random batch is one).

Every miner works without gradient and returns indices into its reference, rows padded with -1 where fewer than
k candidates exist; the losses ignore -1.
"""
from __future__ import annotations

import torch


def _check_labels(embeddings: torch.Tensor, labels: torch.Tensor, what: str) -> torch.Tensor:
    labels = torch.as_tensor(labels, device=embeddings.device)
    if labels.ndim != 1 or labels.shape[0] != embeddings.shape[0]:
        raise ValueError(f"{embeddings.shape[0]} {what} embeddings but labels of shape {tuple(labels.shape)}")
    return labels


def _pad(idx: torch.Tensor, k: int) -> torch.Tensor:
    if idx.shape[1] < k:
        idx = torch.cat([idx, idx.new_full((idx.shape[0], k - idx.shape[1]), -1)], dim=1)
    return idx


class HardNegativeMiner:
    """N(a): the `num_negatives` reference items most similar to anchor a among those with a different label.

    `__call__(embeddings, labels, reference=None, reference_labels=None) -> LongTensor (N, k)`: row a holds
    indices into `reference` (the batch itself when None), most similar first. A row with fewer than k
    negatives is padded with -1, which the losses ignore. Mined without gradient. With `one_per_class=True`
    a class contributes at most its most similar item (the seed's rule; `mine_hard_negatives`).
    """

    def __init__(self, num_negatives: int, one_per_class: bool = False) -> None:
        if num_negatives < 1:
            raise ValueError(f"num_negatives must be at least 1, not {num_negatives}")
        self.num_negatives = num_negatives
        self.one_per_class = one_per_class

    @torch.no_grad()
    def __call__(self, embeddings: torch.Tensor, labels: torch.Tensor, reference: torch.Tensor | None = None,
                 reference_labels: torch.Tensor | None = None) -> torch.Tensor:
        labels = _check_labels(embeddings, labels, "anchor")
        if (reference is None) != (reference_labels is None):
            raise ValueError("pass reference and reference_labels together")
        ref, ref_labels = (embeddings, labels) if reference is None else (reference, reference_labels)
        return mine_hard_negatives(embeddings, labels, ref, ref_labels, self.num_negatives,
                                   one_per_class=self.one_per_class)


@torch.no_grad()
def mine_hard_negatives(queries: torch.Tensor, query_labels: torch.Tensor, pool: torch.Tensor,
                        pool_labels: torch.Tensor, k: int, *, one_per_class: bool = True,
                        chunk: int = 4096) -> torch.LongTensor:
    """(Q, k) indices into `pool`: for each query, the k pool items of a non-matching label with the largest
    inner product, most similar first; with `one_per_class` only the best item of each class may appear.

    queries (Q, d) and pool (M, d) may come from different networks (student anchors, teacher pool: AML).
    Rows are padded with -1 when fewer than k candidates exist. Queries are processed `chunk` at a time, so
    memory is O(chunk · M).
    """
    if k < 1:
        raise ValueError(f"k must be at least 1, not {k}")
    query_labels = _check_labels(queries, query_labels, "query")
    pool_labels = _check_labels(pool, pool_labels, "pool")
    queries, pool = queries.detach(), pool.detach().to(queries.device)
    pool_labels = pool_labels.to(queries.device)
    if one_per_class:
        classes, pool_class = torch.unique(pool_labels, return_inverse=True)
    out = []
    for start in range(0, queries.shape[0], chunk):
        q, ql = queries[start:start + chunk], query_labels[start:start + chunk]
        sims = (q @ pool.T).float()
        sims = sims.masked_fill(ql[:, None] == pool_labels[None, :], float("-inf"))
        if one_per_class:
            # best similarity of each class, then the lowest pool index attaining it (a deterministic tie-break)
            n_cls = classes.shape[0]
            index = pool_class.expand_as(sims)
            best = sims.new_full((q.shape[0], n_cls), float("-inf")).scatter_reduce(1, index, sims, "amax")
            at_best = (sims == best.gather(1, index)) & torch.isfinite(sims)
            positions = torch.arange(pool.shape[0], device=q.device).expand_as(sims)
            candidate = torch.where(at_best, positions, pool.shape[0])
            arg = candidate.new_full((q.shape[0], n_cls), pool.shape[0]).scatter_reduce(1, index, candidate, "amin")
            kk = min(k, n_cls)
            values, cls = best.topk(kk, dim=1)
            idx = arg.gather(1, cls)
        else:
            kk = min(k, pool.shape[0])
            values, idx = sims.topk(kk, dim=1)
        idx = idx.masked_fill(torch.isinf(values), -1)
        out.append(_pad(idx, k))
    if not out:
        return torch.zeros((0, k), dtype=torch.long, device=queries.device)
    return torch.cat(out)


def random_pool(num_items: int, size: int, generator: torch.Generator | None = None) -> torch.LongTensor:
    """`size` distinct indices drawn uniformly from range(num_items): the random pool U of RKD / DarkRank."""
    if not 1 <= size <= num_items:
        raise ValueError(f"pool size must be in [1, {num_items}], not {size}")
    return torch.randperm(num_items, generator=generator)[:size]
