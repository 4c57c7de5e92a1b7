"""Teacher training (symmetric metric learning), seed 001: the teacher g is trained with the contrastive loss
ℓ_C(a) = Σ_{p∈P(a)} −s(a,p) + Σ_{n∈N(a)} [s(a,n) − m]_+ on m-per-class batches with in-batch hard negatives.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from asymsearch.core.manifest import Preprocessing
from asymsearch.core.metrics import retrieval_metrics
from asymsearch.training.checkpoint import make_checkpoint, save_checkpoint
from asymsearch.training.common import (check_history_entry, embed_dataset, loader_kwargs, output_path, prepare_data,
                                        report_epoch, resolve_device, seed_everything)
from asymsearch.training.config import TeacherConfig
from asymsearch.training.data import ImageDataset, MPerClassSampler, eval_transform, train_transform
from asymsearch.training.losses import ContrastiveLoss, HardNegativeMiner
from asymsearch.training.models import build_model


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
        history.append(check_history_entry(epoch, float(np.mean(losses)), recall))
        report_epoch("teacher", history[-1], cfg.epochs)

    model.eval()
    ckpt = make_checkpoint(model, role="teacher", arch=arch, preprocessing=spec, config=dataclasses.asdict(cfg),
                           history=history)
    return save_checkpoint(ckpt, out)
