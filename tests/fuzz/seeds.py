"""Seed inputs for the fuzz targets: small valid images of many formats and modes, written by Pillow (and a few
assembled by hand where Pillow cannot write the variant), plus truncated copies of each.

Generated when a run starts (nothing binary is committed); `write_seeds(folder)` puts them in a corpus folder.
"""
from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, features

Saver = Callable[[], bytes]


def _gradient(w: int, h: int, seed: int = 0) -> np.ndarray:
    """(h, w, 3) uint8: smooth ramps plus a little noise, so that lossy codecs have something to encode."""
    y, x = np.mgrid[0:h, 0:w]
    noise = np.random.default_rng(seed).integers(0, 24, size=(h, w, 3))
    rgb = np.stack([x * 255 // max(1, w - 1), y * 255 // max(1, h - 1), (x + y) * 127 // max(1, w + h - 2)], -1)
    return np.clip(rgb + noise, 0, 255).astype(np.uint8)


def _rgb(w: int = 24, h: int = 16, seed: int = 0) -> Image.Image:
    return Image.fromarray(_gradient(w, h, seed), "RGB")


def _save(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _exif_rotated_jpeg() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    return _save(_rgb(20, 12), "JPEG", exif=exif.tobytes())


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png_raw(w: int, h: int, bit_depth: int, colour_type: int, pixels: np.ndarray) -> bytes:
    """A PNG assembled by hand (Pillow cannot write 16-bit RGB(A)): `pixels` (h, w*channels) big-endian."""
    rows = b"".join(b"\x00" + pixels[r].tobytes() for r in range(h))  # filter type 0 on every row
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, bit_depth, colour_type, 0, 0, 0))
            + _png_chunk(b"IDAT", zlib.compress(rows)) + _png_chunk(b"IEND", b""))


def _png16_rgb() -> bytes:
    v = (_gradient(12, 10).astype(">u2") * 257).reshape(10, -1)
    return _png_raw(12, 10, 16, 2, v)


def _png16_rgba() -> bytes:
    g = _gradient(10, 8).astype(">u2") * 257
    a = np.full((8, 10, 1), 40000, ">u2")
    return _png_raw(10, 8, 16, 6, np.concatenate([g, a], -1).reshape(8, -1))


def _palette(transparent: bool) -> Image.Image:
    img = _rgb(16, 16).quantize(16)
    if transparent:
        img.info["transparency"] = 0
    return img


def _animated_gif() -> bytes:
    frames = [_rgb(12, 12, seed).quantize(8) for seed in range(3)]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=40, loop=0, transparency=1)
    return buf.getvalue()


def _grey16() -> Image.Image:
    return Image.fromarray((np.arange(20 * 14, dtype=np.uint16).reshape(14, 20) * 233).astype(np.uint16))  # I;16


def _float_tiff(scale: float) -> bytes:
    a = (np.linspace(0, 1, 18 * 12, dtype=np.float32).reshape(12, 18) * scale)
    a[0, 0] = np.nan  # NaN must become 0, not break the conversion
    return _save(Image.fromarray(a, "F"), "TIFF")


def _int32_tiff() -> bytes:
    return _save(Image.fromarray(np.arange(16 * 10, dtype=np.int32).reshape(10, 16) * 4099, "I"), "TIFF")


def _sizes() -> dict[str, Saver]:
    """Shapes that take other branches of decode and preprocess: a 1x1 image, a banner (crop-region resize), a
    photo large enough for the JPEG draft reduction (at least twice the model's resize)."""
    return {
        "1x1.png": lambda: _save(Image.new("RGB", (1, 1), (200, 10, 10)), "PNG"),
        "banner-300x3.png": lambda: _save(_rgb(300, 3), "PNG"),
        "tall-2x90.bmp": lambda: _save(_rgb(2, 90), "BMP"),
        "draft-160x120.jpg": lambda: _save(_rgb(160, 120), "JPEG", quality=60),
        "grey16-reduce-140x70.png": lambda: _save(Image.fromarray(
            (np.arange(140 * 70, dtype=np.uint16).reshape(70, 140) * 6).astype(np.uint16)), "PNG"),
    }


