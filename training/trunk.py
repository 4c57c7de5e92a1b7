"""Partial fine-tuning on a CPU: train only the tail of a pretrained backbone (and the head) on trunk maps
computed once.

`tune_units = N` (an option of `train teacher` and `train student`) splits the backbone into a frozen *trunk*
and a trainable *tail* of its last N units (`training.backbones.split_backbone`: MBConv blocks plus the head
conv for EfficientNet-Lite, top-level children for the sequential backbones). The trunk is run once per
image, in eval mode on the serving preprocessing (centre crop), and its maps are cached on disk
(`training.featcache`, keyed by backbone, weights, preprocessing, split and the image list), so an
epoch costs only the tail, head and loss. Augmentation: a horizontal flip of the trunk map, and with
`trunk_views = K` > 1 each training image also has K − 1 cached augmented views (`training.data.augmented_view`:
the random resized crop and flip of whole-network training, drawn once and reproducibly); every epoch picks one
of the K at random for each image. Extra views cost one trunk pass each, once.
The checkpoint holds the whole model, trunk unchanged, so export, index and serving do not know the difference.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from asymsearch.core.data import ImageItem
from asymsearch.core.errors import UserError
from asymsearch.core.manifest import Preprocessing
from asymsearch.training.backbones import freeze_batch_norm, split_backbone


class TailNet(nn.Module):
    """head(tail(trunk map)): the trainable part of a model whose trunk is frozen and cached. Batch norms of the
    tail keep the pretrained statistics (eval mode) while training: batches of a few classes would skew them."""

    def __init__(self, model: nn.Module, tune_units: int) -> None:
        super().__init__()
        if getattr(model.head, "owns_backbone_units", False):
            raise UserError("tune_units: this head (diablo:form=paper) already holds and trains the backbone's units "
                            "after its split point; train it without --tune-units")
        trunk, self.tail = split_backbone(model.backbone, tune_units)
        for p in trunk.parameters():
            p.requires_grad_(False)
        self.head = model.head
        self.dim = model.dim

    def train(self, mode: bool = True) -> TailNet:
        super().train(mode)
        freeze_batch_norm(self.tail)
        return self

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        return self.head(self.tail(maps))


class MapsDataset(Dataset):
    """(trunk map as float32 tensor, label). `maps` is one (N, C, h, w) array or a list of them, one per view of
    the same N images: each access draws one view at random. With `flip`, the map is also mirrored left-right
    with probability 1/2."""

    def __init__(self, maps: np.ndarray | list[np.ndarray], labels: list[int], flip: bool = False) -> None:
        self.views = list(maps) if isinstance(maps, (list, tuple)) else [maps]
        if not self.views or any(len(m) != len(labels) for m in self.views):
            raise ValueError(f"{[len(m) for m in self.views]} maps for {len(labels)} labels")
        self.labels, self.flip = list(labels), flip

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        view = self.views[int(torch.randint(len(self.views), ())) if len(self.views) > 1 else 0]
        x = torch.from_numpy(np.asarray(view[i], dtype=np.float32))
        if self.flip and torch.rand(()) < 0.5:
            x = x.flip(-1)
        return x, self.labels[i]


def check_trunk_views(tune_units: int, views: int) -> None:
    """Refuse, before anything trains, views that are not positive or extra views without `tune_units`."""
    if views < 1 or (views > 1 and not tune_units):
        raise UserError(f"trunk_views caches views of the trunk for --tune-units: give a tune_units and a value >= 1 "
                        f"(got tune_units {tune_units}, trunk_views {views})")


def trunk_maps(items: list[ImageItem], backbone: str, pretrained: str | None, spec: Preprocessing,
               tune_units: int, cache_dir: str, device: torch.device, log=print, views: int = 1,
               weights: nn.Module | None = None) -> list[np.ndarray]:
    """The (N, C, h, w) trunk maps of `items` (float16, memory-mapped) for each of `views` views (view 0: the
    serving preprocessing; the others augmented), each computed once and cached in `cache_dir`. `weights`: take
    the trunk from this backbone (e.g. a student started from its teacher) instead of `backbone` + `pretrained`;
    the cache is then keyed by the trunk's own weights."""
    from asymsearch.training.featcache import feature_maps

    if not items:
        raise UserError("no images to compute trunk maps of")
    check_trunk_views(tune_units, views)
    with torch.random.fork_rng(devices=[]):  # building the trunk draws random numbers: a cached run must not differ
        trunk = None
        if weights is not None:
            from asymsearch.training.checkpoint import state_dict_id
            trunk = split_backbone(weights, tune_units)[0]
            pretrained = f"weights:{state_dict_id(trunk.state_dict())}"
        return [feature_maps(items, backbone, pretrained, spec, cache_dir, device=str(device), log=log,
                             tail_units=tune_units, view=v, trunk=trunk).maps for v in range(views)]


__all__ = ["MapsDataset", "TailNet", "check_trunk_views", "trunk_maps"]
