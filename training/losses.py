"""The losses of Budnik & Avrithis 2021 (AML, Budnik & Avrithis, CVPR 2021), each a small `nn.Module` with one signature.

Notation (f_θ the network being trained, g the frozen teacher, embeddings unit norm, so a similarity is an inner
product = cosine):

- symmetric:  s_θ(a, x) = s_θ^sym(a, x) = sim(f_θ(a), f_θ(x))   -- `reference=None`: the batch itself
- asymmetric: s_θ(a, x) = s_θ^asym(a, x) = sim(f_θ(a), g(x))    -- `reference` = teacher embeddings (AML)

Every loss is called the same way::

    loss(anchors, labels, negatives_idx=None, reference=None, reference_labels=None, *,
         self_idx=None, teacher_anchors=None, teacher_reference=None) -> scalar

- anchors (N, d): f_θ(a), with gradient; labels (N,).
- negatives_idx (N, k): N(a) as indices into the reference, rows padded with -1 (a miner's output, see
  `training.mining`); None: every reference item of another label is a negative.
- reference (M, d), reference_labels (M,): what the anchors are compared with. None: the anchors themselves.
- self_idx (N,): the row of the reference that holds the anchor's own image (g(a) in the asymmetric case), -1
  where absent. Symmetric: always the anchor's own row. The anchor's own image is never in P(a) or U(a).
- teacher_anchors (N, d) / teacher_reference (M, d): g(a) and g(x), for the losses that match the teacher's
  relations (RKD, DarkRank). Asymmetric default: reference[self_idx] and reference.

The loss is the mean over anchors of the per-anchor ℓ(a; θ) the docstrings give (each a sum, as in the seed).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from asymsearch.core.errors import UserError
from asymsearch.training.mining import HardNegativeMiner  # noqa: F401 - re-exported (teacher training imports it here)
from asymsearch.training.registry import LOSS_REGISTRY, loss_names, register_loss
from asymsearch.training.registry import create_loss as registry_create_loss

__all__ = ["LOSSES", "AMLLoss", "ContrastiveLoss", "ContrastivePlusLoss", "DarkRankLoss", "GenericPairLoss",
           "HardNegativeMiner", "MultiSimilarityLoss", "RKDLoss", "RegressionLoss", "TripletLoss", "create_loss",
           "negative_miner"]


@dataclass
class Pairs:
    """Everything a loss needs about one batch, resolved once: similarities and the P(a) / N(a) / U(a) masks."""

    sims: torch.Tensor  # (N, M) s_θ(a, x)
    positive: torch.Tensor  # (N, M) bool, P(a): same label, not the anchor's own image
    negative: torch.Tensor  # (N, M) bool, N(a): the mined negatives (or every other-label item)
    others: torch.Tensor  # (N, M) bool, U(a): every reference item but the anchor's own image
    self_idx: torch.Tensor  # (N,) long, -1 where the anchor's own image is not in the reference
    reference: torch.Tensor  # (M, d)
    symmetric: bool


def resolve_pairs(anchors: torch.Tensor, labels: torch.Tensor, negatives_idx: torch.Tensor | None = None,
                  reference: torch.Tensor | None = None, reference_labels: torch.Tensor | None = None,
                  self_idx: torch.Tensor | None = None) -> Pairs:
    labels = torch.as_tensor(labels, device=anchors.device)
    n = anchors.shape[0]
    if labels.shape != (n,):
        raise ValueError(f"{n} anchors but labels of shape {tuple(labels.shape)}")
    symmetric = reference is None
    if symmetric:
        if reference_labels is not None:
            raise ValueError("reference_labels given without reference")
        if self_idx is not None:
            raise ValueError("self_idx is implied (each anchor's own row) when reference is None")
        reference, reference_labels = anchors, labels
        self_idx = torch.arange(n, device=anchors.device)
    else:
        if reference_labels is None:
            raise ValueError("reference given without reference_labels")
        reference_labels = torch.as_tensor(reference_labels, device=anchors.device)
        if reference.shape[0] != reference_labels.shape[0]:
            raise ValueError(f"{reference.shape[0]} reference embeddings but {reference_labels.shape[0]} labels")
        if reference.shape[1] != anchors.shape[1]:
            raise ValueError(f"anchors have dimension {anchors.shape[1]} but the reference {reference.shape[1]}")
        if self_idx is None:
            self_idx = torch.full((n,), -1, dtype=torch.long, device=anchors.device)
        self_idx = torch.as_tensor(self_idx, dtype=torch.long, device=anchors.device)
        if self_idx.shape != (n,) or (self_idx >= reference.shape[0]).any() or (self_idx < -1).any():
            raise ValueError("self_idx must hold one reference row (or -1) per anchor")
    m = reference.shape[0]
    sims = anchors @ reference.T
    is_self = torch.zeros((n, m), dtype=torch.bool, device=anchors.device)
    has_self = self_idx >= 0
    is_self[has_self.nonzero().squeeze(1), self_idx[has_self]] = True
    same = labels[:, None] == reference_labels[None, :]
    positive = same & ~is_self
    if negatives_idx is None:
        negative = ~same
    else:
        negatives_idx = torch.as_tensor(negatives_idx, device=anchors.device)
        if negatives_idx.ndim != 2 or negatives_idx.shape[0] != n:
            raise ValueError(f"negatives_idx must be (N, k) for N={n} anchors, not {tuple(negatives_idx.shape)}")
        if (negatives_idx >= m).any():
            raise ValueError("negatives_idx points past the reference")
        negative = torch.zeros((n, m), dtype=torch.bool, device=anchors.device)
        valid = negatives_idx >= 0
        rows = torch.arange(n, device=anchors.device)[:, None].expand_as(negatives_idx)
        negative[rows[valid], negatives_idx[valid]] = True
        negative &= ~same  # a mined "negative" of the anchor's own label would contradict P(a)
    return Pairs(sims, positive, negative, ~is_self, self_idx, reference, symmetric)


class AMLLoss(nn.Module):
    """Base: `forward` resolves the pairs once and hands them to `compute(pairs, ...)`."""

    def forward(self, anchors: torch.Tensor, labels: torch.Tensor, negatives_idx: torch.Tensor | None = None,
                reference: torch.Tensor | None = None, reference_labels: torch.Tensor | None = None, *,
                self_idx: torch.Tensor | None = None, teacher_anchors: torch.Tensor | None = None,
                teacher_reference: torch.Tensor | None = None) -> torch.Tensor:
        pairs = resolve_pairs(anchors, labels, negatives_idx, reference, reference_labels, self_idx)
        return self.compute(anchors, pairs, teacher_anchors, teacher_reference)

    def compute(self, anchors: torch.Tensor, pairs: Pairs, teacher_anchors: torch.Tensor | None,
                teacher_reference: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError


def _self_similarity(pairs: Pairs, name: str) -> torch.Tensor:
    """s_θ^asym(a, a) = sim(f_θ(a), g(a)) for every anchor: needs g(a) in the reference (self_idx)."""
    if pairs.symmetric:
        raise ValueError(f"{name} is asymmetric only: pass the teacher embeddings as reference")
    if (pairs.self_idx < 0).any():
        raise ValueError(f"{name} needs self_idx: the reference row holding g(a) for every anchor")
    return pairs.sims.gather(1, pairs.self_idx[:, None]).squeeze(1)


class RegressionLoss(AMLLoss):
    """Reg, Budnik & Avrithis 2021: ℓ_R(a; θ) = −s_θ^asym(a, a) = −sim(f_θ(a), g(a)).

    The student's embedding of an image pulled onto the frozen teacher's embedding of the same image; labels
    and negatives are not used. Asymmetric only (g(a) is reference row self_idx[a]).
    """

    def compute(self, anchors, pairs, teacher_anchors, teacher_reference):
        return -_self_similarity(pairs, "the regression loss").mean()


class GenericPairLoss(AMLLoss):
    """The generic form of a pair-based loss (Venkataramanan et al. 2022, Metrix slide "generic loss formulation"):

        ℓ(a; θ) = σ⁺( Σ_{p ∈ P(a)} ρ⁺(s(a, p)) ) + σ⁻( Σ_{n ∈ N(a)} ρ⁻(s(a, n)) )

    written with pair weights, ℓ(a) = σ⁺(Σ_x w⁺(a,x) ρ⁺(s(a,x))) + σ⁻(Σ_x w⁻(a,x) ρ⁻(s(a,x))): the plain loss
    has w⁺ = 1[x ∈ P(a)], w⁻ = 1[x ∈ N(a)] (`compute`); the training add-ons (`training.addons`) put other weights
    in their place through `generic` -- Metrix the interpolated labels y and 1 − y ("mixing examples and labels":
    σ⁺(Σ_{(v,y) ∈ V(a)} y ρ⁺(s(a,v))) + σ⁻(Σ (1 − y) ρ⁻(s(a,v)))), OSM + CAA its soft-mining weights (Wang et al. 2019).
    A subclass defines ρ⁺, ρ⁻ and, when not the identity, σ⁺, σ⁻.
    """

    def rho_pos(self, s: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def rho_neg(self, s: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def sigma_pos(self, total: torch.Tensor) -> torch.Tensor:
        return total

    def sigma_neg(self, total: torch.Tensor) -> torch.Tensor:
        return total

    def generic_parts(self, sims: torch.Tensor, pos_weight: torch.Tensor,
                      neg_weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(σ⁺(Σ_x w⁺ ρ⁺(s)), σ⁻(Σ_x w⁻ ρ⁻(s))) per row of `sims` (N, M); weights (N, M), zero = pair unused."""
        return (self.sigma_pos((pos_weight * self.rho_pos(sims)).sum(dim=1)),
                self.sigma_neg((neg_weight * self.rho_neg(sims)).sum(dim=1)))

    def generic(self, sims: torch.Tensor, pos_weight: torch.Tensor, neg_weight: torch.Tensor) -> torch.Tensor:
        """ℓ per row (N,): the generic form with pair weights."""
        pos, neg = self.generic_parts(sims, pos_weight, neg_weight)
        return pos + neg

    def compute(self, anchors, pairs, teacher_anchors, teacher_reference):
        dtype = pairs.sims.dtype
        return self.generic(pairs.sims, pairs.positive.to(dtype), pairs.negative.to(dtype)).mean()


