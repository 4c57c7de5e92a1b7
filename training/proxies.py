"""Proxy-Anchor loss (Kim, Kim, Cho, Kwak, "Proxy Anchor Loss for Deep Metric Learning", CVPR 2020), a teacher
loss of ours beside seed 001's ℓ_C and multi-similarity.

One learnable proxy p per training class; each proxy is the anchor, and the batch's embeddings are its positives
(X_p⁺, the embeddings of its class) and negatives (X_p⁻, all others). Equation (4) of the paper:

    ℓ(X) = 1/|P⁺| Σ_{p ∈ P⁺} log(1 + Σ_{x ∈ X_p⁺} e^{−α(s(x,p) − δ)})
         + 1/|P|  Σ_{p ∈ P}  log(1 + Σ_{x ∈ X_p⁻} e^{ α(s(x,p) + δ)})

with s the cosine similarity, P all proxies, P⁺ those with a positive in the batch, α = 32 and δ = 0.1 the
paper's values. Every embedding of the batch takes part (no mining), and each proxy weighs its data by their
relative hardness, which is why it converges in a few epochs; on CUB-100 it generalised to the unseen classes
better than multi-similarity (docs/heads.md).

The proxies train beside the model and are never part of it: the checkpoint (and so the exported model) holds
only the network; the resumable training state keeps them.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ProxyAnchorLoss(nn.Module):
    """ℓ(X) of equation (4) for `num_classes` proxies in `dim` dimensions; call as `loss(embeddings, labels)`,
    embeddings (N, dim) unit norm, labels (N,) class indices in [0, num_classes)."""

    def __init__(self, num_classes: int, dim: int, alpha: float = 32.0, delta: float = 0.1) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"Proxy-Anchor needs at least two classes, got {num_classes}")
        self.alpha, self.delta = float(alpha), float(delta)
        self.proxies = nn.Parameter(torch.empty(num_classes, dim))
        nn.init.kaiming_normal_(self.proxies, mode="fan_out")  # the paper's initialisation

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        sims = embeddings @ F.normalize(self.proxies, dim=1).t()  # (N, C): s(x, p)
        positive = F.one_hot(labels, self.proxies.shape[0]).bool()
        # log(1 + Σ_x e^z) per proxy (column), stably: logsumexp over the selected x and a zero
        pos = _log1p_sum_exp(torch.where(positive, -self.alpha * (sims - self.delta), float("-inf")))
        neg = _log1p_sum_exp(torch.where(positive, float("-inf"), self.alpha * (sims + self.delta)))
        with_positive = positive.any(dim=0)
        return pos[with_positive].mean() + neg.mean()


def _log1p_sum_exp(z: torch.Tensor) -> torch.Tensor:
    """log(1 + Σ_i e^{z_i}) for every column of z (N, C); −inf entries count as absent."""
    return torch.logsumexp(torch.cat([z, z.new_zeros(1, z.shape[1])], dim=0), dim=0)
