"""A small labelled image set generated on the spot, so the demo and the tests need nothing downloaded.

Each class is a combination of a shape, a hue and a stripe pattern; each image places it at a random position,
size and angle on a noisy background. Classes are distinct enough for retrieval to be learnable on unseen
classes, and hard enough that an untrained network is clearly worse than a trained one.
"""
from __future__ import annotations

import colorsys
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "cross", "ring", "diamond")


def class_spec(c: int, num_classes: int) -> dict:
    return {"shape": SHAPES[c % len(SHAPES)], "hue": (c * 0.618034) % 1.0, "stripes": 2 + (c * 7) % 5}


def render(spec: dict, size: int, rng: np.random.Generator) -> Image.Image:
    bg = rng.integers(0, 90, size=(size, size, 3), dtype=np.uint8) + rng.integers(0, 60, size=3, dtype=np.uint8)
    img = Image.fromarray(bg.astype(np.uint8), "RGB")
    r = size * rng.uniform(0.22, 0.38)
    cx, cy = rng.uniform(r, size - r, size=2)
    hue = (spec["hue"] + rng.normal(0, 0.02)) % 1.0
    rgb = tuple(int(255 * v) for v in colorsys.hsv_to_rgb(hue, rng.uniform(0.6, 1.0), rng.uniform(0.7, 1.0)))
    mask = Image.new("L", (size, size), 0)
    d = ImageDraw.Draw(mask)
    box = (cx - r, cy - r, cx + r, cy + r)
    shape = spec["shape"]
    if shape == "circle":
        d.ellipse(box, fill=255)
    elif shape == "ring":
        d.ellipse(box, fill=255)
        d.ellipse((cx - r / 2, cy - r / 2, cx + r / 2, cy + r / 2), fill=0)
    elif shape == "square":
        d.rectangle(box, fill=255)
    elif shape == "diamond":
        d.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=255)
    elif shape == "triangle":
        d.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=255)
    else:  # cross
        d.rectangle((cx - r, cy - r / 3, cx + r, cy + r / 3), fill=255)
        d.rectangle((cx - r / 3, cy - r, cx + r / 3, cy + r), fill=255)
    mask = mask.rotate(rng.uniform(-30, 30), center=(cx, cy))
    # stripes inside the shape: the class's frequency, a random phase
    yy, xx = np.mgrid[0:size, 0:size]
    phase = rng.uniform(0, 2 * np.pi)
    stripes = (np.sin((xx + yy) * spec["stripes"] * np.pi / size + phase) > 0)[..., None]
    fg = np.where(stripes, np.asarray(rgb, np.float32), np.asarray(rgb, np.float32) * 0.45)
    m = np.asarray(mask, np.float32)[..., None] / 255.0
    out = np.asarray(img, np.float32) * (1 - m) + fg * m
    out += rng.normal(0, 8, size=out.shape)
    return Image.fromarray(np.clip(out, 0, 255).astype(np.uint8), "RGB")


def make_synthetic_dataset(root: str | os.PathLike, num_classes: int = 16, per_class: int = 30, size: int = 64,
                           seed: int = 0) -> Path:
    """Write `root/class_XX/NNNN.jpg` and return `root`. Deterministic for a given seed."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    for c in range(num_classes):
        folder = root / f"class_{c:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        spec = class_spec(c, num_classes)
        for i in range(per_class):
            render(spec, size, rng).save(folder / f"{i:04d}.jpg", quality=92)
    return root
