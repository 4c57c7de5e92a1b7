"""Frozen-backbone feature maps, computed once and cached on disk.

Heads are compared on a frozen pretrained backbone: its (C,h,w) feature map of every image is computed once
with the serving preprocessing (`core.preprocess.preprocess`) and stored as float16 in `CACHE/<key>.npy`
(with `<key>.json` listing the images), keyed by backbone, weights, preprocessing and the image list (paths,
sizes, modification times). A second run with the same key reads the file instead of running the backbone.
"""
from __future__ import annotations

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
              tail_units: int = 0) -> str:
    what = {"backbone": backbone, "pretrained": pretrained, "spec": spec.to_dict()}
    if tail_units:  # the trunk's maps (the backbone without its last `tail_units` units)
        what["tail_units"] = tail_units
    h = hashlib.sha256(json.dumps(what, sort_keys=True).encode())
    for it in items:
        st = os.stat(it.path)
        h.update(f"{it.path}\0{it.label}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:20]


def feature_maps(items: list[ImageItem], backbone: str, pretrained: str | None, spec: Preprocessing,
                 cache_dir: str | os.PathLike, batch_size: int = 32, device: str = "cpu",
                 log=print, tail_units: int = 0) -> FeatureMaps:
    """(N,C,h,w) feature maps of `items` from the frozen backbone (eval mode), from the cache when present.
    With `tail_units` > 0, the maps of the trunk: the backbone without its last `tail_units` units
    (`training.backbones.split_backbone`), which a caller then trains on top of."""
    import torch

    from asymsearch.core.preprocess import load_and_preprocess
    from asymsearch.training.models import create_backbone

    cache = Path(cache_dir).expanduser()
    cache.mkdir(parents=True, exist_ok=True)
    key = cache_key(backbone, pretrained, spec, items, tail_units)
    npy, meta = cache / f"{key}.npy", cache / f"{key}.json"
    if npy.is_file() and meta.is_file():
        log(f"feature maps: cached {npy}")
        return FeatureMaps(np.load(npy, mmap_mode="r"), items, 0.0, None)
    model, _ = create_backbone(backbone, pretrained)
    if tail_units:
        from asymsearch.training.backbones import split_backbone
        model = split_backbone(model, tail_units)[0]
    model = model.eval().to(device)
    out = None
    start = time.perf_counter()
    with torch.no_grad():
        for lo in range(0, len(items), batch_size):
            x = np.stack([load_and_preprocess(it.path, spec) for it in items[lo:lo + batch_size]])
            y = model(torch.from_numpy(x).to(device)).float().cpu().numpy()
            if out is None:
                tmp = cache / f".{key}.tmp.npy"
                out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=(len(items), *y.shape[1:]))
            out[lo:lo + len(y)] = y.astype(np.float16)
            if (lo // batch_size) % 20 == 0:
                log(f"feature maps {backbone}@{spec.crop}: {lo + len(y)}/{len(items)}")
    seconds = time.perf_counter() - start
    out.flush()
    del out
    os.replace(cache / f".{key}.tmp.npy", npy)
    meta.write_text(json.dumps({"backbone": backbone, "pretrained": pretrained, "spec": spec.to_dict(),
                                "tail_units": tail_units,
                                "paths": [str(it.path) for it in items], "seconds": seconds}, indent=1))
    return FeatureMaps(np.load(npy, mmap_mode="r"), items, seconds, len(items) / seconds)
