"""Backward-compatible teacher training: a new teacher that stays in the space of the old one.

Shen, Xiong, Xia, Soatto, "Towards Backward-Compatible Representation Learning", CVPR 2020 (BCT): the new
embedding φ_new trains with its own objective plus an *influence loss* that passes its embeddings through the old
model's classifier w_old, kept frozen,

    L(φ_new) = L_new(φ_new) + λ · L_old(w_old, φ_new),   L_old = cross-entropy(s · w_old φ_new(x), y),

so that new embeddings land where the old classifier expects each class, and new queries can search a gallery the
old model embedded ("new-to-old" retrieval) while the gallery is re-embedded in the background. Our teachers train
with pair or proxy losses and export no classifier, so w_old is BCT's *synthesised classifier* (its section 3.3, for
classes the old model never saw): the normalised mean of the old model's embeddings of each class's training images.
The logits are cosines scaled by s (`compat_scale`; the embeddings are unit vectors).

An optional second term, `compat_regression` · mean ‖φ_new(x) − φ_old(x)‖², regresses each image onto the old
teacher's embedding of the same image (the serving view, as the students of `training.student` do): a tighter tie,
per image rather than per class.

The old teacher runs frozen, once: `old_embeddings` embeds the training images with OLD_TEACHER.onnx (onnxruntime,
the serving preprocessing) and caches them (`training.teacher_cache.cached_array`, keyed by the old teacher id and
the images). `--compatible-with` names the old teacher's ONNX file or an index it embedded (whose manifest names the
ONNX file and its sha256). The new teacher's checkpoint records the old teacher id (`config.compatible_with_teacher`);
`asymsearch export` copies it into the manifest's `extra.compatible_with`, which the pairing contract reads
(`core.manifest.check_pairing`).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from asymsearch.core.data import ImageItem
from asymsearch.core.errors import UserError
from asymsearch.training.engine import Handler, Step


class InfluenceLoss(nn.Module):
    """BCT's influence loss: cross-entropy of `scale` · w_old · φ_new(x) against the label, w_old (C, d) frozen
    (a buffer: it never trains). `forward(emb (N, d), labels (N,))`."""

    def __init__(self, old_classifier: torch.Tensor, scale: float = 16.0) -> None:
        super().__init__()
        if scale <= 0:
            raise UserError(f"compat_scale must be positive, not {scale}")
        self.register_buffer("weight", old_classifier.detach().float().clone())
        self.scale = float(scale)

    def forward(self, emb: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.scale * emb @ self.weight.t(), labels)


def regression_loss(emb: torch.Tensor, old_emb: torch.Tensor) -> torch.Tensor:
    """mean over the batch of ‖φ_new(x) − φ_old(x)‖²."""
    return (emb - old_emb).pow(2).sum(dim=1).mean()


def synthesized_classifier(old_emb: np.ndarray | torch.Tensor, labels: Sequence[int], num_classes: int) -> torch.Tensor:
    """(num_classes, d): the L2-normalised mean old embedding of each class (BCT's synthesised classifier). Every
    class needs at least one image."""
    old = torch.as_tensor(np.asarray(old_emb), dtype=torch.float32)
    y = torch.as_tensor(list(labels), dtype=torch.long)
    if len(y) != len(old):
        raise ValueError(f"{len(old)} old embeddings for {len(y)} labels")
    sums = torch.zeros(num_classes, old.shape[1]).index_add_(0, y, old)
    counts = torch.bincount(y, minlength=num_classes)
    if (counts == 0).any():
        raise UserError(f"class(es) {torch.nonzero(counts == 0).flatten().tolist()[:5]} have no image to build the "
                        f"old classifier from")
    return F.normalize(sums, dim=1)


class CompatibilityTerm(Handler):
    """The compatibility term as a handler of the training loop (`training.engine`): adds
    λ · L_old + μ · regression to every step's loss. `old_emb` (N, d): the old teacher's embeddings of the training
    set, row i = image i of the training dataset (which `indexed` makes yield its row, so a step knows its rows)."""

    def __init__(self, old_emb: np.ndarray, labels: Sequence[int], num_classes: int, *, weight: float = 1.0,
                 regression: float = 0.0, scale: float = 16.0, old_teacher_id: str = "",
                 device: torch.device | str = "cpu") -> None:
        if weight < 0 or regression < 0 or weight + regression == 0:
            raise UserError(f"compat_weight and compat_regression must be >= 0 and not both 0 (got {weight}, "
                            f"{regression})")
        self.weight, self.regression, self.old_teacher_id = float(weight), float(regression), old_teacher_id
        self.old = torch.as_tensor(np.asarray(old_emb, dtype=np.float32)).to(device)
        self.influence = InfluenceLoss(synthesized_classifier(old_emb, labels, num_classes), scale).to(device)

    def loss_term(self, step: Step) -> torch.Tensor:
        loss = step.emb.new_zeros(())
        if self.weight:
            loss = loss + self.weight * self.influence(step.emb, step.labels)
        if self.regression:
            if step.idx is None:
                raise RuntimeError("compat_regression needs each batch's rows: wrap the dataset with `indexed`")
            loss = loss + self.regression * regression_loss(step.emb, self.old[step.idx])
        return loss

    @staticmethod
    def indexed(dataset: Dataset) -> Dataset:
        return _Indexed(dataset)


class _Indexed(Dataset):
    """(x, label, row): the dataset's items with their row, so a step fetches the old embeddings of its images."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset, self.labels = dataset, dataset.labels

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        x, y = self.dataset[i]
        return x, y, i


def resolve_old_teacher(source: str | os.PathLike) -> Path:
    """The old teacher's ONNX file from `--compatible-with`: the .onnx itself, or an index folder / versioned root
    whose manifest names the teacher that embedded it (the file must still be there and match its sha256)."""
    from asymsearch.core.manifest import IndexManifest, sha256_file

    path = Path(source).expanduser()
    if path.is_file():
        return path
    if not path.is_dir():
        raise UserError(f"--compatible-with {source}: neither an old teacher .onnx nor an index folder")
    from asymsearch.core.errors import ManifestError
    current = path / "CURRENT"
    folder = path / "versions" / current.read_text().strip() if current.is_file() else path
    try:
        manifest = IndexManifest.load(folder / "manifest.json")
    except ManifestError:
        raise UserError(f"--compatible-with {source}: not an index (no manifest.json)") from None
    onnx = Path(manifest.teacher_model.get("path") or "")
    if not onnx.is_file():
        raise UserError(f"--compatible-with {source}: the index was embedded by teacher {manifest.teacher_id}, whose "
                        f"ONNX file {onnx} is not there; pass that teacher's .onnx instead")
    want = manifest.teacher_model.get("sha256")
    if want and sha256_file(onnx) != want:
        raise UserError(f"--compatible-with {source}: {onnx} is no longer the teacher that embedded the index (its "
                        f"sha256 changed); pass that teacher's .onnx")
    return onnx


def old_embeddings(source: str | os.PathLike, items: Sequence[ImageItem], cache_dir: str | os.PathLike, *,
                   dim: int | None = None, batch_size: int = 32,
                   log: Callable[[str], None] | None = None) -> tuple[np.ndarray, str]:
    """((len(items), d) float32, old teacher id): the frozen old teacher's embeddings of `items` (its serving
    preprocessing, no augmentation), cached under its id. `dim`: the new teacher's, which must equal the old one's."""
    from asymsearch.core.manifest import require_teacher
    from asymsearch.core.ort import OnnxEmbedder
    from asymsearch.core.preprocess import load_and_preprocess
    from asymsearch.training.teacher_cache import cached_array, items_fingerprint

    onnx = resolve_old_teacher(source)
    embedder = OnnxEmbedder(onnx)
    require_teacher(embedder, str(onnx))
    old_id, spec = embedder.manifest.teacher_id, embedder.manifest.preprocessing
    if dim is not None and embedder.dim != dim:
        raise UserError(f"--compatible-with: the old teacher {old_id} embeds into {embedder.dim} dimensions and the "
                        f"new one into {dim}; a compatible teacher keeps the old dimension (give --dim {embedder.dim})")
    key = {"kind": "old-teacher-embeddings", "teacher_id": old_id, "preprocessing": spec.to_dict(),
           "augmentation": "none", "items": items_fingerprint(items), "count": len(items)}

    def compute() -> np.ndarray:
        from tqdm.auto import tqdm
        out = np.empty((len(items), embedder.dim), np.float32)
        for lo in tqdm(range(0, len(items), batch_size), desc="old teacher embeddings", leave=False):
            batch = np.stack([load_and_preprocess(it.path, spec) for it in items[lo:lo + batch_size]])
            out[lo:lo + len(batch)] = embedder.embed_arrays(batch)
        return out

    return cached_array(cache_dir, f"old-teacher-{old_id}", key, compute, log=log), old_id


def compatibility_term(cfg, items: Sequence[ImageItem], labels: Sequence[int], num_classes: int,
                       device: torch.device, log: Callable[[str], None] | None = None) -> CompatibilityTerm:
    """The handler for a teacher config with `compatible_with` set (`training.teacher`)."""
    cache = Path(cfg.trunk_cache).expanduser().parent / "old-teacher"
    old, old_id = old_embeddings(cfg.compatible_with, items, cache, dim=cfg.dim, log=log)
    if log:
        log(f"compatible with teacher {old_id}: influence weight {cfg.compat_weight:g}, regression weight "
            f"{cfg.compat_regression:g}")
    return CompatibilityTerm(old, labels, num_classes, weight=cfg.compat_weight, regression=cfg.compat_regression,
                             scale=cfg.compat_scale, old_teacher_id=old_id, device=device)


__all__ = ["CompatibilityTerm", "InfluenceLoss", "compatibility_term", "old_embeddings", "regression_loss",
           "resolve_old_teacher", "synthesized_classifier"]
