"""Weight averaging of fine-tuned models: the uniform model soup (Wortsman et al., "Model soups: averaging
weights of multiple fine-tuned models improves accuracy without increasing inference time", ICML 2022, eq. 1 with
the uniform recipe): θ_soup = (1/k) Σ_i θ_i over k models fine-tuned from the same starting weights.

The soup is one ordinary model (same architecture, same cost at inference), so export, index and serving do not
know the difference. Averaging only works between models that started from the same weights: fine-tuning from a
shared start keeps them in one basin, while two random initialisations of the head are unrelated. Teachers record
their start as (pretrained weights, `init_seed`, else `seed`); `train teacher --init-seed S --seed i` trains the
members. Members whose recorded starts differ are refused.

`interpolate` is WiSE-FT's weight-space ensemble (Wortsman et al., "Robust fine-tuning of zero-shot models",
CVPR 2022, eq. 1): θ_α = (1 − α)·θ_zero-shot + α·θ_fine-tuned, between a model and the zero-shot model it was
fine-tuned from (`training.floor`: the teacher's floor chooses α on validation classes).
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from asymsearch.core.errors import UserError
from asymsearch.core.manifest import Preprocessing
from asymsearch.training.checkpoint import load_members, make_checkpoint, model_from_checkpoint, save_checkpoint


def starting_point(ckpt: dict) -> tuple:
    """What a checkpoint's training started from, as far as its config says: (pretrained, initialisation seed)."""
    cfg = ckpt["config"]
    init = cfg.get("init_seed")
    return ckpt["arch"].get("pretrained"), cfg.get("seed") if init is None else init


def average_checkpoints(paths: list[str | os.PathLike], out: str | os.PathLike) -> Path:
    """Write the uniform soup of the teacher checkpoints at `paths` to `out` and return its path. The members must
    share architecture, preprocessing and starting point; anything else is a `UserError`."""
    # a student's start (its seed, or its teacher) is not recorded the same way: teachers only
    members = load_members(paths, role="teacher", shared=("arch", "preprocessing"), joins="a soup averages")
    first = members[0]
    starts = [starting_point(c) for c in members]
    if len(set(starts)) > 1:
        raise UserError("the checkpoints did not start from the same weights (pretrained, init seed: "
                        f"{', '.join(map(str, starts))}); train the members with the same --init-seed")
    state = {}
    for key, value in first["state_dict"].items():
        if value.is_floating_point():
            state[key] = torch.stack([c["state_dict"][key].double() for c in members]).mean(0).to(value.dtype)
        else:  # counters (batch norm's num_batches_tracked): the first member's
            state[key] = value.clone()
    model = model_from_checkpoint({**first, "state_dict": state})
    config = {**first["config"], "seed": None,
              "soup": [{"path": str(p), "model_id": c["model_id"], "seed": c["config"].get("seed")}
                       for p, c in zip(paths, members)]}
    ckpt = make_checkpoint(model, role="teacher", arch=first["arch"],
                           preprocessing=Preprocessing.from_dict(first["preprocessing"]), config=config)
    return save_checkpoint(ckpt, out)


def interpolate(start: dict, end: dict, alpha: float) -> dict:
    """WiSE-FT: the state dict (1 - alpha) * start + alpha * end, tensor by tensor (computed in float64, cast back);
    non-floating tensors (counters) are end's. The two must have the same keys and shapes."""
    if set(start) != set(end):
        raise ValueError(f"the two models differ in their weights: {sorted(set(start) ^ set(end))[:3]}")
    out = {}
    for key, value in end.items():
        if value.is_floating_point():
            if start[key].shape != value.shape:
                raise ValueError(f"{key}: shapes {tuple(start[key].shape)} and {tuple(value.shape)} differ")
            mixed = (1.0 - alpha) * start[key].double().to(value.device) + alpha * value.double()
            out[key] = mixed.to(value.dtype)
        else:
            out[key] = value.clone()
    return out


__all__ = ["average_checkpoints", "interpolate", "starting_point"]
