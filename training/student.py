"""Student training (asymmetric metric learning), seed 001: with the teacher g frozen, the student f_θ is trained
by the regression loss ℓ_R(a) = −sim(f_θ(a), g(a)), so student queries land in the teacher's space and can search
a database the teacher embedded.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from asymsearch.core.errors import UserError
from asymsearch.core.manifest import Preprocessing
from asymsearch.core.metrics import retrieval_metrics
from asymsearch.training.checkpoint import freeze, load_checkpoint, make_checkpoint, model_from_checkpoint, save_checkpoint
from asymsearch.training.common import (check_history_entry, embed_dataset, loader_kwargs, output_path, prepare_data,
                                        report_epoch, resolve_device, seed_everything)
from asymsearch.training.config import StudentConfig
from asymsearch.training.data import ImageDataset, eval_transform, train_transform
from asymsearch.training.losses import RegressionLoss
from asymsearch.training.models import build_model


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
        history.append(check_history_entry(epoch, float(np.mean(losses)), recall))
        report_epoch("student", history[-1], cfg.epochs)

    student.eval()
    ckpt = make_checkpoint(student, role="student", arch=arch, preprocessing=spec,
                           teacher_id=teacher_ckpt["model_id"], config=dataclasses.asdict(cfg), history=history)
    return save_checkpoint(ckpt, out)
