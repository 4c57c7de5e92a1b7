"""What teacher and student training share: seeding, devices, data splits, loaders, embedding, epoch logs."""
from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from asymsearch.core.data import ImageItem, list_image_folder, select_classes
from asymsearch.core.errors import UserError
from asymsearch.training.data import ImageDataset
from asymsearch.training.models import EmbeddingNet


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
                  batch_size: int = 64, progress: str | None = None) -> np.ndarray:
    """Embeddings (N, dim) float32 of a dataset, in order, with the model in eval mode (its mode is restored).
    `progress`: a progress bar with this title (for passes long enough to need one)."""
    was_training = model.training
    model.eval()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers)
    if progress:
        loader = tqdm(loader, desc=progress, leave=False, dynamic_ncols=True)
    try:
        out = [model(batch[0].to(device)).float().cpu().numpy() for batch in loader]
    finally:
        model.train(was_training)
    return np.concatenate(out) if out else np.zeros((0, model.dim), np.float32)


def check_history_entry(epoch: int, loss: float, recall: float | None) -> dict:
    if not np.isfinite(loss):
        raise UserError(f"training diverged at epoch {epoch} (loss {loss}); lower the learning rate")
    return {"epoch": epoch, "loss": loss, "val_recall@1": recall}


def weight_average(model: torch.nn.Module, decay: float) -> AveragedModel | None:
    """An exponential moving average of `model`'s weights and buffers, W̄ ← decay·W̄ + (1 − decay)·W after every
    optimiser step (`update_parameters`; the first update copies W), or None when `decay` is 0. Its `module` is a
    copy of `model` holding the averaged weights (torch.optim.swa_utils; callers check 0 <= decay < 1)."""
    if decay == 0:
        return None
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


class BestEpoch:
    """The weights of the epoch with the best validation Recall@1, its validation mAP breaking ties (a few
    validation classes saturate Recall@1: 0.998 at four of six epochs on grocery81's), or the latest epoch when
    there is no validation; kept on the CPU. `score` and `state` go into a resumable training state and come back
    through the constructor, with the tie-breaker from the history (`tie`)."""

    def __init__(self, score: float = -1.0, state: dict | None = None, tie: float | None = None) -> None:
        self.score, self.state, self.tie = score, state, tie

    def offer(self, model: torch.nn.Module, entry: dict) -> None:
        """After an epoch: keep the model's weights if `entry` (a history entry) beats the best so far, and mark it."""
        recall = entry["val_recall@1"]
        score = recall if recall is not None else float(entry["epoch"])
        tie = entry.get("val_map")
        better_tie = tie is not None and (self.tie is None or tie > self.tie)
        if self.state is None or score > self.score or (score == self.score and better_tie):
            self.score, self.tie = score, tie
            self.state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
            entry["best"] = True

    def restore(self, model: torch.nn.Module, history: list[dict]) -> int | None:
        """Load the kept weights into `model` (unchanged when no epoch ran); the best epoch's number, or None."""
        if self.state is not None:
            model.load_state_dict(self.state)
        return best_epoch(history)


def best_epoch(history: list[dict]) -> int | None:
    """The epoch whose weights `BestEpoch` kept (the last one it marked best in the history), or None."""
    return next((h["epoch"] for h in reversed(history) if h.get("best")), None)


def report_epoch(role: str, entry: dict, epochs: int) -> None:
    recall = entry["val_recall@1"]
    shown = "n/a" if recall is None else f"{recall:.4f}"
    if entry.get("val_map") is not None:
        shown += f", mAP {entry['val_map']:.4f}"
    tqdm.write(f"{role} epoch {entry['epoch']}/{epochs}: loss {entry['loss']:.4f}  val Recall@1 {shown}")
