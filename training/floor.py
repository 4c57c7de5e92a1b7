"""Zero-shot is the floor: a trained teacher is kept only if it beats the untrained, pretrained backbone.

The zero-shot teacher is the same backbone with its pretrained weights and global average pooling (head `gap`,
no parameters, dim = the backbone's channels), at the teacher's preprocessing: the model every fine-tuning must
beat to be worth its cost (docs/results/zero_shot.md). `train teacher` measures it on its validation classes
(carved from the training classes, `training.common.split_train_val`) before the first step, and after training
compares it with the best epoch there (`decide`): the trained model is written only when it is at least as good on
both Recall@1 and mAP and better on one; otherwise the run says so and writes the zero-shot teacher, an ordinary
teacher checkpoint (export, index and train students against it). The evaluation half is never looked at.

When the model started as the zero-shot one (head `gem:init=zero-shot`: average pooling and the identity
projection before training), the candidates are also the WiSE-FT interpolations between the two (Wortsman et
al., CVPR 2022; `training.soup.interpolate`) at `WISE_ALPHAS`, and `choose` keeps the one whose smaller gain over
zero-shot (of Recall@1 and mAP) is largest on the validation classes: a fine-tuned model that has drifted from the
pretrained features on classes it never saw is pulled back towards them by as much as validation says.
"""
from __future__ import annotations

from dataclasses import dataclass

from asymsearch.training.models import EmbeddingNet, create_backbone, create_head


# the WiSE-FT mixing weights tried between a zero-shot start (alpha 0) and the fine-tuned model (alpha 1)
WISE_ALPHAS = (0.25, 0.5, 0.75, 1.0)


@dataclass(frozen=True)
class Verdict:
    keep: str  # "trained" or "zero-shot"
    zero_shot: dict  # {"recall@1", "map"} on the validation classes
    trained: dict
    reason: str
    alpha: float | None = None  # WiSE-FT: the mixing weight of the kept model (1: the fine-tuned one as it is)
    candidates: dict | None = None  # WiSE-FT: {alpha: {"recall@1", "map"}} on the validation classes

    def to_dict(self) -> dict:
        out = {"kept": self.keep, "zero_shot": self.zero_shot, "trained": self.trained, "reason": self.reason}
        if self.candidates is not None:
            out.update(alpha=self.alpha, candidates={str(a): m for a, m in self.candidates.items()})
        return out


def zero_shot_model(backbone: str, pretrained: str) -> tuple[EmbeddingNet, dict]:
    """(the pretrained `backbone` with global average pooling in eval mode, its checkpoint `arch`)."""
    net, channels = create_backbone(backbone, pretrained)
    model = EmbeddingNet(net, create_head("gap", channels, channels), channels).eval()
    return model, {"backbone": backbone, "head": "gap", "dim": channels, "pretrained": pretrained}


def starts_zero_shot(head: str) -> bool:
    """Whether a model with head spec `head` (and pretrained weights) is, untrained, the zero-shot model: then the
    floor also tries the WiSE-FT interpolations between the two."""
    from asymsearch.training.models import parse_head_spec
    name, options = parse_head_spec(head)
    return name == "gem" and options.get("init") == "zero-shot"


def decide(zero_shot: dict, trained: dict) -> Verdict:
    """Keep the trained model iff it is >= the zero-shot one on validation Recall@1 and mAP and > on one of them
    (a missing trained mAP counts as not better)."""
    z = {k: float(zero_shot[k]) for k in ("recall@1", "map")}
    t = {k: (None if trained.get(k) is None else float(trained[k])) for k in ("recall@1", "map")}
    worse = [k for k in z if t[k] is None or t[k] < z[k]]
    if not worse and any(t[k] > z[k] for k in z):
        return Verdict("trained", z, t, "beats the zero-shot model on the validation classes")
    if worse:
        shown = ", ".join(f"{k} {t[k] if t[k] is None else round(t[k], 4)} < {z[k]:.4f}" for k in worse)
        return Verdict("zero-shot", z, t, f"training did not beat the zero-shot model on the validation classes "
                                          f"({shown})")
    return Verdict("zero-shot", z, t, "training only tied the zero-shot model on the validation classes")


def choose(zero_shot: dict, candidates: dict) -> Verdict:
    """WiSE-FT's choice: among `candidates` ({alpha: {"recall@1", "map"}} on validation) those that `decide` would
    keep against `zero_shot`, the one with the largest min(ΔRecall@1, ΔmAP) over zero-shot, then the largest sum,
    then the largest alpha; none: the zero-shot model (`Verdict.keep` "zero-shot")."""
    z = {k: float(zero_shot[k]) for k in ("recall@1", "map")}
    cands = {float(a): {k: (None if m.get(k) is None else float(m[k])) for k in ("recall@1", "map")}
             for a, m in candidates.items()}
    kept = [a for a, m in cands.items() if decide(z, m).keep == "trained"]
    if not kept:
        top = max(cands)
        v = decide(z, cands[top])
        return Verdict("zero-shot", z, cands[top], v.reason.replace("training", "no interpolation of the trained "
                                                                   "and zero-shot weights"), None, cands)

    def gains(a):
        d = [cands[a][k] - z[k] for k in ("recall@1", "map")]
        return min(d), sum(d), a
    best = max(kept, key=gains)
    return Verdict("trained", z, cands[best], f"WiSE-FT alpha {best:g} beats the zero-shot model on the validation "
                                             f"classes by the most on its weaker metric", best, cands)


def format_metrics(m: dict) -> str:
    shown = {k: "n/a" if m.get(k) is None else f"{m[k]:.4f}" for k in ("recall@1", "map")}
    return f"Recall@1 {shown['recall@1']}, mAP {shown['map']}"


__all__ = ["WISE_ALPHAS", "Verdict", "choose", "decide", "starts_zero_shot", "format_metrics", "zero_shot_model"]
