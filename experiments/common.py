"""What the experiments share: a head trained on cached feature maps through the product's one training loop
(`asymsearch.training.engine.Engine`), the maps' batches, and the embedding of cached maps."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(kw_only=True)
class MapsExperimentConfig:
    """The options every experiment that trains heads on a frozen backbone's cached maps shares (heads, addons):
    the data and backbone, the seeds, the training of each head, the cache and the parallel jobs."""

    data: str
    out: str = "docs/results/experiment"  # writes OUT.md and OUT.json
    backbone: str = "efficientnet_lite0"
    pretrained: str = "imagenet"
    image_size: int | None = None  # None: the backbone's own size
    seeds: tuple = (0, 1, 2)
    dim: int = 512
    epochs: int = 4
    classes_per_batch: int = 8
    per_class: int = 4
    lr: float = 1e-4
    weight_decay: float = 1e-4
    warmup_epochs: float = 1.0
    margin: float = 0.5
    num_negatives: int = 5
    val_fraction: float = 0.2
    flip: bool = True
    cache_dir: str = "~/.cache/asymsearch/featmaps"
    threads: int = 1  # torch threads per job
    jobs: int = 1  # runs trained in parallel processes
    command: str = ""
    results: list = field(default_factory=list)


class MapBatches:
    """The batches of `sampler` (m-per-class index lists) as (maps, labels, rows) tensors, re-iterable; rows are
    read from the (memory-mapped) maps in index order and put back in the sampler's. With `flip_generator`, each
    map is mirrored left-right with probability 1/2, drawn from that generator."""

    def __init__(self, sampler, maps: np.ndarray, labels, flip_generator=None) -> None:
        import torch

        self.sampler, self.maps, self.flip = sampler, maps, flip_generator
        self.labels = torch.as_tensor(labels)

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self):
        import torch

        for batch in self.sampler:
            x = torch.from_numpy(np.asarray(self.maps[np.sort(batch)], np.float32))
            x = x[torch.as_tensor(np.argsort(np.argsort(batch)))]  # rows back in the sampler's order
            if self.flip is not None:
                flip = torch.rand(len(x), generator=self.flip) < 0.5
                x = torch.where(flip[:, None, None, None], x.flip(-1), x)
            idx = torch.as_tensor(batch)
            yield x, self.labels[idx], idx


def embed_maps(head, maps: np.ndarray, batch: int = 128) -> np.ndarray:
    """(N, dim) float32 embeddings of cached maps by `head` in eval mode."""
    import torch

    head.eval()
    out = []
    with torch.no_grad():
        for lo in range(0, len(maps), batch):
            out.append(head(torch.from_numpy(np.asarray(maps[lo:lo + batch], np.float32))).numpy())
    return np.concatenate(out).astype(np.float32)


def train_on_maps(head, objective, maps: np.ndarray, labels: list[int], *, per_class: int, classes_per_batch: int,
                  epochs: int, lr: float, weight_decay: float, warmup_epochs: float, seed: int, validate,
                  addons=None, handlers=(), flip: bool = False, report=None, extra_groups=()) -> list[dict]:
    """Train `head` on the cached `maps` with `objective` (`Step` -> loss) through the product's training loop:
    m-per-class batches, AdamW (`addons`' parameters in their own group), warm-up + cosine schedule, `validate()`
    after each epoch (a Recall@1 or None), the best epoch's weights restored into `head` at the end; `extra_groups`:
    more AdamW groups (a loss's own parameters, `training.registry.loss_parameter_groups`). Returns the per-epoch
    history."""
    import torch

    from asymsearch.training.data import MPerClassSampler
    from asymsearch.training.engine import Engine
    from asymsearch.training.schedule import make_scheduler

    sampler = MPerClassSampler(labels, per_class, classes_per_batch, seed=seed)
    groups = [{"params": list(head.parameters())}]
    if addons is not None:
        groups += addons.optimizer_group(lr, weight_decay)
    groups += list(extra_groups)
    optimizer = torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)
    scheduler = make_scheduler(optimizer, epochs * len(sampler), int(warmup_epochs * len(sampler)))
    gen = torch.Generator().manual_seed(seed) if flip else None
    engine = Engine(model=head, objective=objective, optimizer=optimizer, scheduler=scheduler,
                    loader=MapBatches(sampler, maps, labels, gen), sampler=sampler, addons=addons,
                    handlers=handlers, validate=validate, progress=False, report=report)
    history = engine.run(epochs)
    engine.restore_best()
    return history


@dataclass
class CachedMaps:
    """The data of a maps experiment: the frozen backbone's cached maps of the first half of the classes (minus
    the validation classes: fit) and of the second half (eval), with their labels."""

    size: int
    spec: object  # core.manifest.Preprocessing of the maps
    pretrained: str | None
    items: list
    labels: np.ndarray  # (N,) class index of every item
    cls_index: dict
    features: object  # training.featcache.FeatureMaps
    classes: dict  # "fit" / "val" / "eval" -> class names
    fit: tuple  # (maps, labels)
    val: tuple
    eval: tuple

    @property
    def maps(self) -> np.ndarray:
        return self.features.maps

    @property
    def channels(self) -> int:
        return self.maps.shape[1]

    def split(self) -> dict:
        """The sizes a results table states."""
        return {"train": len(self.fit[1]), "val": len(self.val[1]), "eval": len(self.eval[1]),
                "train_classes": len(self.classes["fit"]), "val_classes": len(self.classes["val"]),
                "eval_classes": len(self.classes["eval"])}


def cache_maps(cfg: MapsExperimentConfig, log=print) -> CachedMaps:
    """Compute (or find cached) the maps of `cfg`'s backbone at its size for every image, split as the protocol
    says: the first half of the classes trains (`val_fraction` of them held out), the second half evaluates."""
    from asymsearch.core.data import list_image_folder, select_classes
    from asymsearch.core.manifest import Preprocessing
    from asymsearch.training.common import split_train_val
    from asymsearch.training.featcache import feature_maps
    from asymsearch.training.models import backbone_preprocessing

    pre = backbone_preprocessing(cfg.backbone)
    size = cfg.image_size or pre["image_size"]
    spec = Preprocessing(resize=size, crop=size, mean=tuple(pre["mean"]), std=tuple(pre["std"]))
    train_classes, eval_classes = select_classes(cfg.data, "first-half"), select_classes(cfg.data, "second-half")
    fit_classes, val_classes = split_train_val(train_classes, cfg.val_fraction)
    items = list_image_folder(cfg.data, train_classes + eval_classes)
    pretrained = None if str(cfg.pretrained).lower() in ("", "none") else cfg.pretrained
    features = feature_maps(items, cfg.backbone, pretrained, spec, cfg.cache_dir, log=log)
    maps = features.maps
    cls_index = {c: i for i, c in enumerate(train_classes + eval_classes)}
    labels = np.array([cls_index[it.label] for it in items])

    def subset(classes):
        keep = {cls_index[c] for c in classes}
        idx = np.array([i for i in range(len(items)) if labels[i] in keep])
        return np.asarray(maps[idx]) if len(idx) else maps[:0], labels[idx].tolist()

    out = CachedMaps(size, spec, pretrained, items, labels, cls_index, features,
                     {"fit": fit_classes, "val": val_classes, "eval": eval_classes},
                     subset(fit_classes), subset(val_classes), subset(eval_classes))
    log(f"maps {tuple(maps.shape[1:])}: train {len(out.fit[1])} / val {len(out.val[1])} / eval {len(out.eval[1])}")
    return out