class _ContrastiveForm(GenericPairLoss):
    """ℓ_C in the generic form: σ⁺ = σ⁻ = identity, ρ⁺(s) = −s, ρ⁻(s) = [s − m]_+ (Budnik & Avrithis 2021)."""

    def __init__(self, margin: float = 0.5) -> None:
        super().__init__()
        self.margin = margin

    def rho_pos(self, s):
        return -s

    def rho_neg(self, s):
        return F.relu(s - self.margin)


class ContrastiveLoss(_ContrastiveForm):
    """Contr, Budnik & Avrithis 2021: ℓ_C(a; θ) = Σ_{n ∈ N(a)} [s_θ(a, n) − m]_+ − Σ_{p ∈ P(a)} s_θ(a, p).

    Symmetric: the teacher's training loss. Asymmetric: AML's Contr (P(a) leaves out g(a) itself when
    `self_idx` says where it is). The legacy keyword `exclude_self=True` means self_idx = arange(N) (reference row
    i holds g(a_i)); without either, every same-label reference item is a positive. Generic form: ρ⁺(s) = −s,
    ρ⁻(s) = [s − m]_+, σ± the identity (`GenericPairLoss`).
    """

    def forward(self, anchors, labels, negatives_idx=None, reference=None, reference_labels=None, *,
                self_idx=None, teacher_anchors=None, teacher_reference=None, exclude_self: bool | None = None):
        if exclude_self and reference is not None:
            if reference.shape[0] != anchors.shape[0]:
                raise ValueError("exclude_self needs reference row i to be anchor i")
            self_idx = torch.arange(anchors.shape[0], device=anchors.device)
        elif exclude_self is False and reference is None:
            raise ValueError("the symmetric loss always leaves the anchor out of its own positives")
        return super().forward(anchors, labels, negatives_idx, reference, reference_labels, self_idx=self_idx,
                               teacher_anchors=teacher_anchors, teacher_reference=teacher_reference)