def seed_images() -> dict[str, bytes]:
    """name -> bytes of every valid seed (the names say format and mode)."""
    savers: dict[str, Saver] = {
        "baseline.jpg": lambda: _save(_rgb(), "JPEG", quality=80),
        "progressive.jpg": lambda: _save(_rgb(), "JPEG", progressive=True, quality=70),
        "grey.jpg": lambda: _save(_rgb().convert("L"), "JPEG"),
        "cmyk.jpg": lambda: _save(_rgb().convert("CMYK"), "JPEG"),
        "subsampling-444.jpg": lambda: _save(_rgb(), "JPEG", subsampling=0, quality=95),
        "exif-rotated.jpg": _exif_rotated_jpeg,
        "rgb8.png": lambda: _save(_rgb(), "PNG"),
        "rgba8.png": lambda: _save(_rgb().convert("RGBA"), "PNG"),
        "la8.png": lambda: _save(_rgb().convert("LA"), "PNG"),
        "grey8.png": lambda: _save(_rgb().convert("L"), "PNG"),
        "bilevel.png": lambda: _save(_rgb().convert("1"), "PNG"),
        "grey16.png": lambda: _save(_grey16(), "PNG"),
        "rgb16.png": _png16_rgb,
        "rgba16.png": _png16_rgba,
        "palette.png": lambda: _save(_palette(False), "PNG"),
        "palette-transparent.png": lambda: _save(_palette(True), "PNG"),
        "rgb-transparent-key.png": lambda: _save(_rgb(), "PNG", transparency=(0, 0, 0)),
        "palette.gif": lambda: _save(_palette(False), "GIF"),
        "palette-transparent.gif": lambda: _save(_palette(True), "GIF"),
        "animated.gif": _animated_gif,
        "rgb.tif": lambda: _save(_rgb(), "TIFF"),
        "rgb-lzw.tif": lambda: _save(_rgb(), "TIFF", compression="tiff_lzw"),
        "rgb-deflate.tif": lambda: _save(_rgb(), "TIFF", compression="tiff_adobe_deflate"),
        "cmyk.tif": lambda: _save(_rgb().convert("CMYK"), "TIFF"),
        "grey16.tif": lambda: _save(_grey16(), "TIFF"),
        "int32.tif": _int32_tiff,
        "float-unit.tif": lambda: _float_tiff(1.0),
        "float-wide.tif": lambda: _float_tiff(3000.0),
        "rgb.bmp": lambda: _save(_rgb(), "BMP"),
        "palette.bmp": lambda: _save(_palette(False), "BMP"),
        "bilevel.bmp": lambda: _save(_rgb().convert("1"), "BMP"),
        "rgb.ppm": lambda: _save(_rgb(), "PPM"),
        "grey.pgm": lambda: _save(_rgb().convert("L"), "PPM"),
        "rgba.tga": lambda: _save(_rgb().convert("RGBA"), "TGA"),
        "rgb-rle.tga": lambda: _save(_rgb(), "TGA", compression="tga_rle"),
        "rgb.pcx": lambda: _save(_rgb(), "PCX"),
        "rgba.ico": lambda: _save(_rgb(16, 16).convert("RGBA"), "ICO", sizes=[(16, 16)]),
        "rgb.sgi": lambda: _save(_rgb(), "SGI"),
        "rgb.qoi": lambda: _save(_rgb(), "QOI"),
        **_sizes(),
    }
    if features.check("webp"):
        savers["lossy.webp"] = lambda: _save(_rgb(), "WEBP", quality=50)
        savers["lossless-alpha.webp"] = lambda: _save(_rgb().convert("RGBA"), "WEBP", lossless=True)
    if features.check("jpg_2000"):
        savers["rgb.j2k"] = lambda: _save(_rgb(), "JPEG2000")
    return {name: save() for name, save in savers.items()}


def seeds() -> dict[str, bytes]:
    """Every valid seed and, for each, copies cut short (after the header, and at half its length)."""
    out = {}
    for name, data in seed_images().items():
        out[name] = data
        out[f"truncated-half-{name}"] = data[: len(data) // 2]
        out[f"truncated-64-{name}"] = data[:64]
    return out


def write_seeds(folder: str | Path) -> Path:
    """Write `seeds()` into `folder` (created) as seed-NAME files; existing corpus files are left alone."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in seeds().items():
        (folder / f"seed-{name}").write_bytes(data)
    return folder
