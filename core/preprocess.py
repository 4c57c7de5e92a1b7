"""Image decoding and preprocessing: the one place where pixels are prepared.

The index builder (teacher), the server and the on-device client (student), and evaluation all call these
functions, so every model sees identically prepared pixels. numpy and Pillow only.
"""
from __future__ import annotations

import io
import os
import warnings
from typing import Iterable

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from asymsearch.core.errors import InvalidImage
from asymsearch.core.manifest import Preprocessing

DEFAULT_MAX_PIXELS = 40_000_000  # ~ a 7,000 x 5,700 photo; larger images are refused, not decoded
TRANSPARENT_BACKGROUND = (255, 255, 255)  # transparent pixels are composited onto white
MAX_RESIZE_FACTOR = 64  # resized intermediates above 64 crops' worth of pixels resample only the crop's region
_RESAMPLE = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC,
             "nearest": Image.Resampling.NEAREST}


def decode_image(data: bytes | str | os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode bytes (or a file path) into an RGB image; raise `InvalidImage` with the reason otherwise.

    Whatever the file holds becomes 8-bit RGB the same way everywhere: CMYK and palette images are converted;
    16-bit and 32-bit greyscale are scaled to 8 bits (not clipped); transparency is composited onto white; the
    EXIF orientation is applied. Zero-byte input, truncated or corrupt files, and images larger than
    `max_pixels` (checked from the header, before anything is decoded: decompression bombs) are refused.
    """
    if isinstance(data, (bytes, bytearray, memoryview)):
        if len(data) == 0:
            raise InvalidImage("empty image")
        source = io.BytesIO(data)
        name = "image bytes"
    else:
        source = data
        name = str(data)
        try:
            if os.path.getsize(data) == 0:
                raise InvalidImage(f"{name}: empty file (0 bytes)")
        except OSError:
            pass  # missing or unreadable: Image.open says which below
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit applies below
            with Image.open(source) as img:
                w, h = img.size
                if w * h > max_pixels:
                    raise InvalidImage(f"{name}: {w}x{h} pixels exceeds the limit of {max_pixels}")
                if w < 1 or h < 1:
                    raise InvalidImage(f"{name}: empty image ({w}x{h} pixels)")
                img.load()  # decode fully here, so truncated files fail now and not later
                rgb = to_rgb(_upright(img))
                return rgb.copy() if rgb is img else rgb  # closing `img` frees its pixels
    except InvalidImage:
        raise
    except FileNotFoundError:
        raise InvalidImage(f"{name}: no such file") from None
    except Image.DecompressionBombError as e:
        raise InvalidImage(f"{name}: refused as a decompression bomb ({e})") from None
    except UnidentifiedImageError:
        raise InvalidImage(f"{name}: not a readable image (unknown or corrupt format)") from None
    except (OSError, ValueError, SyntaxError, EOFError, MemoryError) as e:
        raise InvalidImage(f"{name}: not a readable image ({e.__class__.__name__}: {e})") from None


def _upright(img: Image.Image) -> Image.Image:
    """Apply the EXIF orientation tag (a phone photo stored sideways); an unreadable EXIF block is ignored."""
    try:
        return ImageOps.exif_transpose(img)
    except Exception:  # noqa: BLE001 - malformed EXIF must not make a decodable image unreadable
        return img


def to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB (see `decode_image`)."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        a = np.asarray(img, dtype=np.float64)
        if mode == "I" and a.size and a.min() >= 0 and a.max() <= 255:
            pass  # an 8-bit image stored as 32-bit integers
        else:
            a = a / 257.0  # the 16-bit range 0..65535 onto 0..255
        return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L").convert("RGB")
    if mode == "F":
        a = np.nan_to_num(np.asarray(img, dtype=np.float64))
        if a.size and a.min() >= 0 and a.max() <= 1:
            a = a * 255
        return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L").convert("RGB")
    if mode in ("RGBA", "LA", "PA", "La", "RGBa") or (mode == "P" and "transparency" in img.info) \
            or (mode in ("L", "RGB") and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, TRANSPARENT_BACKGROUND + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    try:
        return img.convert("RGB")
    except (ValueError, OSError) as e:
        raise InvalidImage(f"cannot convert a {mode} image to RGB: {e}") from None


def preprocess(img: Image.Image, spec: Preprocessing) -> np.ndarray:
    """RGB image -> float32 array (3, crop, crop): shorter side to `spec.resize`, centre crop, normalise.

    An extremely elongated image (a 20,000 x 10 banner) would need a huge intermediate after resizing its shorter
    side; then only the source region that becomes the centre crop is resampled, which gives the same crop.
    """
    w, h = img.size
    scale = spec.resize / min(w, h)
    nw, nh = max(spec.crop, round(w * scale)), max(spec.crop, round(h * scale))
    left, top = (nw - spec.crop) // 2, (nh - spec.crop) // 2
    if nw * nh > MAX_RESIZE_FACTOR * spec.crop * spec.crop:
        box = (left * w / nw, top * h / nh, (left + spec.crop) * w / nw, (top + spec.crop) * h / nh)
        img = img.resize((spec.crop, spec.crop), _RESAMPLE[spec.interpolation], box=box)
    else:
        img = img.resize((nw, nh), _RESAMPLE[spec.interpolation])
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
