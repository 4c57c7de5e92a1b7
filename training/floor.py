"""Zero-shot is the floor: a trained teacher is kept only if it beats the untrained, pretrained backbone.

The zero-shot teacher is the same backbone with its pretrained weights and global average pooling (head `gap`,
no parameters, dim = the backbone's channels), at the teacher's preprocessing: the model every fine-tuning must
beat to be worth its cost (docs/results/zero_shot.md). `train teacher` measures it on its validation classes
(carved from the training classes, `training.common.split_train_val`) before the first step, and after training
compares it with the best epoch there (`decide`): the trained model is written only when it is at least as good on
both Recall@1 and mAP and better on one; otherwise the run says so and writes the zero-shot teacher, an ordinary
teacher checkpoint (export, index and train students against it). The evaluation half is never looked at.
"""
from __future__ import annotations

from dataclasses import dataclass

from asymsearch.training.models import EmbeddingNet, create_backbone, create_head


@dataclass(frozen=True)
class Verdict:
    keep: str  # "trained" or "zero-shot"
    zero_shot: dict  # {"recall@1", "map"} on the validation classes
    trained: dict
    reason: str

    def to_dict(self) -> dict:
        return {"kept": self.keep, "zero_shot": self.zero_shot, "trained": self.trained, "reason": self.reason}


def zero_shot_model(backbone: str, pretrained: str) -> tuple[EmbeddingNet, dict]:
    """(the pretrained `backbone` with global average pooling in eval mode, its checkpoint `arch`)."""
    net, channels = create_backbone(backbone, pretrained)
    model = EmbeddingNet(net, create_head("gap", channels, channels), channels).eval()
    return model, {"backbone": backbone, "head": "gap", "dim": channels, "pretrained": pretrained}


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


def format_metrics(m: dict) -> str:
    shown = {k: "n/a" if m.get(k) is None else f"{m[k]:.4f}" for k in ("recall@1", "map")}
    return f"Recall@1 {shown['recall@1']}, mAP {shown['map']}"


__all__ = ["Verdict", "decide", "format_metrics", "zero_shot_model"]