class ContrastivePlusLoss(_ContrastiveForm):
    """Contr⁺, Budnik & Avrithis 2021: ℓ_C⁺(a; θ) = Σ_{n ∈ N(a)} [s_θ(a, n) − m]_+ − Σ_{p ∈ P(a)} s_θ(a, p) − s_θ(a, a):
    asymmetric contrastive plus the regression term (g(a) at reference row self_idx[a]). The pair part has the
    generic form of ℓ_C."""

    def compute(self, anchors, pairs, teacher_anchors, teacher_reference):
        return super().compute(anchors, pairs, teacher_anchors, teacher_reference) \
            - _self_similarity(pairs, "Contr⁺").mean()


class TripletLoss(AMLLoss):
    """Triplet, Budnik & Avrithis 2021: ℓ_T(a; θ) = Σ_{(p, n) ∈ L(a)} [s_θ(a, n) − s_θ(a, p) + m]_+, L(a) = P(a) × N(a)."""

    def __init__(self, margin: float = 0.1) -> None:
        super().__init__()
        self.margin = margin

    def compute(self, anchors, pairs, teacher_anchors, teacher_reference):
        s = pairs.sims
        hinge = F.relu(s[:, None, :] - s[:, :, None] + self.margin)  # [a, p, n] = s(a,n) − s(a,p) + m
        mask = pairs.positive[:, :, None] & pairs.negative[:, None, :]
        return (hinge * mask).sum(dim=(1, 2)).mean()


