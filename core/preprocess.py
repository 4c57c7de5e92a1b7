"""Image decoding and preprocessing: the one place where pixels are prepared.

The index builder (teacher), the server and the on-device client (student), and evaluation all call these
functions, so every model sees identically prepared pixels. numpy and Pillow only.
"""
from __future__ import annotations

import io
import math
import os
import struct
import warnings
from typing import Iterable

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from asymsearch.core.errors import InvalidImage
from asymsearch.core.manifest import Preprocessing

DEFAULT_MAX_PIXELS = 40_000_000  # ~ a 7,000 x 5,700 photo; larger images are refused, not decoded
ORIENTATION_TAG = 0x0112  # EXIF
TRANSPARENT_BACKGROUND = (255, 255, 255)  # transparent pixels are composited onto white
MAX_RESIZE_FACTOR = 64  # resized intermediates above 64 crops' worth of pixels resample only the crop's region
_RESAMPLE = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC,
             "nearest": Image.Resampling.NEAREST}


# What Pillow raises on a malformed file: besides its documented OSError / ValueError / SyntaxError / EOFError, its
# format plugins let Python errors through on headers they do not expect (found by fuzzing: a TIFF whose
# StripOffsets tag is text raises TypeError from ImageFile.load; tests/fuzz/regressions/decode/).
PILLOW_FAILURES = (OSError, ValueError, SyntaxError, EOFError, TypeError, IndexError, KeyError, struct.error,
                   ZeroDivisionError, OverflowError)

