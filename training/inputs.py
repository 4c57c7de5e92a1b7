"""Bad training data, refused in one line before any model is built or any image is embedded.

Metric learning needs at least two classes, at least two images in every class (a class of one has no positive
pair: it can be neither a query nor an anchor), images that decode, and at least one batch of them. Each rule
is checked on the listing (`core.data.list_image_folder`) before training starts, so a folder with one of these
faults fails in a second instead of after minutes of feature maps; the message says what to fix.
"""
from __future__ import annotations

from collections import Counter
from typing import Sequence

from asymsearch.core.data import ImageItem
from asymsearch.core.errors import UserError


def _names(values: Sequence[str], limit: int = 3) -> str:
    shown = ", ".join(values[:limit])
    return shown + (f" and {len(values) - limit} more" if len(values) > limit else "")


def unreadable_images(items: Sequence[ImageItem]) -> list[tuple[str, str]]:
    """(path, reason) of each image whose header Pillow cannot read (about 0.1 ms per JPEG: the pixels are not
    decoded, so a file truncated after its header is only found when it is read)."""
    from PIL import Image, UnidentifiedImageError

    bad = []
    for it in items:
        try:
            with Image.open(it.path) as img:
                if img.size[0] < 1 or img.size[1] < 1:
                    bad.append((it.path, "empty image"))
        except (OSError, UnidentifiedImageError, ValueError) as e:
            bad.append((it.path, e.__class__.__name__))
    return bad


def check_training_items(train_items: Sequence[ImageItem], val_items: Sequence[ImageItem], *, per_class: int,
                         classes_per_batch: int, role: str) -> None:
    """`UserError` (one line) unless the training classes are at least 2, every training and validation class
    holds at least 2 images, every image's header reads and the training images fill at least one batch: the
    batch the class-balanced sampler draws, `per_class` images of each of min(`classes_per_batch`, classes)
    classes (with fewer images, every batch repeats them)."""
    counts = Counter(it.label for it in train_items)
    if len(counts) < 2:
        raise UserError(f"a {role} needs at least 2 training classes (class folders with images), found "
                        f"{len(counts)}: add class folders, or choose more with --classes")
    val_counts = Counter(it.label for it in val_items)
    single = sorted(c for c, n in {**counts, **val_counts}.items() if n < 2)
    if single:
        raise UserError(f"{len(single)} class folder(s) hold a single image ({_names(single)}): metric learning "
                        f"needs at least 2 images per class; add images or remove those folders")
    bad = unreadable_images([*train_items, *val_items])
    if bad:
        raise UserError(f"{len(bad)} image(s) cannot be read ({_names([f'{p} ({why})' for p, why in bad], 2)}): "
                        f"fix or remove them before training")
    batch = per_class * min(classes_per_batch, len(counts))
    if len(train_items) < batch:
        raise UserError(f"{len(train_items)} training images are fewer than one batch of {batch}: add images, or "
                        f"lower the batch (--classes-per-batch / --per-class, or --batch-size)")


__all__ = ["check_training_items", "unreadable_images"]
