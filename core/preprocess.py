"""Image decoding and preprocessing: the one place where pixels are prepared.

The index builder (teacher), the server and the on-device client (student), and evaluation all call these
functions, so every model sees identically prepared pixels. numpy and Pillow only.
"""
from __future__ import annotations

import io
import os
from typing import Iterable

import numpy as np
from PIL import Image, UnidentifiedImageError

from asymsearch.core.errors import InvalidImage
from asymsearch.core.manifest import Preprocessing

DEFAULT_MAX_PIXELS = 40_000_000  # ~ a 7,000 x 5,700 photo; larger images are refused, not decoded
_RESAMPLE = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC,
             "nearest": Image.Resampling.NEAREST}


def decode_image(data: bytes | str | os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode bytes (or a file path) into an RGB image; raise `InvalidImage` with the reason otherwise."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        if len(data) == 0:
            raise InvalidImage("empty image")
        source = io.BytesIO(data)
        name = "image bytes"
    else:
        source = data
        name = str(data)
    try:
        with Image.open(source) as img:
            w, h = img.size
            if w * h > max_pixels:
                raise InvalidImage(f"{name}: {w}x{h} pixels exceeds the limit of {max_pixels}")
            img.load()  # decode fully here, so truncated files fail now and not later
            return img.convert("RGB")
    except InvalidImage:
        raise
    except FileNotFoundError:
        raise InvalidImage(f"{name}: no such file") from None
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError, SyntaxError) as e:
        raise InvalidImage(f"{name}: not a readable image ({e.__class__.__name__}: {e})") from None


def preprocess(img: Image.Image, spec: Preprocessing) -> np.ndarray:
    """RGB image -> float32 array (3, crop, crop): shorter side to `spec.resize`, centre crop, normalise."""
    w, h = img.size
    scale = spec.resize / min(w, h)
    nw, nh = max(spec.crop, round(w * scale)), max(spec.crop, round(h * scale))
    img = img.resize((nw, nh), _RESAMPLE[spec.interpolation])
    left, top = (nw - spec.crop) // 2, (nh - spec.crop) // 2
    img = img.crop((left, top, left + spec.crop, top + spec.crop))
    x = np.asarray(img, dtype=np.float32) / 255.0
    x = (x - np.asarray(spec.mean, dtype=np.float32)) / np.asarray(spec.std, dtype=np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def preprocess_batch(images: Iterable[Image.Image], spec: Preprocessing) -> np.ndarray:
    arrays = [preprocess(img, spec) for img in images]
    if not arrays:
        return np.zeros((0, 3, spec.crop, spec.crop), dtype=np.float32)
    return np.stack(arrays)


def load_and_preprocess(path: str | os.PathLike, spec: Preprocessing) -> np.ndarray:
    return preprocess(decode_image(path), spec)
