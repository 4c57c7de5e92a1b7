"""Arrays computed once and kept on disk: the teacher's embeddings of the training set (and, for experiments,
frozen backbones' feature maps), keyed by everything they depend on, so they are never stale.

A cache entry is one `.npz` file holding the array and the JSON key it was computed for. The key names the model
(the teacher id, i.e. the content hash of its weights), the preprocessing, the augmentation (none: the cached
view is the serving preprocessing) and every input image (path, size, modification time). The file name holds
a hash of the key; on load the stored key must equal the wanted one, otherwise the array is recomputed and the
file replaced (written to a temporary file, then renamed). A teacher checkpoint with another id, an edited
image, another image size: all give another key, hence a recomputation.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from asymsearch.core.data import ImageItem
from asymsearch.core.manifest import Preprocessing
from asymsearch.training.common import embed_dataset

CACHE_FORMAT = 1


def items_fingerprint(items: Sequence[ImageItem]) -> str:
    """sha256 over (path, label, size, mtime) of every image, in order."""
    h = hashlib.sha256()
    for item in items:
        st = os.stat(item.path)
        h.update(f"{item.path}|{item.label}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def key_digest(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]


def cached_array(cache_dir: str | os.PathLike, prefix: str, key: dict, compute: Callable[[], np.ndarray], *,
                 log: Callable[[str], None] | None = None) -> np.ndarray:
    """The array stored under `key` in `cache_dir`, or `compute()` saved there (when the key differs or the
    file is missing or unreadable)."""
    key = {"format": CACHE_FORMAT, **key}
    path = Path(cache_dir) / f"{prefix}-{key_digest(key)}.npz"
    wanted = json.dumps(key, sort_keys=True)
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as f:
                if str(f["key"]) == wanted:
                    if log:
                        log(f"cache hit: {path}")
                    return f["array"]
        except (OSError, ValueError, KeyError):
            pass  # damaged or foreign file: recompute below
    array = np.asarray(compute())
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            np.savez(f, array=array, key=np.asarray(wanted))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    if log:
        log(f"cached: {path}")
    return array


def teacher_embeddings(teacher: torch.nn.Module, teacher_id: str, preprocessing: Preprocessing,
                       items: Sequence[ImageItem], dataset, cache_dir: str | os.PathLike, device: torch.device, *,
                       workers: int = 0, batch_size: int = 64,
                       log: Callable[[str], None] | None = None) -> np.ndarray:
    """(len(items), dim) float32: the frozen teacher's embeddings of `dataset` (whose i-th image is `items[i]`,
    prepared with `preprocessing`, no augmentation), from the cache when the teacher id, the preprocessing and
    the images are those it was computed for."""
    key = {"kind": "teacher-embeddings", "teacher_id": teacher_id, "preprocessing": preprocessing.to_dict(),
           "augmentation": "none", "items": items_fingerprint(items), "count": len(items)}

    def compute() -> np.ndarray:
        return embed_dataset(teacher, dataset, device, workers, batch_size, progress="teacher embeddings")

    return cached_array(cache_dir, f"teacher-{teacher_id}", key, compute, log=log)
