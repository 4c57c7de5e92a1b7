"""The registries of the pluggable pieces: backbones (image -> feature map) and pooling heads (feature map ->
unit-norm embedding) behind `asymsearch.training.models`, and the losses the trainers are given by name. Kept apart
from the entries so that `backbones.py`, `heads.py`, `losses.py` and `proxies.py` can register into them without
importing each other or the trainers.
"""
from __future__ import annotations

from dataclasses import dataclass, field
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


# ---------------------------------------------------------------------------------------------------- losses

ROLES = ("teacher", "student")


@dataclass(frozen=True)
class LossEntry:
    """A registered loss: `factory(**hyper-parameters)` builds the `nn.Module`.

    `options` maps each keyword of the factory to the training-config field that gives it (`margin` <- `margin`,
    `alpha` <- `ms_alpha`), so a trainer builds any loss from its config alone. `roles`: which trainers take it.
    `per_class`: the loss learns per-class parameters (Proxy-Anchor's proxies) and takes `num_classes` and `dim`;
    `lr_option` names the config field of their learning rate (they train beside the model, in their own
    optimiser group without weight decay). `check(**hyper-parameters)`: raises `UserError` for values the loss
    cannot take (ArcFace's margin outside (0, π/2)); `check_loss_config` runs it before a trainer reads any data."""

    name: str
    factory: Callable[..., nn.Module]
    options: dict = field(default_factory=dict)
    roles: tuple[str, ...] = ("student",)
    per_class: bool = False
    lr_option: str | None = None
    check: Callable | None = None


LOSS_REGISTRY: dict[str, LossEntry] = {}


def register_loss(name: str, *, options: dict | None = None, roles: tuple[str, ...] = ("student",),
                  per_class: bool = False, lr_option: str | None = None, check: Callable | None = None) -> Callable:
    """Register a loss factory (a class or function returning an `nn.Module`) under `name` for `roles`."""
    if not set(roles) <= set(ROLES):
        raise ValueError(f"roles must be among {ROLES}, not {roles}")

    def deco(factory):
        if name in LOSS_REGISTRY:
            raise ValueError(f"loss {name!r} registered twice")
        LOSS_REGISTRY[name] = LossEntry(name, factory, dict(options or {}), tuple(roles), per_class, lr_option,
                                        check)
        return factory
    return deco


def loss_names(role: str) -> tuple[str, ...]:
    """The losses a `role` trainer takes, in registration order."""
    return tuple(n for n, e in LOSS_REGISTRY.items() if role in e.roles)


def loss_entry(name: str, role: str) -> LossEntry:
    """The entry of loss `name`; `UserError` listing the valid names when a `role` trainer does not take it."""
    names = loss_names(role)
    if name not in names:
        raise UserError(f"unknown {role} loss {name!r}; choose one of: {', '.join(names)}")
    return LOSS_REGISTRY[name]


def loss_options(name: str, config, role: str = "student") -> dict:
    """The hyper-parameters of loss `name` taken from a training config (the fields its entry names)."""
    return {kw: getattr(config, key) for kw, key in loss_entry(name, role).options.items()}


def check_loss_config(name: str, config, role: str = "student") -> None:
    """`UserError` (one line) when loss `name` cannot take the hyper-parameters `config` gives it; nothing trains."""
    entry = loss_entry(name, role)
    if entry.check is not None:
        entry.check(**loss_options(name, config, role))


def create_loss(name: str, config=None, *, role: str = "student", num_classes: int | None = None,
                dim: int | None = None, **kwargs) -> nn.Module:
    """Loss `name` for a `role` trainer: its hyper-parameters from `config` (when given), then `kwargs`; a loss with
    per-class parameters also gets `num_classes` and `dim` (the others ignore them). An unknown name raises
    `UserError` listing the valid ones."""
    entry = loss_entry(name, role)
    options = loss_options(name, config, role) if config is not None else {}
    if entry.per_class:
        options.update(num_classes=num_classes, dim=dim)
    return entry.factory(**{**options, **kwargs})


def loss_parameter_groups(name: str, loss: nn.Module, config, role: str = "teacher") -> list[dict]:
    """[] or the AdamW group of the loss's own parameters (Proxy-Anchor's proxies) at its config's learning rate."""
    entry = loss_entry(name, role)
    params = [p for p in loss.parameters() if p.requires_grad]
    if not params:
        return []
    lr = getattr(config, entry.lr_option) if entry.lr_option else config.lr
    return [{"params": params, "lr": lr, "weight_decay": 0.0, "name": "proxies"}]
