"""Embedding networks: a backbone (image -> feature map) and a pooling head (feature map -> unit-norm embedding).

Both come from registries: `@register_backbone(name)` / `@register_head(name)` add an entry point, and
`create_backbone(name)` / `create_head(name, ...)` build one. An unknown name raises `UserError` listing the
valid names. Teacher and student are built by the same factory, `build_model(arch)`, from the `arch` dict a
checkpoint records.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from asymsearch.core.errors import UserError

BackboneFactory = Callable[[str | None], nn.Module]
HeadFactory = Callable[[int, int], nn.Module]

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
    """Register `fn(in_channels, dim) -> nn.Module` mapping (N,C,h,w) to (N,dim) L2-normalised embeddings."""
    def deco(fn: HeadFactory) -> HeadFactory:
        if name in HEADS:
            raise ValueError(f"head {name!r} registered twice")
        HEADS[name] = fn
        return fn
    return deco


def _lookup(registry: dict, kind: str, name: str):
    try:
        return registry[name]
    except KeyError:
        raise UserError(f"unknown {kind} {name!r}; choose one of: {', '.join(sorted(registry))}") from None


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
    """Build backbone `name` -> (feature extractor returning (N,C,h,w), C).

    pretrained: None for random initialisation; a torchvision weights name such as "IMAGENET1K_V1" or
    "DEFAULT" (torchvision downloads it when online); or the path of a local .pth state dict of the full
    torchvision model (or of the backbone itself, for the tiny ones).
    """
    module = _lookup(BACKBONES, "backbone", name)(pretrained)
    return module, feature_channels(module)


def create_head(name: str, in_channels: int, dim: int) -> nn.Module:
    if dim < 1:
        raise UserError(f"embedding dimension must be positive, not {dim}")
    return _lookup(HEADS, "head", name)(in_channels, dim)


# ----------------------------------------------------------------------------------------------- pretrained


def _looks_like_path(pretrained: str) -> bool:
    return os.sep in pretrained or "/" in pretrained or Path(pretrained).suffix in (".pth", ".pt", ".bin") \
        or Path(pretrained).exists()


def _load_state_dict_file(path: str) -> dict[str, torch.Tensor]:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"pretrained weights file not found: {p}")
    try:
        sd = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the user's to fix
        raise UserError(f"cannot read pretrained weights {p}: {e.__class__.__name__}: {e}") from None
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise UserError(f"pretrained weights {p} do not hold a state dict")
    return sd


def _load_into(model: nn.Module, sd: dict, source: str) -> None:
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        raise UserError(f"pretrained weights {source} do not fit this model: {' '.join(first[:2])}") from None


def _torchvision(arch: str, pretrained: str | None) -> nn.Module:
    import torchvision

    if pretrained is None:
        return torchvision.models.get_model(arch, weights=None)
    if _looks_like_path(pretrained):
        model = torchvision.models.get_model(arch, weights=None)
        _load_into(model, _load_state_dict_file(pretrained), pretrained)
        return model
    enum = torchvision.models.get_model_weights(arch)
    if pretrained not in enum.__members__:
        raise UserError(f"unknown pretrained weights {pretrained!r} for {arch}; use a path to a .pth state dict "
                        f"or one of: {', '.join(sorted(enum.__members__))}")
    return torchvision.models.get_model(arch, weights=enum[pretrained])


def _resnet(arch: str) -> BackboneFactory:
    def build(pretrained: str | None) -> nn.Module:
        model = _torchvision(arch, pretrained)
        return nn.Sequential(*[m for n, m in model.named_children() if n not in ("avgpool", "fc")])
    return build


def _features(arch: str) -> BackboneFactory:
    def build(pretrained: str | None) -> nn.Module:
        return _torchvision(arch, pretrained).features
    return build


for _arch in ("resnet18", "resnet34", "resnet50", "resnet101"):
    register_backbone(_arch)(_resnet(_arch))
for _arch in ("mobilenet_v3_small", "mobilenet_v3_large", "efficientnet_b0", "efficientnet_b1", "efficientnet_b2",
              "efficientnet_b3"):
    register_backbone(_arch)(_features(_arch))


# ------------------------------------------------------------------------------------------------ tiny CNNs


class TinyCNN(nn.Sequential):
    """Four stages of (3x3 conv stride 2, BN, ReLU, 3x3 conv, BN, ReLU), widths w, 2w, 4w, 8w: output stride 16."""

    def __init__(self, width: int = 32) -> None:
        layers: list[nn.Module] = []
        cin = 3
        for cout in (width, 2 * width, 4 * width, 8 * width):
            layers += [nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(cout),
                       nn.ReLU(inplace=True),
                       nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
            cin = cout
        super().__init__(*layers)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")


def _tiny(width: int) -> BackboneFactory:
    def build(pretrained: str | None) -> nn.Module:
        model = TinyCNN(width)
        if pretrained is not None:
            if not _looks_like_path(pretrained):
                raise UserError(f"the tiny backbones have no published weights; pretrained must be a path to a "
                                f".pth state dict, not {pretrained!r}")
            _load_into(model, _load_state_dict_file(pretrained), pretrained)
        return model
    return build


register_backbone("tiny_cnn")(_tiny(32))
register_backbone("tiny_cnn_narrow")(_tiny(16))


# ---------------------------------------------------------------------------------------------------- heads


class GeM(nn.Module):
    """Generalised-mean pooling: f_c = (mean_{h,w} max(x_chw, eps)^p)^(1/p), with a learnable p (Radenović et al.)."""

    def __init__(self, p: float = 3.0, eps: float = 1e-6) -> None:
        super().__init__()
        self.p = nn.Parameter(torch.full((1,), float(p)))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # mean over the spatial dims (not avg_pool2d with a traced kernel) keeps any input size exportable
        return x.clamp(min=self.eps).pow(self.p).mean(dim=(-2, -1)).pow(1.0 / self.p)


class GeMHead(nn.Module):
    """(N,C,h,w) -> GeM -> Linear(C, dim) -> L2 normalisation -> (N,dim) unit vectors."""

    def __init__(self, in_channels: int, dim: int) -> None:
        super().__init__()
        self.pool = GeM()
        self.proj = nn.Linear(in_channels, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.proj(self.pool(x)), p=2, dim=1)


register_head("gem")(GeMHead)


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


ARCH_KEYS = ("backbone", "head", "dim", "pretrained")


def build_model(arch: dict) -> EmbeddingNet:
    """arch = {"backbone": str, "head": "gem", "dim": int, "pretrained": str | None} -> EmbeddingNet (train mode)."""
    missing = [k for k in ("backbone", "head", "dim") if k not in arch]
    if missing:
        raise UserError(f"model architecture lacks {', '.join(missing)}")
    backbone, channels = create_backbone(arch["backbone"], arch.get("pretrained"))
    dim = int(arch["dim"])
    return EmbeddingNet(backbone, create_head(arch["head"], channels, dim), dim)
