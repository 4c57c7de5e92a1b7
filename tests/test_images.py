"""Image decoding against explicit expected pixels: CMYK, 16-bit, palette with transparency, alpha, EXIF
orientation, and the inputs that must be refused (empty, truncated, corrupt, decompression bombs)."""
from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from asymsearch.core import preprocess as pp
from asymsearch.core.errors import InvalidImage
from asymsearch.core.manifest import Preprocessing
from asymsearch.core.preprocess import decode_image, preprocess


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def rgb_pattern(w: int = 24, h: int = 16) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_cmyk_is_converted_exactly():
    rgb = rgb_pattern()
    cmyk = Image.fromarray(rgb, "RGB").convert("CMYK")  # C = 255 - R, ..., K = 0: an exact round trip
    for fmt in ("TIFF", "JPEG"):
        out = np.asarray(decode_image(encode(cmyk, fmt, **({"quality": 100} if fmt == "JPEG" else {}))))
        assert out.shape == rgb.shape and out.dtype == np.uint8
        if fmt == "TIFF":
            np.testing.assert_array_equal(out, rgb)
        else:  # lossy, but the same picture, not inverted colours
            assert np.abs(out.astype(int) - rgb).mean() < 12


def test_sixteen_bit_greyscale_is_scaled_not_clipped():
    grey8 = np.arange(256, dtype=np.uint16).reshape(16, 16)
    img16 = Image.fromarray(grey8 * 257)  # 0..65535, the 16-bit encoding of 0..255
    assert img16.mode.startswith("I;16")
    png = encode(img16, "PNG")
    assert Image.open(io.BytesIO(png)).mode in ("I", "I;16")  # Pillow reads it as 16- or 32-bit integers
    out = np.asarray(decode_image(png))
    np.testing.assert_array_equal(out, np.repeat(grey8.astype(np.uint8)[..., None], 3, axis=2))


def test_float_image_in_unit_range():
    a = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)
    out = np.asarray(decode_image(encode(Image.fromarray(a, "F"), "TIFF")))
    np.testing.assert_array_equal(out[..., 0], np.rint(a * 255).astype(np.uint8))


def test_palette_with_transparency_goes_onto_white():
    img = Image.new("P", (4, 2))
    img.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    img.putdata([0, 1, 0, 1, 1, 1, 0, 0])
    out = np.asarray(decode_image(encode(img, "PNG", transparency=0)))
    expected = np.array([[255, 255, 255], [200, 100, 50]], np.uint8)[np.array([0, 1, 0, 1, 1, 1, 0, 0])]
    np.testing.assert_array_equal(out.reshape(-1, 3), expected)
    opaque = np.asarray(decode_image(encode(img, "PNG")))  # no transparency: the palette colours
    assert tuple(opaque[0, 0]) == (10, 20, 30)


def test_alpha_is_composited_onto_white():
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[0, 0] = (100, 0, 0, 255)  # opaque red-ish
    rgba[0, 1] = (0, 0, 0, 0)  # fully transparent black: white
    rgba[1, 0] = (0, 0, 0, 128)  # half-transparent black: mid grey
    rgba[1, 1] = (0, 200, 0, 255)
    out = np.asarray(decode_image(encode(Image.fromarray(rgba, "RGBA"), "PNG"))).astype(int)
    assert tuple(out[0, 0]) == (100, 0, 0) and tuple(out[0, 1]) == (255, 255, 255)
    assert all(abs(v - 127) <= 1 for v in out[1, 0]) and tuple(out[1, 1]) == (0, 200, 0)
    la = Image.fromarray(np.array([[[50, 255], [50, 0]]], np.uint8), "LA")
    assert np.asarray(decode_image(encode(la, "PNG"))).tolist() == [[[50, 50, 50], [255, 255, 255]]]


def test_exif_orientation_is_applied():
    rgb = rgb_pattern(6, 4)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: display after rotating 90 degrees clockwise
    out = np.asarray(decode_image(encode(Image.fromarray(rgb), "PNG", exif=exif.tobytes())))
    np.testing.assert_array_equal(out, np.rot90(rgb, k=-1))


def test_result_outlives_the_source_and_is_rgb(tmp_path):
    path = tmp_path / "x.png"
    Image.fromarray(rgb_pattern()).save(path)
    img = decode_image(path)
    assert img.mode == "RGB" and np.asarray(img).shape == (16, 24, 3)  # pixels still there after the file closed


def png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height pixels (a decompression bomb's signature)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + \
        chunk(b"IEND", b"")


@pytest.mark.parametrize("make, message", [
    (lambda p: b"", "empty image"),
    (lambda p: p.write_bytes(b"") or p, "empty file"),
    (lambda p: encode(Image.fromarray(rgb_pattern()), "JPEG")[:200], "not a readable image"),
    (lambda p: b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4, "not a readable image"),
    (lambda p: b"GIF89a not really", "not a readable image"),
    (lambda p: png_claiming(8_000, 8_000), "8000x8000 pixels exceeds the limit"),
    (lambda p: p.parent / "missing.jpg", "no such file"),
])
def test_bad_inputs_are_refused_with_a_reason(tmp_path, make, message):
    with pytest.raises(InvalidImage, match=message):
        decode_image(make(tmp_path / "f.jpg"))


def test_pillow_bomb_guard_is_reported_when_our_limit_is_higher():
    with pytest.raises(InvalidImage, match="decompression bomb"):
        decode_image(png_claiming(100_000, 100_000), max_pixels=10 ** 12)


def test_max_pixels_applies_to_ordinary_images():
    data = encode(Image.fromarray(rgb_pattern()), "PNG")
    assert decode_image(data, max_pixels=24 * 16).size == (24, 16)
    with pytest.raises(InvalidImage, match="24x16 pixels exceeds the limit of 383"):
        decode_image(data, max_pixels=383)


def test_elongated_image_resamples_only_the_crop(monkeypatch):
    spec = Preprocessing(resize=32, crop=32, mean=(0.5,) * 3, std=(0.5,) * 3)
    yy, xx = np.mgrid[0:40, 0:120]
    smooth = np.stack([xx * 2, yy * 6, (xx + yy)], axis=-1).astype(np.uint8)  # smooth: resampling differences are small
    img = Image.fromarray(smooth)
    plain = preprocess(img, spec)
    monkeypatch.setattr(pp, "MAX_RESIZE_FACTOR", 1)  # force the crop-region path on the same image
    boxed = preprocess(img, spec)
    assert boxed.shape == plain.shape == (3, 32, 32)
    assert np.abs(boxed - plain).max() < 0.05  # ~6/255 in pixel units: the same crop
    banner = Image.new("RGB", (40_000, 2), (10, 200, 30))  # resizing its short side naively: 640k x 32 pixels
    monkeypatch.undo()
    out = preprocess(banner, spec)
    np.testing.assert_allclose(out[:, 0, 0], (np.array([10, 200, 30]) / 255 - 0.5) / 0.5, atol=1e-6)
