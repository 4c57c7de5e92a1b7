"""The training stage: `train_teacher` (symmetric metric learning) and `train_student` (regression onto it).

Seed 001 (asymmetric metric learning): the teacher g is trained with the contrastive loss ℓ_C on m-per-class
batches with in-batch hard negatives; the student f_θ is then trained, with g frozen, by the regression loss
ℓ_R(a) = −sim(f_θ(a), g(a)), so student queries land in the teacher's space and can search a database the
teacher embedded. Each stage writes one checkpoint (see `asymsearch.training.checkpoint`).
"""
from __future__ import annotations

import dataclasses
import os
import random
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from asymsearch.core.data import ImageItem, list_image_folder, select_classes
from asymsearch.core.errors import UserError
from asymsearch.core.manifest import Preprocessing
from asymsearch.core.metrics import retrieval_metrics
from asymsearch.training.checkpoint import (freeze, load_checkpoint, make_checkpoint, model_from_checkpoint,
                                            save_checkpoint)
from asymsearch.training.config import StudentConfig, TeacherConfig  # torch-free, shared with the CLI
from asymsearch.training.data import ImageDataset, MPerClassSampler, eval_transform, train_transform
from asymsearch.training.losses import ContrastiveLoss, HardNegativeMiner, RegressionLoss
from asymsearch.training.models import EmbeddingNet, build_model

__all__ = ["TeacherConfig", "StudentConfig", "train_teacher", "train_student", "load_checkpoint",
           "model_from_checkpoint"]


# ------------------------------------------------------------------------------------------------- helpers


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {name!r} requested but CUDA is not available; use --device cpu")
    return device


def output_path(out: str | os.PathLike, role: str) -> Path:
    path = Path(out)
    return path / f"{role}.pt" if path.is_dir() else path


def split_train_val(classes: Sequence[str], val_fraction: float) -> tuple[list[str], list[str]]:
    """Hold out round(val_fraction * n) classes (at least 2), evenly spaced through the sorted list."""
    classes = list(classes)
    if not 0 <= val_fraction < 1:
        raise UserError(f"val_fraction must be in [0, 1), not {val_fraction}")
    if val_fraction == 0:
        return classes, []
    n = len(classes)
    n_val = max(2, round(val_fraction * n))
    if n - n_val < 2:
        raise UserError(f"{n} classes are too few to hold out {val_fraction:.0%} for validation "
                        f"(need 2 to train and 2 to validate); set val_fraction=0")
    val_idx = {int((i + 0.5) * n / n_val) for i in range(n_val)}
    return [c for i, c in enumerate(classes) if i not in val_idx], [c for i, c in enumerate(classes) if i in val_idx]


def prepare_data(data: str, classes: str, val_fraction: float) -> tuple[list[ImageItem], list[ImageItem],
                                                                        dict[str, int]]:
    if not Path(data).is_dir():
        raise UserError(f"data folder not found: {data}")
    selected = select_classes(data, classes)
    train_classes, val_classes = split_train_val(selected, val_fraction)
    train_items = list_image_folder(data, train_classes)
    val_items = list_image_folder(data, val_classes) if val_classes else []
    class_to_idx = {c: i for i, c in enumerate(selected)}
    return train_items, val_items, class_to_idx


def loader_kwargs(workers: int, seed: int, device: torch.device) -> dict:
    return {"num_workers": workers, "pin_memory": device.type == "cuda", "persistent_workers": workers > 0,
            "generator": torch.Generator().manual_seed(seed)}


@torch.no_grad()
def embed_dataset(model: EmbeddingNet, dataset: ImageDataset, device: torch.device, workers: int,
                  batch_size: int = 64) -> np.ndarray:
    """Embeddings (N, dim) float32 of a dataset, in order, with the model in eval mode (its mode is restored)."""
    was_training = model.training
    model.eval()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers)
    try:
        out = [model(x.to(device)).float().cpu().numpy() for x, _ in loader]
    finally:
        model.train(was_training)
    return np.concatenate(out) if out else np.zeros((0, model.dim), np.float32)


def _check_history_entry(epoch: int, loss: float, recall: float | None) -> dict:
    if not np.isfinite(loss):
        raise UserError(f"training diverged at epoch {epoch} (loss {loss}); lower the learning rate")
    return {"epoch": epoch, "loss": loss, "val_recall@1": recall}


def _report(role: str, entry: dict, epochs: int) -> None:
    recall = entry["val_recall@1"]
    shown = "n/a" if recall is None else f"{recall:.4f}"
    tqdm.write(f"{role} epoch {entry['epoch']}/{epochs}: loss {entry['loss']:.4f}  val Recall@1 {shown}")


# ------------------------------------------------------------------------------------------------- teacher


