"""Losses of seed 001 (asymmetric metric learning), each a small `nn.Module`, and hard-negative mining.

Notation (f_θ the network being trained, g the frozen teacher, all embeddings unit norm, so the similarity
s(a, x) is an inner product = cosine):

- symmetric:  s_θ(a, x) = sim(f_θ(a), f_θ(x))       -- `reference=None`: the batch itself
- asymmetric: s_θ(a, x) = sim(f_θ(a), g(x))         -- `reference` = teacher embeddings (AML)

Mining is a separate object (`HardNegativeMiner`) whose output, N(a), the contrastive loss takes.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _reference(embeddings: torch.Tensor, labels: torch.Tensor, reference: torch.Tensor | None,
               reference_labels: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    if reference is None:
        if reference_labels is not None:
            raise ValueError("reference_labels given without reference")
        return embeddings, labels
    if reference_labels is None:
        raise ValueError("reference given without reference_labels")
    if reference.shape[0] != reference_labels.shape[0]:
        raise ValueError(f"{reference.shape[0]} reference embeddings but {reference_labels.shape[0]} labels")
    return reference, torch.as_tensor(reference_labels, device=reference.device)


class HardNegativeMiner:
    """N(a): the `num_negatives` reference items most similar to anchor a among those with a different label.

    `__call__(embeddings, labels, reference=None, reference_labels=None) -> LongTensor (N, k)`: row a holds
    indices into `reference` (the batch itself when None), most similar first. A row with fewer than k
    negatives is padded with -1, which `ContrastiveLoss` ignores. Mined without gradient.
    """

    def __init__(self, num_negatives: int) -> None:
        if num_negatives < 1:
            raise ValueError(f"num_negatives must be at least 1, not {num_negatives}")
        self.num_negatives = num_negatives

    @torch.no_grad()
    def __call__(self, embeddings: torch.Tensor, labels: torch.Tensor, reference: torch.Tensor | None = None,
                 reference_labels: torch.Tensor | None = None) -> torch.Tensor:
        labels = torch.as_tensor(labels, device=embeddings.device)
        ref, ref_labels = _reference(embeddings, labels, reference, reference_labels)
        sims = embeddings.detach() @ ref.detach().T
        sims = sims.masked_fill(labels[:, None] == ref_labels[None, :], float("-inf"))
        k = min(self.num_negatives, ref.shape[0])
        values, idx = sims.topk(k, dim=1)
        idx = idx.masked_fill(torch.isinf(values), -1)
        if k < self.num_negatives:
            pad = idx.new_full((idx.shape[0], self.num_negatives - k), -1)
            idx = torch.cat([idx, pad], dim=1)
        return idx


class ContrastiveLoss(nn.Module):
    """Seed 001's contrastive loss, mean over anchors a of

        ℓ_C(a; θ) = Σ_{p ∈ P(a)} −s_θ(a, p) + Σ_{n ∈ N(a)} [s_θ(a, n) − m]_+

    with s_θ the inner product of unit vectors, P(a) the reference items sharing a's label and N(a) the mined
    negatives (`negatives_idx`, rows padded with -1).

    - Symmetric (teacher training): `reference=None`, the batch is the reference and the anchor itself is left
      out of P(a).
    - Asymmetric (AML, s_θ(a, x) = sim(f_θ(a), g(x))): `reference` = teacher embeddings. By default every
      same-label reference item is a positive: when the reference is g of the same batch, that includes
      g(a) and the loss is Contr⁺, ℓ_C(a) − s_θ(a, a). Pass `exclude_self=True` (reference row i = anchor i)
      to leave g(a) out and get plain asymmetric Contr.
    """

    def __init__(self, margin: float = 0.5) -> None:
        super().__init__()
        self.margin = margin

    def forward(self, anchors: torch.Tensor, labels: torch.Tensor, negatives_idx: torch.Tensor,
                reference: torch.Tensor | None = None, reference_labels: torch.Tensor | None = None, *,
                exclude_self: bool | None = None) -> torch.Tensor:
        labels = torch.as_tensor(labels, device=anchors.device)
        if exclude_self is None:
            exclude_self = reference is None
        ref, ref_labels = _reference(anchors, labels, reference, reference_labels)
        sims = anchors @ ref.T  # (N, M)
        positive = labels[:, None] == ref_labels[None, :]
        if exclude_self:
            if ref.shape[0] != anchors.shape[0]:
                raise ValueError("exclude_self needs reference row i to be anchor i")
            positive &= ~torch.eye(anchors.shape[0], dtype=torch.bool, device=anchors.device)
        attract = -(sims * positive).sum(dim=1)
        valid = negatives_idx >= 0
        neg_sims = sims.gather(1, negatives_idx.clamp(min=0))
        repel = (F.relu(neg_sims - self.margin) * valid).sum(dim=1)
        return (attract + repel).mean()


class RegressionLoss(nn.Module):
    """Seed 001's regression loss, mean over the batch of

        ℓ_R(a; θ) = −s_θ^asym(a, a) = −sim(f_θ(a), g(a))

    the student's embedding of an image pulled onto the frozen teacher's embedding of the same image (inner
    product of unit vectors). Labels are not used.
    """

    def forward(self, student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        if student.shape != teacher.shape:
            raise ValueError(f"student embeddings {tuple(student.shape)} and teacher {tuple(teacher.shape)} differ")
        return -(student * teacher.detach()).sum(dim=1).mean()
