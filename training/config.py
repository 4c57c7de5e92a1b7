"""Training configurations: plain dataclasses, importable without torch (the CLI builds its options from them).

Every field is a command-line option of `asymsearch train teacher` / `train student`; the whole config is saved
in the checkpoint, so every model says how it was made.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class TeacherConfig:
    data: str
    out: str
    backbone: str = "resnet50"
    head: str = "gem"
    dim: int = 512
    pretrained: str | None = None
    image_size: int = 224
    resize: int | None = None  # None -> image_size: shorter side resized to this, then centre crop image_size
    mean: tuple = (0.485, 0.456, 0.406)
    std: tuple = (0.229, 0.224, 0.225)
    classes: str = "all"  # core.data.select_classes
    epochs: int = 10
    classes_per_batch: int = 8
    per_class: int = 4
    lr: float = 1e-4
    weight_decay: float = 1e-4
    margin: float = 0.5
    num_negatives: int = 5
    val_fraction: float = 0.2  # every k-th selected class held out for per-epoch validation Recall@1; 0 disables
    seed: int = 0
    workers: int = 2
    device: str = "auto"  # auto -> cuda if available else cpu


@dataclass
class StudentConfig:
    data: str
    teacher: str
    out: str
    backbone: str = "mobilenet_v3_small"
    head: str = "gem"
    pretrained: str | None = None
    classes: str = "all"
    epochs: int = 10
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 1e-4
    val_fraction: float = 0.2
    seed: int = 0
    workers: int = 2
    device: str = "auto"
