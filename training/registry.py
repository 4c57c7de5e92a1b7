"""The two registries behind `asymsearch.training.models`: backbones (image -> feature map) and pooling heads
(feature map -> unit-norm embedding). Kept apart from the entries so that `backbones.py` and `heads.py` can
register into them without importing `models.py`.
"""
from __future__ import annotations

from typing import Callable

from torch import nn

from asymsearch.core.errors import UserError

BackboneFactory = Callable[[str | None], nn.Module]
HeadFactory = Callable[..., nn.Module]  # (in_channels, dim, **options) -> nn.Module

BACKBONES: dict[str, BackboneFactory] = {}
HEADS: dict[str, HeadFactory] = {}


def register_backbone(name: str) -> Callable[[BackboneFactory], BackboneFactory]:
    """Register `fn(pretrained) -> nn.Module` (a module mapping (N,3,H,W) images to an (N,C,h,w) feature map)."""
    def deco(fn: BackboneFactory) -> BackboneFactory:
        if name in BACKBONES:
            raise ValueError(f"backbone {name!r} registered twice")
        BACKBONES[name] = fn
        return fn
    return deco


def register_head(name: str) -> Callable[[HeadFactory], HeadFactory]:
    """Register `fn(in_channels, dim, **options) -> nn.Module` mapping (N,C,h,w) to (N,dim) unit vectors."""
    def deco(fn: HeadFactory) -> HeadFactory:
        if name in HEADS:
            raise ValueError(f"head {name!r} registered twice")
        HEADS[name] = fn
        return fn
    return deco


def lookup(registry: dict, kind: str, name: str):
    try:
        return registry[name]
    except KeyError:
        raise UserError(f"unknown {kind} {name!r}; choose one of: {', '.join(sorted(registry))}") from None
