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


def _reference_8bit(a: np.ndarray, mode: str) -> np.ndarray:
    """The float64 formula the block-wise conversion must equal."""
    a = np.nan_to_num(a.astype(np.float64))
    if mode == "F":
        a = a * 255 if a.min() >= 0 and a.max() <= 1 else a
    elif not (mode == "I" and a.min() >= 0 and a.max() <= 255):
        a = a / 257.0
    return np.clip(np.rint(a), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("mode, values", [("I;16", (0, 65535)), ("I", (0, 255)), ("I", (-500, 70000)),
                                          ("F", (0.0, 1.0)), ("F", (-3.0, 400.0))])
def test_deep_greyscale_in_blocks_equals_the_float64_formula(monkeypatch, mode, values):
    monkeypatch.setattr(pp, "BLOCK_PIXELS", 1000)  # many blocks, the last one short
    rng = np.random.default_rng(7)
    lo, hi = values
    a = rng.uniform(lo, hi, (97, 61))
    if mode == "F":
        a = a.astype(np.float32)
        a[3, 5] = np.nan
        img = Image.fromarray(a, "F")
    elif mode == "I;16":
        img = Image.fromarray(a.astype(np.uint16))
    else:
        img = Image.fromarray(a.astype(np.int32), "I")
    assert img.mode == mode
    got = np.asarray(pp.to_rgb(img))
    expected = _reference_8bit(np.asarray(img), mode)
    assert got.shape == (97, 61, 3) and np.array_equal(got[..., 0], expected) and np.array_equal(got[..., 1], expected)


def _jpeg(w: int, h: int, seed: int = 0) -> bytes:
    small = Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h // 16, w // 16, 3), dtype=np.uint8))
    buf = io.BytesIO()
    small.resize((w, h), Image.Resampling.BILINEAR).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def test_large_jpeg_is_decoded_reduced_but_never_below_what_the_model_needs():
    spec = Preprocessing(resize=256, crop=224)
    data = _jpeg(2400, 1800)
    full, reduced = decode_image(data), decode_image(data, min_side=spec.resize)
    assert full.size == (2400, 1800) and reduced.size == (600, 450)  # 1/4: 1800 / 4 = 450 >= 256; 1/8 is too small
    assert min(reduced.size) >= spec.resize
    a, b = preprocess(full, spec), preprocess(reduced, spec)
    assert np.abs(a - b).mean() < 0.05  # normalised units: the same picture, resampled differently
    small = _jpeg(480, 400)  # under twice the resize: decoded exactly as without it
    assert np.array_equal(np.asarray(decode_image(small)), np.asarray(decode_image(small, min_side=256)))
    png = io.BytesIO()
    full.save(png, "PNG")
    assert decode_image(png.getvalue(), min_side=256).size == (2400, 1800)  # only JPEG has a reduced decode


@pytest.mark.parametrize("mode", ["RGB", "L", "I;16", "RGBA", "P", "F"])
def test_decoded_nbytes_is_what_decoding_holds(mode):
    """Pillow's own layout: RGB as 32-bit pixels; a deep greyscale image also holds its 8-bit copy."""
    buf = io.BytesIO()
    Image.new(mode, (300, 200)).save(buf, "TIFF" if mode == "F" else "PNG")
    own = {"RGB": 0, "L": 1, "P": 1, "I;16": 2 + 1, "RGBA": 4, "F": 4 + 1}[mode] * 300 * 200
    assert pp.decoded_nbytes(buf.getvalue()) == 300 * 200 * 4 + own
    jpeg = _jpeg(2400, 1800)
    assert pp.decoded_nbytes(jpeg) == 2400 * 1800 * 4
    assert pp.decoded_nbytes(jpeg, min_side=256) == 600 * 450 * 4  # what the reduced decode holds
    with pytest.raises(InvalidImage, match="exceeds the limit"):
        pp.decoded_nbytes(jpeg, max_pixels=1000)


def test_deep_greyscale_is_reduced_once_8_bit_when_the_model_needs_less():
    spec = Preprocessing(resize=64, crop=56)
    a = (np.add.outer(np.arange(400), np.arange(300)) * 97 % 65536).astype(np.uint16)  # 300 x 400, 16-bit
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "PNG")
    data = buf.getvalue()
    full, reduced = decode_image(data), decode_image(data, min_side=spec.resize)
    assert full.size == (300, 400) and reduced.size == (75, 100)  # factor 300 // 64 = 4
    assert pp.decoded_nbytes(data, min_side=64) == 300 * 400 * 3 + 75 * 100 * 4
    expected = np.asarray(full.convert("L").reduce(4))  # box means of the 8-bit image
    assert np.array_equal(np.asarray(reduced)[..., 0], expected)


def test_truncated_files_are_refused():
    data = _jpeg(800, 600)
    for cut in (len(data) // 3, len(data) - 3):
        with pytest.raises(InvalidImage, match="truncated"):
            decode_image(data[:cut], min_side=256)


MEMORY_PROBE = r"""
import sys, tracemalloc
from asymsearch.core.preprocess import decode_image
def peak():  # this process's own peak RSS (ru_maxrss would carry the forking parent's over exec)
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:"))
data = open(sys.argv[1], "rb").read()
before = peak()
tracemalloc.start()
img = decode_image(data)
traced = tracemalloc.get_traced_memory()[1]
tracemalloc.stop()
after = peak()
assert img.mode == "RGB" and img.size == (int(sys.argv[2]), int(sys.argv[2]))
print(traced, after - before)
"""


def test_decoding_a_16_bit_image_peaks_at_a_small_multiple_of_its_8_bit_rgb_size(tmp_path):
    """A 2500^2 16-bit PNG, decoded in a fresh process: numpy / Python allocations (tracemalloc) stay under one
    8-bit RGB image, and the process's peak RSS (which also sees Pillow's own buffers) grows by at most 4x it. The
    float64 conversion this replaces took 8 bytes a pixel in numpy alone (2.7x the RGB size; +1,079 MB for a
    6300^2 one)."""
    import subprocess
    import sys
    side = 2500
    a = (np.arange(side * side, dtype=np.uint32) % 65536).astype(np.uint16).reshape(side, side)
    Image.fromarray(a).save(tmp_path / "deep.png", compress_level=1)
    rgb = side * side * 3
    r = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(tmp_path / "deep.png"), str(side)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    traced, rss = map(int, r.stdout.split())
    assert traced < rgb, (traced, rgb)
    assert 0 < rss < 4 * rgb, (rss, rgb)
