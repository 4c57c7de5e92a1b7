"""Labelled image folders: `ROOT/<class>/<image>`, classes sorted by name."""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from asymsearch.core.errors import UserError

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})


@dataclasses.dataclass(frozen=True)
class ImageItem:
    path: str  # absolute path
    label: str  # the class folder's name


def list_image_folder(root: str | os.PathLike, classes: list[str] | None = None) -> list[ImageItem]:
    """Every image below `root`, with its class folder as label, sorted by (class, file name).

    Files whose suffix is an image suffix are listed even if they turn out unreadable: readers skip and
    report them. `classes` restricts the listing to those class folders.
    """
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"image folder not found: {root}")
    names = class_names(root) if classes is None else classes
    items = []
    for name in names:
        for f in sorted((root / name).iterdir()):
            if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES:
                items.append(ImageItem(str(f.resolve()), name))
    if not items:
        raise UserError(f"no images found in {root} (expected ROOT/<class>/<image>.jpg)")
    return items


def list_images_flat(root: str | os.PathLike) -> list[ImageItem]:
    """All images below `root` recursively; the label is the immediate parent folder's name ('' at the root)."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"image folder not found: {root}")
    items = [ImageItem(str(f.resolve()), "" if f.parent == root else f.parent.name)
             for f in sorted(root.rglob("*")) if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES]
    if not items:
        raise UserError(f"no images found in {root}")
    return items


def class_names(root: str | os.PathLike) -> list[str]:
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"image folder not found: {root}")
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def split_classes(root: str | os.PathLike) -> tuple[list[str], list[str]]:
    """The project's protocol: class folders sorted by name; the first half trains, the second half evaluates."""
    names = class_names(root)
    if len(names) < 2:
        raise UserError(f"{root} needs at least two class folders to split into training and evaluation")
    half = len(names) // 2
    return names[:half], names[half:]


CLASS_SPECS = ("all", "first-half", "second-half")


def select_classes(root: str | os.PathLike, spec: str = "all") -> list[str]:
    """Class folders of `root` chosen by `spec`: 'all', 'first-half', 'second-half' (the project's split,
    see `split_classes`), or a comma-separated list of folder names."""
    if spec == "all":
        return class_names(root)
    if spec in ("first-half", "second-half"):
        first, second = split_classes(root)
        return first if spec == "first-half" else second
    wanted = [c.strip() for c in spec.split(",") if c.strip()]
    have = set(class_names(root))
    missing = [c for c in wanted if c not in have]
    if missing or not wanted:
        raise UserError(f"unknown class folder(s) {', '.join(missing) or spec!r} in {root}; "
                        f"use one of {', '.join(CLASS_SPECS)} or a comma-separated list of class folders")
    return wanted