class MultiSimilarityLoss(GenericPairLoss):
    """MS, Budnik & Avrithis 2021: ℓ_MS(a; θ) = (1/α) log(1 + Σ_{p ∈ P(a)} e^{−α(s_θ(a,p) − m)})
                                 + (1/β) log(1 + Σ_{n ∈ N(a)} e^{β(s_θ(a,n) − m)}).

    Generic form (Venkataramanan et al. 2022, Metrix): ρ⁺(s) = e^{−α(s − m)}, σ⁺(t) = (1/α) log(1 + t), ρ⁻(s) = e^{β(s − m)},
    σ⁻(t) = (1/β) log(1 + t); evaluated stably as a log-sum-exp with log-weights."""

    def __init__(self, alpha: float = 2.0, beta: float = 50.0, margin: float = 0.5) -> None:
        super().__init__()
        self.alpha, self.beta, self.margin = alpha, beta, margin

    def rho_pos(self, s):
        return torch.exp(-self.alpha * (s - self.margin))

    def rho_neg(self, s):
        return torch.exp(self.beta * (s - self.margin))

    def sigma_pos(self, total):
        return torch.log1p(total) / self.alpha

    def sigma_neg(self, total):
        return torch.log1p(total) / self.beta

    def generic_parts(self, sims, pos_weight, neg_weight):
        return (log1p_sum_exp(-self.alpha * (sims - self.margin), pos_weight) / self.alpha,
                log1p_sum_exp(self.beta * (sims - self.margin), neg_weight) / self.beta)


