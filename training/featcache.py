"""Frozen-backbone feature maps, computed once and cached on disk.

What `--tune-units` trains on (`training.trunk`: the frozen trunk's maps) and what the comparison experiments
(`experiments/` in the repository) train heads on: the (C,h,w) feature map of every image is computed once
with the serving preprocessing (`core.preprocess.preprocess`) and stored as float16 in `CACHE/<key>.npy`
(with `<key>.json` listing the images), keyed by backbone, weights, preprocessing and the image list (paths,
sizes, modification times). A second run with the same key reads the file instead of running the backbone.
View 0 is the serving preprocessing; view v > 0 is a reproducible augmented view of every image
(`training.data.augmented_view`, drawn from `view_seed(v, image index)`), cached under its own key.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from asymsearch.core.data import ImageItem
from asymsearch.core.manifest import Preprocessing


@dataclass
class FeatureMaps:
    maps: np.ndarray  # (N, C, h, w) float16 (memory-mapped)
    items: list[ImageItem]
    seconds: float  # time spent computing them (0 when read from the cache)
    images_per_s: float | None  # backbone forward throughput when computed in this run


def cache_key(backbone: str, pretrained: str | None, spec: Preprocessing, items: list[ImageItem],
              tail_units: int = 0, view: int = 0) -> str:
    what = {"backbone": backbone, "pretrained": pretrained, "spec": spec.to_dict()}
    if tail_units:  # the trunk's maps (the backbone without its last `tail_units` units)
        what["tail_units"] = tail_units
    if view:  # an augmented view (training.data.augmented_view) rather than the serving preprocessing
        what["view"] = view
    h = hashlib.sha256(json.dumps(what, sort_keys=True).encode())
    for it in items:
        st = os.stat(it.path)
        h.update(f"{it.path}\0{it.label}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:20]


def feature_maps(items: list[ImageItem], backbone: str, pretrained: str | None, spec: Preprocessing,
                 cache_dir: str | os.PathLike, batch_size: int = 32, device: str = "cpu",
                 log=print, tail_units: int = 0, view: int = 0, trunk=None) -> FeatureMaps:
    """(N,C,h,w) feature maps of `items` from the frozen backbone (eval mode), from the cache when present.
    With `tail_units` > 0, the maps of the trunk: the backbone without its last `tail_units` units
    (`training.backbones.split_backbone`), which a caller then trains on top of. `view` > 0: the maps of that
    augmented view of each image instead of its serving preprocessing. `trunk`: a ready module to run instead of
    the one `backbone` + `pretrained` build (those then only name it in the cache key)."""
    import torch

    from asymsearch.core.preprocess import decode_image, load_and_preprocess
    from asymsearch.training.data import augmented_view, view_seed
    from asymsearch.training.models import create_backbone

    def pixels(i: int, item: ImageItem) -> np.ndarray:
        if not view:
            return load_and_preprocess(item.path, spec)
        return augmented_view(decode_image(item.path), spec, seed=view_seed(view, i))

    cache = Path(cache_dir).expanduser()
    cache.mkdir(parents=True, exist_ok=True)
    key = cache_key(backbone, pretrained, spec, items, tail_units, view)
    npy, meta = cache / f"{key}.npy", cache / f"{key}.json"
    if npy.is_file() and meta.is_file():
        log(f"feature maps: cached {npy}")
        return FeatureMaps(np.load(npy, mmap_mode="r"), items, 0.0, None)
    if trunk is not None:
        model = copy.deepcopy(trunk)  # its caller's module keeps its device, mode and memory format
    else:
        model, _ = create_backbone(backbone, pretrained)
        if tail_units:
            from asymsearch.training.backbones import split_backbone
            model = split_backbone(model, tail_units)[0]
    model = model.eval().to(device, memory_format=torch.channels_last)  # 1.4x faster on a CPU for these nets
    out = None
    start = time.perf_counter()
    tmp = cache / f".{key}.{os.getpid()}.tmp.npy"  # concurrent runs computing the same maps each write their own
    from tqdm.auto import tqdm
    bar = tqdm(total=len(items), desc=f"feature maps {backbone}@{spec.crop}{f' view {view}' if view else ''}",
               unit="img", leave=False, dynamic_ncols=True)  # with its ETA: a pass can take minutes on a CPU
    try:
        with torch.no_grad():
            for lo in range(0, len(items), batch_size):
                x = np.stack([pixels(i, it) for i, it in enumerate(items[lo:lo + batch_size], start=lo)])
                x = torch.from_numpy(x).to(device, memory_format=torch.channels_last)
                y = model(x).float().cpu().contiguous().numpy()
                if out is None:
                    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16,
                                                    shape=(len(items), *y.shape[1:]))
                out[lo:lo + len(y)] = y.astype(np.float16)
                bar.update(len(y))
        out.flush()
    except BaseException:  # an unreadable image, Ctrl-C: leave no half-written file behind
        del out
        tmp.unlink(missing_ok=True)
        raise
    finally:
        bar.close()
    seconds = time.perf_counter() - start
    log(f"feature maps {backbone}@{spec.crop}{f' view {view}' if view else ''}: {len(items)} images in "
        f"{seconds:.0f} s, cached in {npy}")
    del out
    os.replace(tmp, npy)
    meta.write_text(json.dumps({"backbone": backbone, "pretrained": pretrained, "spec": spec.to_dict(),
                                "tail_units": tail_units, "view": view,
                                "paths": [str(it.path) for it in items], "seconds": seconds}, indent=1))
    return FeatureMaps(np.load(npy, mmap_mode="r"), items, seconds, len(items) / seconds)
