"""Margin-based softmax losses, teacher losses beside ℓ_C, multi-similarity and Proxy-Anchor:

- **ArcFace** (Jiankang Deng, Jia Guo, Niannan Xue, Stefanos Zafeiriou, "ArcFace: Additive Angular Margin Loss for
  Deep Face Recognition", CVPR 2019), equation (3):

      L = −1/N Σ_i log( e^{s cos(θ_{y_i} + m)} / ( e^{s cos(θ_{y_i} + m)} + Σ_{j ≠ y_i} e^{s cos θ_j} ) )

- **CosFace** (Hao Wang, Yitong Wang, Zheng Zhou, Xing Ji, Dihong Gong, Jingchao Zhou, Zhifeng Li, Wei Liu,
  "CosFace: Large Margin Cosine Loss for Deep Face Recognition", CVPR 2018), the large margin cosine loss (LMCL),
  equation (4):

      L = −1/N Σ_i log( e^{s (cos θ_{y_i} − m)} / ( e^{s (cos θ_{y_i} − m)} + Σ_{j ≠ y_i} e^{s cos θ_j} ) )

with cos θ_j = Ŵ_jᵀ x̂_i, the cosine between the (L2-normalised) embedding x_i and the (L2-normalised) weight W_j of
class j: one learned weight vector per training class, the class-weight matrix W (C × d). Both papers normalise x
and W and re-scale by s; their values, s = 64 and m = 0.5 (ArcFace) / m = 0.35 (CosFace), are the defaults.

Our reading where the papers leave room: cos(θ + m) is evaluated as cos θ cos m − sin θ sin m with
sin θ = √(1 − cos² θ) ≥ 0, which is cos(θ + m) exactly for θ ∈ [0, π] -- equation (3) as written, without the
fall-back some implementations add when θ + m > π (not part of the equation). W is initialised Xavier-uniform.

Like Proxy-Anchor's proxies (`training.proxies`), W trains beside the model in its own optimiser group at
`proxy_lr`, without weight decay, and is never part of the model: the checkpoint (and the exported model) holds the
network only, the teacher's resumable state keeps W. Bad hyper-parameters are refused when the teacher's config is
checked, before any data is read, and again when the loss is built (`UserError`, one line).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

import asymsearch.training.proxies  # noqa: F401 - registered first: the teacher losses list in one order
from asymsearch.core.errors import UserError
from asymsearch.training.registry import register_loss

__all__ = ["ArcFaceLoss", "CosFaceLoss", "check_arcface", "check_cosface"]


def _check_scale(name: str, scale: float) -> None:
    if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
        raise UserError(f"{name} scale s must be a positive number, not {scale}")


def check_arcface(scale: float = 64.0, margin: float = 0.5) -> None:
    """`UserError` unless s > 0 and the additive angular margin m lies in (0, π/2)."""
    _check_scale("ArcFace", scale)
    if not (isinstance(margin, (int, float)) and 0 < margin < math.pi / 2):
        raise UserError(f"ArcFace margin m is an angle in radians in (0, π/2) = (0, {math.pi / 2:.4f}), not {margin}")


def check_cosface(scale: float = 64.0, margin: float = 0.35) -> None:
    """`UserError` unless s > 0 and the cosine margin m lies in [0, 1)."""
    _check_scale("CosFace", scale)
    if not (isinstance(margin, (int, float)) and 0 <= margin < 1):
        raise UserError(f"CosFace margin m is subtracted from a cosine and must lie in [0, 1), not {margin}")


class _MarginSoftmax(nn.Module):
    """Normalised softmax over `num_classes` learned class weights in `dim` dimensions, the target logit changed by
    `target_logit`; call as `loss(embeddings, labels)`, labels (N,) class indices in [0, num_classes)."""

    def __init__(self, num_classes: int, dim: int, scale: float, margin: float) -> None:
        super().__init__()
        if num_classes < 2:
            raise UserError(f"{type(self).__name__} needs at least two classes, got {num_classes}")
        self.scale, self.margin = float(scale), float(margin)
        self.weight = nn.Parameter(torch.empty(num_classes, dim))
        nn.init.xavier_uniform_(self.weight)

    def cosines(self, embeddings: torch.Tensor) -> torch.Tensor:
        """(N, C) cos θ_j = Ŵ_jᵀ x̂_i."""
        return F.normalize(embeddings, dim=1) @ F.normalize(self.weight.to(embeddings.dtype), dim=1).t()

    def target_logit(self, cos: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        labels = torch.as_tensor(labels, device=embeddings.device)
        cos = self.cosines(embeddings)
        target = F.one_hot(labels, cos.shape[1]).to(torch.bool)
        logits = torch.where(target, self.target_logit(cos), cos)
        return F.cross_entropy(self.scale * logits, labels)


class ArcFaceLoss(_MarginSoftmax):
    """ArcFace, equation (3) of Deng et al. 2019: the target logit is s cos(θ_y + m)."""

    def __init__(self, num_classes: int, dim: int, scale: float = 64.0, margin: float = 0.5) -> None:
        check_arcface(scale, margin)
        super().__init__(num_classes, dim, scale, margin)

    def target_logit(self, cos):
        sin = (1.0 - cos * cos).clamp(min=1e-12).sqrt()  # sin θ ≥ 0 for θ ∈ [0, π]
        return cos * math.cos(self.margin) - sin * math.sin(self.margin)


class CosFaceLoss(_MarginSoftmax):
    """CosFace (LMCL), equation (4) of Wang et al. 2018: the target logit is s (cos θ_y − m)."""

    def __init__(self, num_classes: int, dim: int, scale: float = 64.0, margin: float = 0.35) -> None:
        check_cosface(scale, margin)
        super().__init__(num_classes, dim, scale, margin)

    def target_logit(self, cos):
        return cos - self.margin


@register_loss("arcface", options={"scale": "arcface_scale", "margin": "arcface_margin"}, roles=("teacher",),
               per_class=True, lr_option="proxy_lr", check=check_arcface)
def arcface(num_classes: int, dim: int, scale: float = 64.0, margin: float = 0.5) -> ArcFaceLoss:
    """The registry's factory."""
    return ArcFaceLoss(num_classes, dim, scale, margin)


@register_loss("cosface", options={"scale": "cosface_scale", "margin": "cosface_margin"}, roles=("teacher",),
               per_class=True, lr_option="proxy_lr", check=check_cosface)
def cosface(num_classes: int, dim: int, scale: float = 64.0, margin: float = 0.35) -> CosFaceLoss:
    """The registry's factory."""
    return CosFaceLoss(num_classes, dim, scale, margin)
