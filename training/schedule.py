"""Learning-rate schedule and parameter groups for teacher training."""
from __future__ import annotations

import math

import torch
from torch import nn


def warmup_cosine(step: int, total_steps: int, warmup_steps: int, final_fraction: float = 0.0) -> float:
    """Multiplier of the base learning rate at optimiser step `step` (0-based): linear warm-up from 1/(w+1)
    to 1 over `warmup_steps`, then cosine decay from 1 to `final_fraction` at `total_steps`."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    span = max(1, total_steps - warmup_steps)
    t = min(1.0, (step - warmup_steps) / span)
    return final_fraction + (1.0 - final_fraction) * 0.5 * (1.0 + math.cos(math.pi * t))


def make_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int,
                   final_fraction: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR applying `warmup_cosine` to every parameter group (each keeps its own base LR)."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine(step, total_steps, warmup_steps, final_fraction))


def parameter_groups(model: nn.Module, lr: float, backbone_lr: float | None, weight_decay: float) -> list[dict]:
    """Two groups: the pretrained backbone at `backbone_lr` (default lr; 0 freezes it) and the new layers (the
    head) at `lr`. Needs `model.backbone` and `model.head`."""
    backbone_lr = lr if backbone_lr is None else backbone_lr
    groups = [{"params": [p for p in model.head.parameters() if p.requires_grad], "lr": lr,
               "weight_decay": weight_decay, "name": "head"}]
    if backbone_lr > 0:
        groups.append({"params": [p for p in model.backbone.parameters() if p.requires_grad], "lr": backbone_lr,
                       "weight_decay": weight_decay, "name": "backbone"})
    else:
        for p in model.backbone.parameters():
            p.requires_grad_(False)
    return [g for g in groups if g["params"]]
