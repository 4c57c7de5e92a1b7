"""Training add-ons: three seeds that change how a metric is learned, never what is exported.

Each is switched on by one option of `train teacher` and `train student` (the fields of `AddOnOptions`, the
nested `addons` config of `TeacherConfig` and `StudentConfig`: flag `--metrix`, key `addons.metrix`), and each composes with the existing losses of
`training.losses` instead of copying them:

- **Metrix** (Venkataramanan et al. 2022, "mixup for deep metric learning"; Venkataramanan et al. 2021): `--metrix
  input|feature|embedding`. Pairs of batch examples are interpolated, mix_λ(x, x') = λx + (1 − λ)x', λ ~
  Beta(α, α), at the input, at the feature map between backbone and head (f = f_m ∘ g_m), or at the embedding,
  with interpolated labels mix_λ(y, y'); the mixed examples enter the *existing* loss through its generic form
  (`GenericPairLoss.generic`) with weights y and 1 − y. Added to the clean loss with weight `metrix_weight`.
- **OSM + CAA** (Wang et al. 2019): `--osm-caa`. Online soft mining weights every positive pair by
  s⁺ = exp(−d²/σ²) and every negative by s⁻ = max(0, α − d), times the class-aware attention
  a_ij = min(a_i, a_j), a_i = softmax over learned class centres of the item's own class; the weighted pairs go
  through the poster's contrastive terms d² and max(0, α − d)² as weighted averages (`--osm-form legacy`: the
  existing contrastive loss's ρ⁺, ρ⁻), soft mining in place of the hard-negative miner's 0/1 choice. The centres
  learn with a cross-entropy term of weight `caa_weight`.
- **Intra-batch message passing** (Seidenschwarz et al. 2021): `--message-passing L`. L attention layers
  over the complete graph of the batch, h_i ← Σ_n α_in W h_n, then a classifier and cross-entropy on the updated
  node features, added with weight `mp_weight`. It lives outside the embedding network, so the checkpoint and
  the exported ONNX are those of a model trained without it.

The add-on modules that hold parameters (CAA centres, the message-passing network) are trained with the model
(their own optimiser group) but are not part of the checkpoint's model; the teacher's resumable state keeps them.
docs/addons.md is the guide; docs/results/addons.md the ablation (`python -m experiments addons`, from a checkout).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from asymsearch.core.errors import UserError
from asymsearch.training.config import METRIX_MODES, AddOnOptions
from asymsearch.training.losses import (
    ContrastivePlusLoss,
    GenericPairLoss,
    RegressionLoss,
    _ContrastiveForm,
    _self_similarity,
    resolve_pairs,
)
from torch import nn

# ------------------------------------------------------------------------------------------------- Metrix


@dataclass
class MixPlan:
    """Which batch examples are mixed: mixed example k = mix_{λ_k}(example first[k], example second[k])."""

    first: torch.Tensor  # (K,) long
    second: torch.Tensor  # (K,) long
    lam: torch.Tensor  # (K,) float in [0, 1]


def plan_mixes(labels: torch.Tensor, alpha: float) -> MixPlan:
    """One mixed example per batch example i: i with a partner j drawn uniformly among the batch examples of
    another class (any other example if the batch has one class), λ ~ Beta(α, α) (Venkataramanan et al. 2022, "input mixup and
    manifold mixup": λ drawn from a Beta distribution). A (positive, negative) mixture for the anchors of i's or
    j's class, a (negative, negative) one for every other anchor: all are elements of V(a). Uses the global torch
    RNG (seeded by the trainer and saved in its resumable state)."""
    labels = torch.as_tensor(labels)
    n = labels.shape[0]
    if n < 2:
        raise ValueError("mixing needs at least two examples in the batch")
    other = labels[:, None] != labels[None, :]
    if not other.any(dim=1).all():
        other = ~torch.eye(n, dtype=torch.bool, device=labels.device)
    scores = torch.rand(n, n, device=labels.device).masked_fill(~other, -1.0)
    second = scores.argmax(dim=1)
    lam = torch.distributions.Beta(float(alpha), float(alpha)).sample((n,)).to(labels.device)
    return MixPlan(torch.arange(n, device=labels.device), second, lam)


def mix(x: torch.Tensor, plan: MixPlan) -> torch.Tensor:
    """mix_λ(x, x') = λ x + (1 − λ) x' for every planned pair, along the first dimension (any trailing shape)."""
    lam = plan.lam.to(x.dtype).reshape(-1, *([1] * (x.dim() - 1)))
    return lam * x[plan.first] + (1 - lam) * x[plan.second]


def soft_labels(item_labels: torch.Tensor, plan: MixPlan, batch_labels: torch.Tensor) -> torch.Tensor:
    """(N, K) interpolated pair labels: y(x, v_k) = mix_λk(1[y_x = y_first], 1[y_x = y_second]) (Venkataramanan et al. 2022, "mixing
    examples and labels"): how much mixed example k belongs to the class of item x."""
    item_labels = torch.as_tensor(item_labels, device=plan.lam.device)
    lam = plan.lam[None, :]
    a = (item_labels[:, None] == batch_labels[plan.first][None, :]).to(plan.lam.dtype)
    b = (item_labels[:, None] == batch_labels[plan.second][None, :]).to(plan.lam.dtype)
    return lam * a + (1 - lam) * b


def split_model(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(g_m, f_m) of f = f_m ∘ g_m for feature mixup: (backbone, head), or (tail, head) when the backbone's trunk
    is cached (`training.trunk.TailNet`)."""
    for first in ("backbone", "tail"):
        if hasattr(model, first) and hasattr(model, "head"):
            return getattr(model, first), model.head
    raise UserError("feature mixup needs a model split into a backbone and a head; use --metrix input or embedding")


class Metrix:
    """Mixup for deep metric learning (Venkataramanan et al. 2022, Metrix slides). Interpolated examples (Venkataramanan et al. 2022, "input mixup
    and manifold mixup"):

        f_λ(x, x') = f(mix_λ(x, x'))                   input mixup
                     f_m(mix_λ(g_m(x), g_m(x')))       feature mixup (g_m = backbone, f_m = head)
                     mix_λ(f(x), f(x'))                embedding mixup (re-normalised to the unit sphere)

    and the loss of an anchor a over the mixed set V(a) = {(f_λ(x, x'), mix_λ(y, y'))} (Venkataramanan et al. 2022, "mixing
    examples and labels"):

        σ⁺( Σ_{(v, y) ∈ V(a)} y ρ⁺(s(a, v)) ) + σ⁻( Σ_{(v, y) ∈ V(a)} (1 − y) ρ⁻(s(a, v)) )

    with the σ±, ρ± of the loss in use (`GenericPairLoss`: contrastive, Contr⁺'s pair part, multi-similarity).
    V(a) leaves out mixtures that contain a itself (a ∉ U(a)). Trainers add `weight` × this mean over anchors to
    the clean loss.
    """

    def __init__(self, mode: str, alpha: float = 2.0, weight: float = 1.0) -> None:
        if mode not in METRIX_MODES[1:]:
            raise UserError(f"metrix mode must be one of {', '.join(METRIX_MODES[1:])}, not {mode!r}")
        self.mode, self.alpha, self.weight = mode, alpha, weight

    def plan(self, labels: torch.Tensor) -> MixPlan:
        return plan_mixes(labels, self.alpha)

    def embed(self, model: nn.Module, x: torch.Tensor, plan: MixPlan) -> tuple[torch.Tensor, torch.Tensor]:
        """(f(x) for the batch, f_λ of every planned pair) with `model` in its current mode."""
        if self.mode == "feature":
            g_m, f_m = split_model(model)
            features = g_m(x)
            return f_m(features), f_m(mix(features, plan))
        clean = model(x)
        if self.mode == "input":
            return clean, model(mix(x, plan))
        return clean, F.normalize(mix(clean, plan), p=2, dim=1)

    @staticmethod
    def pair_loss(loss: GenericPairLoss, sims: torch.Tensor, y: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Mean over rows of σ⁺(Σ y ρ⁺(s)) + σ⁻(Σ (1 − y) ρ⁻(s)) over the valid pairs of each row."""
        w = valid.to(sims.dtype)
        y = y.to(sims.dtype)
        return loss.generic(sims, y * w, (1 - y) * w).mean()

    def symmetric_loss(self, loss: GenericPairLoss, anchors: torch.Tensor, labels: torch.Tensor,
                       mixed: torch.Tensor, plan: MixPlan) -> torch.Tensor:
        """Teacher (and symmetric student): clean anchors a = f(x_a) of the batch against the mixed examples,
        s(a, v) = f(a)·f_λ(x, x'), the mixtures holding a left out."""
        _require_generic(loss)
        labels = torch.as_tensor(labels, device=anchors.device)
        rows = torch.arange(anchors.shape[0], device=anchors.device)[:, None]
        valid = (rows != plan.first[None, :]) & (rows != plan.second[None, :])
        return self.pair_loss(loss, anchors @ mixed.T, soft_labels(labels, plan, labels), valid)

    def asymmetric_loss(self, loss: nn.Module, mixed: torch.Tensor, plan: MixPlan, labels: torch.Tensor,
                        reference: torch.Tensor, reference_labels: torch.Tensor, own_rows: torch.Tensor,
                        targets: torch.Tensor) -> torch.Tensor:
        """AML student: the student is the query side, so the mixed student examples v = f_λ(x, x') are the
        anchors and the frozen teacher's items g(x) (the loss's reference: g of the batch and the mined
        negatives) the compared items, s^asym(v, x) = f_λ·g(x), with y(v, x) = mix_λ(1[y = y_x], 1[y' = y_x]).
        The teacher embeddings of v's own two images (reference rows `own_rows` of first / second) are left out
        of the pairs, as g(a) is left out of P(a); the regression term of Reg and Contr⁺, −s^asym(a, a), becomes
        −sim(f_λ(x, x'), mix_λ(g(x), g(x')) re-normalised): the teacher target mixed by the same λ."""
        labels = torch.as_tensor(labels, device=mixed.device)
        total = mixed.new_zeros(())
        used = False
        if isinstance(loss, GenericPairLoss):
            rows = torch.arange(reference.shape[0], device=mixed.device)[None, :]
            valid = (rows != own_rows[plan.first][:, None]) & (rows != own_rows[plan.second][:, None])
            y = soft_labels(reference_labels, plan, labels).T
            total = total + self.pair_loss(loss, mixed @ reference.T, y, valid)
            used = True
        if isinstance(loss, (RegressionLoss, ContrastivePlusLoss)):
            target = F.normalize(mix(targets, plan), p=2, dim=1).detach()
            total = total - (mixed * target).sum(dim=1).mean()
            used = True
        if not used:
            raise UserError(f"metrix has no form for the {type(loss).__name__}; use reg, contr, contr+ or ms")
        return total


def _require_generic(loss: nn.Module) -> None:
    if not isinstance(loss, GenericPairLoss):
        raise UserError(f"metrix mixes the pairs of a contrastive or multi-similarity loss, not of the "
                        f"{type(loss).__name__}; use contr, contr+ or ms")


# ----------------------------------------------------------------------------------------------- OSM + CAA


class OSMCAA(nn.Module):
    """Online soft mining and class-aware attention (Xinshao Wang, Yang Hua, Elyor Kodirov, Guosheng Hu, Neil M.
    Robertson, "Deep Metric Learning by Online Soft Mining and Class-Aware Attention", AAAI 2019; the poster is
    seed 004): a weighted contrastive loss over every pair of the batch.

    With d_ij = ‖f_i − f_j‖₂ (the poster, "Online Soft Mining"):

        s⁺_ij = exp(−d_ij² / σ_OSM²)        positives: closer positives weigh more
        s⁻_ij = max(0, α − d_ij)            negatives: harder (closer) negatives weigh more

    class-aware attention ("Class-Aware Attention"), with learned class centres c_k:

        a_i = exp(f_iᵀ c_{y_i}) / Σ_{k=1}^{C} exp(f_iᵀ c_k),     a_ij = min(a_i, a_j)

    and the final weight of each pair w⁺_ij = s⁺_ij a_ij, w⁻_ij = s⁻_ij a_ij ("Final Weight of Each Pair").

    `form="paper"` (the default): the poster's contrastive loss L^α_cont = y d² + (1 − y) max(0, α − d)²,
    weighted pair by pair,

        L = Σ_{ij ∈ P} w⁺_ij d_ij² / Σ_P w⁺_ij  +  Σ_{ij ∈ N} w⁻_ij max(0, α − d_ij)² / Σ_N w⁻_ij

    How we read it: the poster gives the per-pair loss and the weights but not how the weighted pairs are
    normalised; we take the weighted mean over the positive pairs plus the weighted mean over the negative pairs
    (each normalised by its total weight, so the scale of the weights does not change the loss). The same α is the
    hinge of the negative term and of its weight s⁻ (one α on the poster).

    `form="legacy"` (the earlier default): the pair terms are those of `training.losses` ℓ_C, ρ⁺(s) = −s
    (= d²/2 − 1 on the unit sphere) and ρ⁻(s) = [s − m]_+ (= ½[α² − d²]_+ for α = √(2 − 2m)), in the same weighted
    means. The two forms differ: ½[α² − d²]_+ = ½(α − d)(α + d) is not max(0, α − d)².

    In both forms `alpha=None` takes α = √(2 − 2m) from the contrastive loss's margin m: the distance at which the
    hinge [s − m]_+ of unit vectors ends (the poster's α is a free parameter). The weights are mining scores:
    computed without gradient, as a miner's output is. P and N are every pair of the loss's reference (soft mining
    replaces hard mining). The centres are trained by the classification term `class_loss` = cross-entropy of
    softmax(f_iᵀ c_k), which the trainers add with weight `caa_weight` (the poster trains its class context vectors
    with a softmax loss).
    """

    def __init__(self, num_classes: int, dim: int, sigma: float = 0.8, alpha: float | None = None,
                 form: str = "paper") -> None:
        super().__init__()
        if num_classes < 2:
            raise UserError(f"class-aware attention needs at least 2 classes, not {num_classes}")
        if form not in ("paper", "legacy"):
            raise UserError(f"OSM + CAA form must be paper or legacy, not {form!r}")
        self.sigma, self.alpha, self.form = float(sigma), alpha, form
        self.centres = nn.Parameter(torch.randn(num_classes, dim) / math.sqrt(dim))

    def logits(self, emb: torch.Tensor) -> torch.Tensor:
        return emb @ self.centres.to(emb.dtype).T

    def attention(self, emb: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """a_i = softmax_k(f_iᵀ c_k) at k = y_i, (N,)."""
        labels = torch.as_tensor(labels, device=emb.device)
        return torch.softmax(self.logits(emb), dim=1).gather(1, labels[:, None]).squeeze(1)

    def class_loss(self, emb: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.logits(emb), torch.as_tensor(labels, device=emb.device))

    def resolved_alpha(self, loss: _ContrastiveForm) -> float:
        return float(self.alpha) if self.alpha is not None else math.sqrt(max(0.0, 2.0 - 2.0 * loss.margin))

    @torch.no_grad()
    def weights(self, anchors: torch.Tensor, labels: torch.Tensor, reference: torch.Tensor,
                reference_labels: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor,
                alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(w⁺, w⁻), each (N, M), zero outside the positive / negative masks."""
        d = torch.cdist(anchors.detach(), reference.detach())
        a = torch.minimum(self.attention(anchors.detach(), labels)[:, None],
                          self.attention(reference.detach(), reference_labels)[None, :])
        w_pos = torch.exp(-d.pow(2) / self.sigma ** 2) * a * positive
        w_neg = F.relu(alpha - d) * a * negative
        return w_pos, w_neg

    def loss(self, base: nn.Module, anchors: torch.Tensor, labels: torch.Tensor, reference: torch.Tensor | None = None,
             reference_labels: torch.Tensor | None = None, self_idx: torch.Tensor | None = None) -> torch.Tensor:
        """The weighted contrastive loss over every pair of (anchors, reference) -- the batch itself when the
        reference is None -- plus Contr⁺'s regression term when `base` is Contr⁺."""
        if not isinstance(base, _ContrastiveForm):
            raise UserError(f"OSM + CAA weights the pairs of a contrastive loss (contr, contr+), not of the "
                            f"{type(base).__name__}")
        pairs = resolve_pairs(anchors, labels, None, reference, reference_labels, self_idx)
        ref_labels = labels if reference is None else reference_labels
        alpha = self.resolved_alpha(base)
        w_pos, w_neg = self.weights(anchors, labels, pairs.reference, ref_labels, pairs.positive, pairs.negative,
                                    alpha)
        w_pos, w_neg = w_pos.to(pairs.sims.dtype), w_neg.to(pairs.sims.dtype)
        if self.form == "paper":  # y d² + (1 − y) max(0, α − d)², d with gradient
            ref = pairs.reference
            d2 = (anchors.pow(2).sum(1)[:, None] + ref.pow(2).sum(1)[None, :] - 2 * pairs.sims).clamp(min=0)
            pos = w_pos * d2
            neg = w_neg * F.relu(alpha - (d2 + 1e-12).sqrt()).pow(2)
        else:
            pos, neg = base.generic_parts(pairs.sims, w_pos, w_neg)
        out = pos.sum() / w_pos.sum().clamp(min=1e-12) + neg.sum() / w_neg.sum().clamp(min=1e-12)
        if isinstance(base, ContrastivePlusLoss):
            out = out - _self_similarity(pairs, "Contr⁺").mean()
        return out


# ---------------------------------------------------------------------------------- intra-batch message passing


class MessagePassing(nn.Module):
    """Intra-batch message passing (Seidenschwarz et al. 2021): the batch is a complete graph whose nodes are
    the embeddings; each layer l updates every node from all nodes (itself included),

        h_i^{(l+1)} = Σ_{n=1}^{N} α_in^l W^l h_n^{(l)}      (Seidenschwarz et al. 2021, "Message Passing Networks")

    with attention weights α_in^l = softmax_n((Q^l h_i)ᵀ(K^l h_n) / √d). After the sum a residual connection and
    a layer norm keep the updates stable over layers (h ← LayerNorm(h + Σ α W h); the seed's MPN is a
    transformer-style attention block). A linear classifier on the final node features is trained with
    cross-entropy ("we can apply cross-entropy loss on updated node feature vectors"), end to end through the
    embedding network. Used during training only: at inference the embedding network alone embeds an image
    ("we do not add any complexity at test time").
    """

    def __init__(self, dim: int, num_classes: int, layers: int = 2) -> None:
        super().__init__()
        if layers < 1:
            raise ValueError(f"message passing needs at least one layer, not {layers}")
        self.query = nn.ModuleList(nn.Linear(dim, dim) for _ in range(layers))
        self.key = nn.ModuleList(nn.Linear(dim, dim) for _ in range(layers))
        self.value = nn.ModuleList(nn.Linear(dim, dim, bias=False) for _ in range(layers))  # W^l
        self.norm = nn.ModuleList(nn.LayerNorm(dim) for _ in range(layers))
        self.classifier = nn.Linear(dim, num_classes)

    def attention(self, h: torch.Tensor, layer: int) -> torch.Tensor:
        """α^l (N, N): row i = the weights node i gives every node n."""
        q, k = self.query[layer](h), self.key[layer](h)
        return torch.softmax(q @ k.T / math.sqrt(h.shape[1]), dim=1)

    def propagate(self, h: torch.Tensor) -> torch.Tensor:
        for layer in range(len(self.value)):
            h = self.norm[layer](h + self.attention(h, layer) @ self.value[layer](h))
        return h

    def forward(self, emb: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of the classifier on the updated node features of the batch."""
        logits = self.classifier(self.propagate(emb.to(self.classifier.weight.dtype)))
        return F.cross_entropy(logits, torch.as_tensor(labels, device=emb.device))


# ----------------------------------------------------------------------------------------------- composition


class TrainingAddOns(nn.Module):
    """The add-ons a config switches on, and the losses they add to a training step.

    `embed(model, x, labels)` -> (embeddings, mixed examples or None, plan or None) replaces `model(x)` in a
    training step; `teacher_loss` / `student_loss` compose the step's loss from the existing loss and the add-ons.
    Parameters (CAA centres, the message-passing network) are initialised from their own seeded generator, so
    switching an add-on on does not change the random stream of the rest of the run.
    """

    def __init__(self, options: AddOnOptions, *, dim: int, num_classes: int, seed: int = 0) -> None:
        super().__init__()
        options.check()
        self.options = options
        self.metrix = Metrix(options.metrix, options.metrix_alpha, options.metrix_weight) \
            if options.metrix != "off" else None
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + 7919)
            self.osm = OSMCAA(num_classes, dim, options.osm_sigma, options.osm_alpha, options.osm_form) \
                if options.osm_caa else None
            self.mpn = MessagePassing(dim, num_classes, options.message_passing) if options.message_passing else None

    def optimizer_group(self, lr: float, weight_decay: float) -> list[dict]:
        """[] or one AdamW group of the add-on parameters, at the head's learning rate."""
        params = [p for p in self.parameters() if p.requires_grad]
        return [{"params": params, "lr": lr, "weight_decay": weight_decay, "name": "addons"}] if params else []

    def embed(self, model: nn.Module, x: torch.Tensor, labels: torch.Tensor):
        if self.metrix is None:
            return model(x), None, None
        plan = self.metrix.plan(labels)
        clean, mixed = self.metrix.embed(model, x, plan)
        return clean, mixed, plan

    def extras(self, emb: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The classification terms: CAA's centre cross-entropy and message passing's cross-entropy."""
        out = emb.new_zeros(())
        if self.osm is not None and self.options.caa_weight:
            out = out + self.options.caa_weight * self.osm.class_loss(emb, labels)
        if self.mpn is not None and self.options.mp_weight:
            out = out + self.options.mp_weight * self.mpn(emb, labels)
        return out

    def teacher_loss(self, criterion: GenericPairLoss, miner, emb: torch.Tensor, labels: torch.Tensor,
                     mixed: torch.Tensor | None = None, plan: MixPlan | None = None) -> torch.Tensor:
        """Symmetric training (the teacher; the heads experiment): the loss with mined negatives (`miner` None: a
        loss that mines nothing, Proxy-Anchor, on the batch and its labels) -- or, with OSM + CAA, weighted over
        every pair of the batch -- plus the Metrix term and the classification terms."""
        if self.osm is not None:
            loss = self.osm.loss(criterion, emb, labels)
        elif miner is None:
            loss = criterion(emb, labels)
        else:
            loss = criterion(emb, labels, miner(emb, labels))
        if self.metrix is not None and self.metrix.weight:
            loss = loss + self.metrix.weight * self.metrix.symmetric_loss(criterion, emb, labels, mixed.float(), plan)
        return loss + self.extras(emb, labels)

    def student_loss(self, objective, emb: torch.Tensor, labels: torch.Tensor, idx: torch.Tensor,
                     teacher_pool: torch.Tensor, pool_labels: torch.Tensor, mixed: torch.Tensor | None = None,
                     plan: MixPlan | None = None) -> torch.Tensor:
        """A student's step: `objective` (training.student.StudentObjective) builds the reference as usual; OSM +
        CAA weights every pair of it (student anchors against the teacher's items, asymmetric; the student's
        batch, symmetric), a_j of a teacher item from its teacher embedding; Metrix adds the mixed student
        examples (`Metrix.asymmetric_loss`, or `symmetric_loss` without the teacher); message passing runs over
        the student's batch with its class labels."""
        kw = objective.reference(emb, labels, idx, teacher_pool, pool_labels)
        if self.osm is not None:
            loss = self.osm.loss(objective.loss, emb, labels, kw.get("reference"), kw.get("reference_labels"),
                                 kw.get("self_idx"))
        else:
            loss = objective.loss(emb, labels, **kw)
        if self.metrix is not None and self.metrix.weight:
            if objective.asymmetric:
                b = emb.shape[0]
                term = self.metrix.asymmetric_loss(objective.loss, mixed.float(), plan, labels, kw["reference"],
                                                   kw["reference_labels"], torch.arange(b, device=emb.device),
                                                   teacher_pool[idx])
            else:
                term = self.metrix.symmetric_loss(objective.loss, emb, labels, mixed.float(), plan)
            loss = loss + self.metrix.weight * term
        return loss + self.extras(emb, labels)

    def check_student_loss(self, name: str, asymmetric: bool) -> None:
        """`UserError` when an add-on has no form for the student's loss."""
        if self.metrix is not None and name not in (("reg", "contr", "contr+", "ms") if asymmetric
                                                   else ("contr", "ms")):
            raise UserError(f"metrix has no form for the {name} loss{'' if asymmetric else ' (symmetric)'}; use "
                            f"{'reg, contr, contr+ or ms' if asymmetric else 'contr or ms'}")
        if self.osm is not None and name not in ("contr", "contr+"):
            raise UserError(f"OSM + CAA weights the pairs of a contrastive loss: use --loss contr or contr+, "
                            f"not {name}")

    def state(self) -> dict:
        return {k: v.detach().cpu().clone() for k, v in self.state_dict().items()}


__all__ = [
    "METRIX_MODES",
    "OSMCAA",
    "AddOnOptions",
    "MessagePassing",
    "Metrix",
    "MixPlan",
    "TrainingAddOns",
    "mix",
    "plan_mixes",
    "soft_labels",
    "split_model",
]