def log1p_sum_exp(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """log(1 + Σ w e^x) per row, stably: logsumexp of x + log w over the entries with w > 0, and a zero."""
    used = weight > 0
    x = torch.where(used, x + torch.log(torch.where(used, weight, torch.ones_like(weight))), float("-inf"))
    return torch.logsumexp(torch.cat([x, x.new_zeros(x.shape[0], 1)], dim=1), dim=1)


def _teacher_views(pairs: Pairs, teacher_anchors, teacher_reference, name: str):
    """g(a) (N, d) and g(x) (M, d) for a loss that matches the teacher's relations."""
    if pairs.symmetric:
        if teacher_anchors is None:
            raise ValueError(f"{name} needs teacher_anchors: the teacher's embeddings of the batch")
        return teacher_anchors.detach(), (teacher_anchors if teacher_reference is None else teacher_reference).detach()
    if teacher_anchors is None:
        if (pairs.self_idx < 0).any():
            raise ValueError(f"{name} needs teacher_anchors, or self_idx pointing at g(a) in the reference")
        teacher_anchors = pairs.reference[pairs.self_idx]
    if teacher_reference is None:
        teacher_reference = pairs.reference
    return teacher_anchors.detach(), teacher_reference.detach()


FORMS = ("paper", "legacy")


def check_form(loss: str, form: str) -> str:
    """`form` if it is one of `FORMS`, else a one-line `UserError`."""
    if form not in FORMS:
        raise UserError(f"{loss} form must be one of {', '.join(FORMS)}, not {form!r}")
    return form


class RKDLoss(AMLLoss):
    """RKD, Budnik & Avrithis 2021 (relational knowledge distillation: Wonpyo Park, Dongju Kim, Yan Lu, Minsu Cho,
    "Relational Knowledge Distillation", CVPR 2019):

        ℓ_RKD(a; θ) = Σ_{(x, …) ∈ U(a)^n} −sim(ψ(f_θ(a), r(x), …), ψ(g(a), g(x), …))

    over the random pool U(a) (the reference without a), with r = f_θ (symmetric) or g (asymmetric), and two
    measurements, each one term of the loss:

    - distance (n = 1): ψ(a, x) = ‖a − x‖;
    - angle (n = 2): ψ(a, x, y) = sim(a − x, a − y), the cosine of the angle at the anchor.

    `form="paper"` (the default) is the slide's equation read literally: per-anchor **sums** over U(a) and
    U(a)², the distances as written, ‖a − x‖ with no normaliser (both spaces hold unit vectors, so their distances
    are commensurate), and the loss the mean over anchors of

        ℓ(a) = w_d Σ_{x ∈ U(a)} h(‖f_θ(a) − r(x)‖ − ‖g(a) − g(x)‖)
             + w_a Σ_{(x, y) ∈ U(a)², x ≠ y} h(sim(f_θ(a) − r(x), f_θ(a) − r(y)) − sim(g(a) − g(x), g(a) − g(y)))

    How we read it: "−sim" of two scalar measurements is not defined by the slides; we take RKD's own choice,
    −sim(u, v) = h(u − v) with h the Huber loss (h(z) = z²/2 for |z| < 1, |z| − 1/2 otherwise), which is zero when
    the two spaces agree. The pairs x = y of U(a)² add h(1 − 1) = 0, so leaving them out changes nothing. The two
    terms are combined with RKD's weights w_d = 1, w_a = 2.

    `form="legacy"` (the earlier default): RKD's batch means instead of the sums, each space's distances divided by
    their mean over the batch, ℓ = w_d · mean h(d_student, d_teacher) + w_a · mean h(angle_student, angle_teacher).
    """

    def __init__(self, distance_weight: float = 1.0, angle_weight: float = 2.0, form: str = "paper") -> None:
        super().__init__()
        self.distance_weight, self.angle_weight = distance_weight, angle_weight
        self.form = check_form("RKD", form)

    def compute(self, anchors, pairs, teacher_anchors, teacher_reference):
        ga, gx = _teacher_views(pairs, teacher_anchors, teacher_reference, "RKD")
        mask = pairs.others
        angle_mask = mask[:, :, None] & mask[:, None, :] & ~torch.eye(mask.shape[1], dtype=torch.bool,
                                                                      device=mask.device)
        if self.form == "legacy":
            return self._legacy(anchors, pairs, ga, gx, mask, angle_mask)
        per_anchor = anchors.new_zeros(anchors.shape[0])
        if self.distance_weight:
            h = F.smooth_l1_loss(_distances(anchors, pairs.reference), _distances(ga, gx), reduction="none")
            per_anchor = per_anchor + self.distance_weight * (h * mask).sum(dim=1)
        if self.angle_weight:
            h = F.smooth_l1_loss(_angles(anchors, pairs.reference), _angles(ga, gx), reduction="none")
            per_anchor = per_anchor + self.angle_weight * (h * angle_mask).sum(dim=(1, 2))
        return per_anchor.mean()

    def _legacy(self, anchors, pairs, ga, gx, mask, angle_mask):
        loss = anchors.new_zeros(())
        if self.distance_weight:
            ds, dt = _distances(anchors, pairs.reference), _distances(ga, gx)
            ds, dt = ds / ds[mask].mean().clamp(min=1e-12), dt / dt[mask].mean().clamp(min=1e-12)
            loss = loss + self.distance_weight * F.smooth_l1_loss(ds[mask], dt[mask])
        if self.angle_weight and angle_mask.any():
            loss = loss + self.angle_weight * F.smooth_l1_loss(_angles(anchors, pairs.reference)[angle_mask],
                                                               _angles(ga, gx)[angle_mask])
        return loss


def _distances(a: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(N, M) ‖a − x‖, with a gradient that stays finite where a = x."""
    return ((a[:, None, :] - x[None, :, :]).pow(2).sum(-1) + 1e-12).sqrt()


def _angles(a: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(N, M, M) [a, x, y] = sim(a − x, a − y), the cosine of the angle at a."""
    e = F.normalize(a[:, None, :] - x[None, :, :], p=2, dim=2, eps=1e-12)
    return e @ e.transpose(1, 2)


class DarkRankLoss(AMLLoss):
    """DarkRank, Budnik & Avrithis 2021 (Yuntao Chen, Naiyan Wang, Zhaoxiang Zhang, "DarkRank: Accelerating Deep
    Metric Learning via Cross Sample Similarities Transfer", AAAI 2018; the listwise form): with U(a) the random
    pool (the reference without a),

        ℓ_DR(a; θ) = −Σ_{x ∈ U(a)} ( s_θ(a, x) − log Σ_{y ∈ V(a, x)} e^{s_θ(a, y)} )

    V(a, x) = the items of U(a) the **teacher** ranks no closer to a than x (x itself included, as in ListMLE;
    ties broken by reference order): the student is trained to reproduce the teacher's ranking. s_θ is s^sym
    (the slide) or s^asym. How we read "farther from a than x": the teacher's similarity to a no higher than x's,
    with x in V(a, x) (otherwise the last-ranked x would have an empty sum).

    `form="paper"` (the default): the slide's equation, no scale on the similarities (σ = 1). `form="legacy"`
    (the earlier default): s_θ replaced by σ s_θ with σ = 10, sharpening the softmax of unit-vector similarities
    in [−1, 1]. An explicit `scale` sets σ in either form (a departure from the slide when it is not 1).
    """

    def __init__(self, scale: float | None = None, form: str = "paper") -> None:
        super().__init__()
        self.form = check_form("DarkRank", form)
        if scale is not None and not (math.isfinite(scale) and scale > 0):
            raise UserError(f"DarkRank scale must be a positive number (or unset), not {scale}")
        self.scale = float(scale) if scale is not None else (1.0 if form == "paper" else 10.0)

    def compute(self, anchors, pairs, teacher_anchors, teacher_reference):
        ga, gx = _teacher_views(pairs, teacher_anchors, teacher_reference, "DarkRank")
        teacher_sims = (ga @ gx.T).masked_fill(~pairs.others, float("-inf"))
        order = torch.sort(teacher_sims, dim=1, descending=True, stable=True).indices
        s = (self.scale * pairs.sims).gather(1, order)
        valid = pairs.others.gather(1, order)  # the anchor's own row sorts last; drop it
        s = s.masked_fill(~valid, -1e4)  # exp(-1e4 - ·) = 0 with finite gradients (-inf would give NaN)
        # log Σ_{y ranked at or after x}: reverse cumulative logsumexp
        tail = torch.logcumsumexp(s.flip(1), dim=1).flip(1)
        terms = torch.where(valid, s - tail, torch.zeros_like(s))
        return -terms.sum(dim=1).mean()


# name -> (loss, the config field of each hyper-parameter, the trainers that take it); the names are those of Budnik &
# Avrithis 2021's tables. Every loss is built through the registry (`training.registry.create_loss`).
_STUDENT, _BOTH = ("student",), ("teacher", "student")
for _name, _cls, _options, _roles in (
        ("reg", RegressionLoss, {}, _STUDENT),
        ("contr", ContrastiveLoss, {"margin": "margin"}, _BOTH),
        ("contr+", ContrastivePlusLoss, {"margin": "margin"}, _STUDENT),
        ("triplet", TripletLoss, {"margin": "triplet_margin"}, _STUDENT),
        ("ms", MultiSimilarityLoss, {"alpha": "ms_alpha", "beta": "ms_beta", "margin": "margin"}, _BOTH),
        ("rkd", RKDLoss, {"distance_weight": "rkd_distance_weight", "angle_weight": "rkd_angle_weight",
                          "form": "rkd_form"}, _STUDENT),
        ("darkrank", DarkRankLoss, {"scale": "darkrank_scale", "form": "darkrank_form"}, _STUDENT)):
    # the forms and scales are checked by building the (parameter-free) loss once
    register_loss(_name, options=_options, roles=_roles, check=_cls if _name in ("rkd", "darkrank") else None)(_cls)
# the AML (student) losses, name -> class
LOSSES: dict[str, type[AMLLoss]] = {n: LOSS_REGISTRY[n].factory for n in loss_names("student")}
# which losses use labels with mined hard negatives, which use a random pool and the teacher's relations
MINED_LOSSES = ("contr", "contr+", "triplet", "ms")
RELATIONAL_LOSSES = ("rkd", "darkrank")
ASYMMETRIC_ONLY = ("reg", "contr+")


def create_loss(name: str, config=None, *, role: str = "student", **kwargs) -> nn.Module:
    """`training.registry.create_loss`: loss `name` with its hyper-parameters from `config` and `kwargs`; an
    unknown name raises `UserError` listing the valid ones. (Proxy-Anchor registers in `training.proxies`, ArcFace
    and CosFace in `training.margins`.)"""
    import asymsearch.training.proxies  # noqa: F401 - registers proxy-anchor, a teacher loss
    import asymsearch.training.margins  # noqa: F401 - registers arcface and cosface, teacher losses

    return registry_create_loss(name, config, role=role, **kwargs)


def negative_miner(name: str, num_negatives: int) -> HardNegativeMiner | None:
    """The in-batch hard-negative miner of a symmetric run with loss `name` (None for a loss that mines nothing:
    Proxy-Anchor compares every embedding with the class proxies)."""
    return HardNegativeMiner(num_negatives) if name in MINED_LOSSES else None
