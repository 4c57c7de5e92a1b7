"""Embedding networks: a backbone (image -> feature map) and a pooling head (feature map -> unit-norm embedding).

Both come from registries (`asymsearch.training.registry`): `@register_backbone(name)` / `@register_head(name)`
add an entry point, and `create_backbone(name)` / `create_head(spec, ...)` build one. An unknown name raises
`UserError` listing the valid names. The entries live in `backbones.py` and `heads.py`. Teacher and student
are built by the same factory, `build_model(arch)`, from the `arch` dict a checkpoint records.

A head is named by a *spec*: its registry name, optionally followed by options, `name:key=value,key=value`
(e.g. `diablo:words=8,select=dimension,attention=pre`). The spec is what checkpoints and manifests record, so
a model's options travel with it.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from asymsearch.core.errors import UserError
from asymsearch.training import backbones as _backbones  # noqa: F401 - registers the backbones
from asymsearch.training import heads as _heads  # noqa: F401 - registers the heads
from asymsearch.training.backbones import IMAGENET, LITE_VARIANTS, backbone_preprocessing  # noqa: F401
from asymsearch.training.heads import GeM, GeMHead  # noqa: F401 - historical import path
from asymsearch.training.registry import (BACKBONES, HEADS, BackboneFactory, HeadFactory,  # noqa: F401
                                          lookup, register_backbone, register_head)

__all__ = ["ARCH_KEYS", "BACKBONES", "HEADS", "IMAGENET", "LITE_VARIANTS", "BackboneFactory", "EmbeddingNet",
           "EnsembleNet", "GeM", "GeMHead", "HeadFactory", "backbone_preprocessing", "build_model", "create_backbone",
           "create_head", "feature_channels", "parse_head_spec", "register_backbone", "register_head"]


@torch.no_grad()
def feature_channels(backbone: nn.Module, size: int = 64) -> int:
    """C of the backbone's (N,C,h,w) output, by one dummy forward in eval mode (the mode is restored)."""
    was_training = backbone.training
    backbone.eval()
    try:
        return int(backbone(torch.zeros(1, 3, size, size)).shape[1])
    finally:
        backbone.train(was_training)


def create_backbone(name: str, pretrained: str | None = None) -> tuple[nn.Module, int]:
    """Build backbone `name` -> (feature extractor returning (N,C,h,w), C). See `backbones` for `pretrained`."""
    module = lookup(BACKBONES, "backbone", name)(pretrained)
    return module, feature_channels(module)


def _parse_value(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def parse_head_spec(spec: str) -> tuple[str, dict]:
    """"name:key=value,key=value" -> (name, {key: value}); values become int, float or bool when they parse."""
    name, _, rest = spec.partition(":")
    options: dict = {}
    for part in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, value = part.partition("=")
        if not eq or not key.strip():
            raise UserError(f"head option {part!r} in {spec!r} is not key=value")
        options[key.strip().replace("-", "_")] = _parse_value(value.strip())
    return name.strip(), options


def create_head(name: str, in_channels: int, dim: int, **options) -> nn.Module:
    """Build head `name` (a spec, see the module doc) mapping (N,in_channels,h,w) to (N,dim) unit vectors."""
    if dim < 1:
        raise UserError(f"embedding dimension must be positive, not {dim}")
    base, spec_options = parse_head_spec(name)
    factory = lookup(HEADS, "head", base)
    options = {**spec_options, **options}
    try:
        return factory(in_channels, dim, **options)
    except TypeError as e:
        if "unexpected keyword" not in str(e):
            raise
        valid = getattr(factory, "OPTIONS", None) or "none"
        raise UserError(f"head {base!r} does not take option(s) {', '.join(sorted(options))}; "
                        f"its options: {valid}") from None


# ------------------------------------------------------------------------------------------------ the model


class EmbeddingNet(nn.Module):
    """Backbone + head: images (N,3,H,W) -> (N,dim) unit-norm float32 embeddings, at any input size."""

    def __init__(self, backbone: nn.Module, head: nn.Module, dim: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.dim = dim

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(images)).float()


class EnsembleNet(nn.Module):
    """An ensemble (`training.ensemble`: a teacher, or a joined student of one): members, each images -> unit-norm
    (N, dim_i), give (N, Σ dim_i) unit-norm embeddings, their concatenation divided by √k."""

    def __init__(self, members: list[nn.Module]) -> None:
        super().__init__()
        if len(members) < 2:
            raise UserError(f"an ensemble has at least 2 members, not {len(members)}")
        self.members = nn.ModuleList(members)
        self.dim = sum(int(m.dim) for m in members)
        self.scale = 1.0 / math.sqrt(len(members))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.cat([m(images) for m in self.members], dim=1) * self.scale


ARCH_KEYS = ("backbone", "head", "dim", "pretrained")


def build_model(arch: dict) -> EmbeddingNet | EnsembleNet:
    """arch = {"backbone": str, "head": spec, "dim": int, "pretrained": str | None} -> EmbeddingNet (train mode);
    an ensemble's arch (`arch["members"]`, see `training.ensemble`) -> EnsembleNet of its members.

    The head is built (and its options checked) before the backbone, so a bad head fails before any weights load.
    """
    if "members" in arch:  # only ever built to load an ensemble checkpoint's weights: no member loads its own
        return EnsembleNet([build_model({**member, "pretrained": None}) for member in arch["members"]])
    missing = [k for k in ("backbone", "head", "dim") if k not in arch]
    if missing:
        raise UserError(f"model architecture lacks {', '.join(missing)}")
    dim = int(arch["dim"])
    lookup(BACKBONES, "backbone", arch["backbone"])
    base, options = parse_head_spec(arch["head"])
    # a head that takes over the backbone's later units (diablo:form=paper) cuts the backbone: its hook checks the
    # options and the backbone's split point here, then cuts the built backbone below (None: not such a head)
    adopt = getattr(lookup(HEADS, "head", base), "adopt_backbone", None)
    if adopt is None or adopt(arch["backbone"], None, dim, **options) is None:
        adopt = None
        create_head(arch["head"], dim, dim)  # validates name and options before any weights load (stand-in C)
    backbone, channels = create_backbone(arch["backbone"], arch.get("pretrained"))
    stages: dict = {}
    if adopt is not None:
        backbone, stages = adopt(arch["backbone"], backbone, dim, **options)
        channels = feature_channels(backbone)
    return EmbeddingNet(backbone, create_head(arch["head"], channels, dim, **stages), dim)
