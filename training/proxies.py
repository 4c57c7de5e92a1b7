"""Proxy-Anchor loss (Kim, Kim, Cho, Kwak, "Proxy Anchor Loss for Deep Metric Learning", CVPR 2020), a teacher
loss of ours beside Budnik & Avrithis 2021's ℓ_C and multi-similarity.

One learnable proxy p per training class; each proxy is the anchor, and the batch's embeddings are its positives
(X_p⁺, the embeddings of its class) and negatives (X_p⁻, all others). Equation (4) of the paper:

    ℓ(X) = 1/|P⁺| Σ_{p ∈ P⁺} log(1 + Σ_{x ∈ X_p⁺} e^{−α(s(x,p) − δ)})
         + 1/|P|  Σ_{p ∈ P}  log(1 + Σ_{x ∈ X_p⁻} e^{ α(s(x,p) + δ)})

with s the cosine similarity, P all proxies, P⁺ those with a positive in the batch, α = 32 and δ = 0.1 the
paper's values. Every embedding of the batch takes part (no mining) and each proxy weighs its data by their
relative hardness (the paper's argument for its fast convergence); on CUB-100 it generalised to the unseen
classes better than multi-similarity (docs/heads.md).

The proxies train beside the model and are never part of it: the checkpoint (and so the exported model) holds
only the network; the resumable training state keeps them.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from asymsearch.training.losses import log1p_sum_exp
from asymsearch.training.registry import register_loss


@register_loss("proxy-anchor", options={"alpha": "proxy_alpha", "delta": "proxy_delta"}, roles=("teacher",),
               per_class=True, lr_option="proxy_lr")
def proxy_anchor(num_classes: int, dim: int, alpha: float = 32.0, delta: float = 0.1) -> ProxyAnchorLoss:
    """The registry's factory (`ProxyAnchorLoss` looked up when called)."""
    return ProxyAnchorLoss(num_classes, dim, alpha, delta)


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
        positive = F.one_hot(labels, self.proxies.shape[0]).t().to(sims.dtype)  # (C, N): x ∈ X_p⁺
        # log(1 + Σ_x e^z) per proxy, stably, over X_p⁺ and X_p⁻ (the weights select them)
        pos = log1p_sum_exp(-self.alpha * (sims.t() - self.delta), positive)
        neg = log1p_sum_exp(self.alpha * (sims.t() + self.delta), 1 - positive)
        with_positive = positive.sum(dim=1) > 0
        return pos[with_positive].mean() + neg.mean()