def train_teacher(cfg: TeacherConfig) -> Path:
    """Train a teacher with ℓ_C (seed 001, symmetric contrastive, in-batch hard negatives); return the checkpoint."""
    seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    out = output_path(cfg.out, "teacher")
    train_items, val_items, class_to_idx = prepare_data(cfg.data, cfg.classes, cfg.val_fraction)
    arch = {"backbone": cfg.backbone, "head": cfg.head, "dim": cfg.dim, "pretrained": cfg.pretrained}
    model = build_model(arch).to(device)
    spec = Preprocessing(resize=cfg.resize or cfg.image_size, crop=cfg.image_size, mean=tuple(cfg.mean),
                         std=tuple(cfg.std))

    train_set = ImageDataset(train_items, class_to_idx, train_transform(spec))
    sampler = MPerClassSampler(train_set.labels, cfg.per_class, cfg.classes_per_batch, seed=cfg.seed)
    loader = DataLoader(train_set, batch_sampler=sampler, **loader_kwargs(cfg.workers, cfg.seed, device))
    val_set = ImageDataset(val_items, class_to_idx, eval_transform(spec)) if val_items else None

    miner, criterion = HardNegativeMiner(cfg.num_negatives), ContrastiveLoss(cfg.margin)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    history = []
    for epoch in range(1, cfg.epochs + 1):
        sampler.set_epoch(epoch)
        model.train()
        losses = []
        bar = tqdm(loader, desc=f"teacher {epoch}/{cfg.epochs}", leave=False, dynamic_ncols=True)
        for images, labels in bar:
            images, labels = images.to(device, non_blocking=True), labels.to(device)
            emb = model(images)
            loss = criterion(emb, labels, miner(emb, labels))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
        recall = None
        if val_set is not None:
            emb = embed_dataset(model, val_set, device, cfg.workers)
            recall = retrieval_metrics(emb, val_set.labels, emb, val_set.labels, exclude_self=True)["recall@1"]
        history.append(_check_history_entry(epoch, float(np.mean(losses)), recall))
        _report("teacher", history[-1], cfg.epochs)

    model.eval()
    ckpt = make_checkpoint(model, role="teacher", arch=arch, preprocessing=spec, config=dataclasses.asdict(cfg),
                           history=history)
    return save_checkpoint(ckpt, out)


# ------------------------------------------------------------------------------------------------- student


def train_student(cfg: StudentConfig) -> Path:
    """Train a student onto a frozen teacher with ℓ_R (seed 001 regression); return the checkpoint.

    The student inherits the teacher's embedding dimension and preprocessing. Validation: asymmetric
    Recall@1 of student-embedded held-out images against the teacher-embedded same images (self excluded).
    """
    seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    out = output_path(cfg.out, "student")
    teacher_ckpt = load_checkpoint(cfg.teacher)
    if teacher_ckpt["role"] != "teacher":
        raise UserError(f"{cfg.teacher} is a {teacher_ckpt['role']} checkpoint; a student trains against a teacher")
    train_items, val_items, class_to_idx = prepare_data(cfg.data, cfg.classes, cfg.val_fraction)
    if len(train_items) < 2:
        raise UserError(f"a student needs at least 2 training images, found {len(train_items)}")
    teacher = freeze(model_from_checkpoint(teacher_ckpt)).to(device)
    spec = Preprocessing.from_dict(teacher_ckpt["preprocessing"])
    arch = {"backbone": cfg.backbone, "head": cfg.head, "dim": int(teacher_ckpt["arch"]["dim"]),
            "pretrained": cfg.pretrained}
    student = build_model(arch).to(device)

    train_set = ImageDataset(train_items, class_to_idx, train_transform(spec))
    # drop a last partial batch whenever there is a full one (BatchNorm cannot train on a single image)
    drop_last = len(train_set) > cfg.batch_size
    loader = DataLoader(train_set, batch_size=cfg.batch_size, shuffle=True, drop_last=drop_last,
                        **loader_kwargs(cfg.workers, cfg.seed, device))
    val_set, val_teacher = None, None
    if val_items:
        val_set = ImageDataset(val_items, class_to_idx, eval_transform(spec))
        val_teacher = embed_dataset(teacher, val_set, device, cfg.workers)

    criterion = RegressionLoss()
    optimizer = torch.optim.AdamW(student.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    history = []
    for epoch in range(1, cfg.epochs + 1):
        student.train()  # the teacher stays in eval mode throughout
        losses = []
        bar = tqdm(loader, desc=f"student {epoch}/{cfg.epochs}", leave=False, dynamic_ncols=True)
        for images, _ in bar:
            images = images.to(device, non_blocking=True)
            with torch.no_grad():
                target = teacher(images)
            loss = criterion(student(images), target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
        recall = None
        if val_set is not None:
            queries = embed_dataset(student, val_set, device, cfg.workers)
            recall = retrieval_metrics(queries, val_set.labels, val_teacher, val_set.labels,
                                       exclude_self=True)["recall@1"]
        history.append(_check_history_entry(epoch, float(np.mean(losses)), recall))
        _report("student", history[-1], cfg.epochs)

    student.eval()
    ckpt = make_checkpoint(student, role="student", arch=arch, preprocessing=spec,
                           teacher_id=teacher_ckpt["model_id"], config=dataclasses.asdict(cfg), history=history)
    return save_checkpoint(ckpt, out)
