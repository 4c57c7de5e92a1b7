"""Mining against a plain loop: k nearest from non-matching classes, at most one per class (Budnik & Avrithis 2021)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from asymsearch.training.mining import HardNegativeMiner, mine_hard_negatives, random_pool


def unit(n, d, seed):
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=1)


def loop_mine(q, ql, pool, pl, k, one_per_class):
    out = []
    for i in range(len(q)):
        cands = sorted((j for j in range(len(pool)) if pl[j] != ql[i]),
                       key=lambda j: (-float(q[i] @ pool[j]), j))
        row, seen = [], set()
        for j in cands:
            if one_per_class and pl[j] in seen:
                continue
            seen.add(pl[j])
            row.append(j)
        out.append((row + [-1] * k)[:k])
    return out


@pytest.mark.parametrize("one_per_class", [True, False])
@pytest.mark.parametrize("k", [1, 3, 7])
def test_mining_matches_a_loop(one_per_class, k):
    q, pool = unit(13, 5, 0), unit(40, 5, 1)
    ql = torch.randint(0, 6, (13,), generator=torch.Generator().manual_seed(2))
    pl = torch.randint(0, 6, (40,), generator=torch.Generator().manual_seed(3))
    got = mine_hard_negatives(q, ql, pool, pl, k, one_per_class=one_per_class, chunk=5)
    assert got.tolist() == loop_mine(q, ql.tolist(), pool, pl.tolist(), k, one_per_class)


def test_one_per_class_on_a_hand_made_case():
    # pool: class 1 holds the two nearest items, class 2 the third; the anchor is class 0
    q = torch.tensor([[1.0, 0.0]])
    pool = F.normalize(torch.tensor([[1.0, 0.1], [1.0, 0.2], [1.0, 0.3], [1.0, 0.0], [-1.0, 0.0]]), dim=1)
    pl = torch.tensor([1, 1, 2, 0, 3])
    assert mine_hard_negatives(q, torch.tensor([0]), pool, pl, 3).tolist() == [[0, 2, 4]]
    assert mine_hard_negatives(q, torch.tensor([0]), pool, pl, 3, one_per_class=False).tolist() == [[0, 1, 2]]
    # fewer classes than k: padded with -1
    assert mine_hard_negatives(q, torch.tensor([0]), pool, pl, 5).tolist() == [[0, 2, 4, -1, -1]]


def test_in_batch_miner_and_its_legacy_shape():
    emb = unit(8, 4, 4)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    got = HardNegativeMiner(3)(emb, labels)
    assert got.tolist() == loop_mine(emb, labels.tolist(), emb, labels.tolist(), 3, False)
    got = HardNegativeMiner(3, one_per_class=True)(emb, labels)
    assert got.tolist() == loop_mine(emb, labels.tolist(), emb, labels.tolist(), 3, True)
    with pytest.raises(ValueError):
        HardNegativeMiner(0)


def test_mining_takes_no_gradient_and_random_pool():
    emb = unit(6, 3, 5).requires_grad_(True)
    idx = mine_hard_negatives(emb, torch.tensor([0, 0, 1, 1, 2, 2]), emb.detach(), torch.tensor([0, 0, 1, 1, 2, 2]), 2)
    assert not idx.requires_grad and idx.dtype == torch.long
    pool = random_pool(10, 4, torch.Generator().manual_seed(0))
    assert len(set(pool.tolist())) == 4 and all(0 <= i < 10 for i in pool.tolist())
    with pytest.raises(ValueError):
        random_pool(3, 4)