def decode_image(data: bytes | str | os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS, *,
                 min_side: int | None = None) -> Image.Image:
    """Decode bytes (or a file path) into an RGB image; raise `InvalidImage` with the reason otherwise.

    Whatever the file holds becomes 8-bit RGB the same way everywhere: CMYK and palette images are converted;
    16-bit and 32-bit greyscale are scaled to 8 bits (not clipped), block by block, with no float64 copy of the
    image; transparency is composited onto white; the EXIF orientation is applied. Zero-byte input, files cut
    short (truncated) or corrupt, and images larger than `max_pixels` (checked from the header, before anything
    is decoded: decompression bombs) are refused.

    `min_side`: the shorter side the caller needs (the model's resize). A JPEG at least twice that size is decoded
    reduced (`Image.draft`: libjpeg's DCT scaling by 1/2, 1/4 or 1/8), never below `min_side`, so a 6000 x 6000
    photo costs a fraction of its full-size pixels; a deep greyscale image that large is box-reduced by an integer
    factor once it is 8-bit, before it becomes RGB. Smaller images decode exactly as without it.
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
            img = Image.open(source)
            keep = False
            try:
                _check_size(img, max_pixels, name)
                _draft(img, min_side)
                img.load()  # decode fully here, so truncated files fail now and not later
                rgb = to_rgb(_upright(img), min_side)
                if rgb is not img:
                    return rgb
                if isinstance(source, io.BytesIO):
                    keep = True
                    return img  # decoded from memory: no file to close, no second copy of the pixels
                return img.copy()  # closing `img` closes its file
            finally:
                if not keep:
                    img.close()  # frees the pixels of the source mode once converted
    except InvalidImage:
        raise
    except FileNotFoundError:
        raise InvalidImage(f"{name}: no such file") from None
    except Image.DecompressionBombError as e:
        raise InvalidImage(f"{name}: refused as a decompression bomb ({e})") from None
    except UnidentifiedImageError:
        raise InvalidImage(f"{name}: not a readable image (unknown or corrupt format)") from None
    except (*PILLOW_FAILURES, MemoryError) as e:
        raise InvalidImage(f"{name}: not a readable image ({e.__class__.__name__}: {e})") from None


def _check_size(img: Image.Image, max_pixels: int, name: str) -> None:
    w, h = img.size
    if w * h > max_pixels:
        raise InvalidImage(f"{name}: {w}x{h} pixels exceeds the limit of {max_pixels}")
    if w < 1 or h < 1:
        raise InvalidImage(f"{name}: empty image ({w}x{h} pixels)")


def _draft(img: Image.Image, min_side: int | None) -> None:
    """Ask a JPEG decoder for the smallest DCT-scaled size whose shorter side is still >= `min_side`."""
    if not min_side or img.format != "JPEG":
        return
    w, h = img.size
    r = min_side / min(w, h)
    if r <= 0.5:
        img.draft(None, (max(1, math.ceil(w * r)), max(1, math.ceil(h * r))))


def _pixel_bytes(mode: str) -> int:
    """Bytes Pillow stores per pixel in `mode`: one band of 1, 2 (16-bit) or 4 (32-bit); 4 for several bands."""
    if mode in ("1", "L", "P"):
        return 1
    if mode.startswith("I;16"):
        return 2
    return 4  # I, F, and every multi-band mode (Pillow stores RGB as 32-bit pixels)


def decoded_nbytes(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, *, min_side: int | None = None) -> int:
    """What `decode_image(data, max_pixels, min_side=min_side)` holds at its peak, from the header alone (no pixel
    is decoded): the image in its own mode (after any JPEG draft reduction) and, when that mode is not RGB, the
    RGB image it becomes. The server's memory budget admits image queries on this figure. Raises `InvalidImage`
    as `decode_image` would for an unreadable header or too many pixels."""
    if not data:
        raise InvalidImage("empty image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                _check_size(img, max_pixels, "image bytes")
                _draft(img, min_side)
                (w, h), mode = img.size, img.mode
    except InvalidImage:
        raise
    except Image.DecompressionBombError as e:
        raise InvalidImage(f"image bytes: refused as a decompression bomb ({e})") from None
    except UnidentifiedImageError:
        raise InvalidImage("image bytes: not a readable image (unknown or corrupt format)") from None
    except PILLOW_FAILURES as e:
        raise InvalidImage(f"image bytes: not a readable image ({e.__class__.__name__}: {e})") from None
    rgb = w * h * _pixel_bytes("RGB")
    if mode == "RGB":
        return rgb
    if mode in DEEP_MODES:  # the image, its 8-bit greyscale, and the (reduced) RGB image
        factor = reduce_factor((w, h), min_side)
        return w * h * (_pixel_bytes(mode) + 1) + -(-w // factor) * -(-h // factor) * _pixel_bytes("RGB")
    return w * h * _pixel_bytes(mode) + rgb


def _upright(img: Image.Image) -> Image.Image:
    """Apply the EXIF orientation tag (a phone photo stored sideways); an unreadable EXIF block is ignored.
    An upright image is returned as is (no copy)."""
    try:
        if img.getexif().get(ORIENTATION_TAG, 1) in (1, None):
            return img
        return ImageOps.exif_transpose(img)
    except Exception:  # noqa: BLE001 - malformed EXIF must not make a decodable image unreadable
        return img


DEEP_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")
BLOCK_PIXELS = 1 << 18  # deep greyscale images are scaled to 8 bits this many pixels at a time


def _to_8bit(img: Image.Image) -> Image.Image:
    """16-bit / 32-bit integer / float greyscale -> 8-bit "L", in row blocks (no full-size float copy).

    Integers: 0..255 stays (an 8-bit image stored as 32-bit), otherwise the 16-bit range 0..65535 is mapped onto
    0..255 (rounded, clipped). Floats: NaN -> 0; 0..1 is scaled by 255; then rounded and clipped to 0..255."""
    w, h = img.size
    rows = max(1, BLOCK_PIXELS // w)
    blocks = [(top, min(h, top + rows)) for top in range(0, h, rows)]
    block = lambda top, bottom: np.asarray(img.crop((0, top, w, bottom)))
    if img.mode == "F":
        lo, hi = np.inf, -np.inf
        for top, bottom in blocks:  # the range after NaN -> 0, as the conversion sees it
            b = np.nan_to_num(block(top, bottom))
            lo, hi = min(lo, float(b.min())), max(hi, float(b.max()))
        scale = 255.0 if lo >= 0 and hi <= 1 else 1.0
    else:
        lo, hi = img.getextrema()
        eight_bit = img.mode == "I" and lo >= 0 and hi <= 255
    out = Image.new("L", (w, h))  # filled block by block: no full-size numpy copy beside it
    for top, bottom in blocks:
        b = block(top, bottom)
        if img.mode == "F":
            v = np.rint(np.nan_to_num(b.astype(np.float32)) * np.float32(scale))
        elif eight_bit:
            v = b
        else:  # round(a / 257) in integers: floor((2a + 257) / 514), in place (16-bit values fit in 32 bits)
            v = b.astype(np.int64 if img.mode == "I" else np.uint32)
            v *= 2
            v += 257
            v //= 514
        out.paste(Image.fromarray(np.clip(v, 0, 255).astype(np.uint8), "L"), (0, top))
    return out


def reduce_factor(size: tuple[int, int], min_side: int | None) -> int:
    """The integer factor a deep greyscale image is box-reduced by before it becomes RGB: the largest that keeps
    its shorter side >= `min_side` (1: none, below twice `min_side` or without one)."""
    if not min_side or min(size) < 2 * min_side:
        return 1
    return min(size) // min_side


def to_rgb(img: Image.Image, min_side: int | None = None) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB (see `decode_image`). A deep greyscale image (16-bit, 32-bit, float) is
    box-reduced (`reduce_factor`) after its 8-bit conversion and before it becomes RGB when `min_side` allows."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in DEEP_MODES:
        grey = _to_8bit(img)
        factor = reduce_factor(grey.size, min_side)
        return (grey.reduce(factor) if factor > 1 else grey).convert("RGB")
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
