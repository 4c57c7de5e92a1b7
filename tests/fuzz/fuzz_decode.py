"""Fuzz target: image decoding and preprocessing (`asymsearch.core.preprocess`), the path every uploaded query
image takes on the server and every database image takes in the index builder.

Each input is the bytes of a would-be image file. It is decoded twice, as the server does (`min_side` = the
model's resize, so JPEG draft and deep-greyscale reduction apply) and exactly (`min_side=None`), with a spec and
a pixel limit picked from the input's CRC (so a saved input replays the same way). Invariants:

* `decode_image` and `decoded_nbytes` raise nothing but `InvalidImage`;
* they agree on acceptance: when `decode_image` succeeds, `decoded_nbytes` succeeded on the same bytes, and its
  figure covers at least the RGB image returned (the server's memory budget admits queries on that figure);
* `decode_image` returns an RGB image; `preprocess` of it raises nothing and gives float32 (3, crop, crop),
  finite, within the range the normalisation allows.

By hand (atheris; libFuzzer flags pass through; without a corpus folder a temporary one is seeded):

    python tests/fuzz/fuzz_decode.py -max_total_time=600 -artifact_prefix=tests/fuzz/regressions/decode/ CORPUS

`python tests/fuzz/fuzz_decode.py FILE...` replays files once (libFuzzer's behaviour for file arguments).
"""
from __future__ import annotations

import contextlib
import sys
import tempfile
import warnings
import zlib
from pathlib import Path

import numpy as np

try:
    import atheris
except ImportError:  # replaying saved inputs (tests/test_fuzz.py) needs no fuzzer
    atheris = None


def _instrumented():
    """Coverage instrumentation for the fuzzer run only: Pillow's Python plugins and our preprocessing."""
    if atheris is not None and __name__ == "__main__":
        return atheris.instrument_imports(include=["PIL", "asymsearch"])
    return contextlib.nullcontext()


with _instrumented():
    from asymsearch.core.errors import InvalidImage
    from asymsearch.core.manifest import Preprocessing
    from asymsearch.core.preprocess import decode_image, decoded_nbytes, preprocess
    from PIL import Image

    Image.init()  # imports every format plugin now, inside the instrumentation

SPECS = (Preprocessing(resize=32, crop=32, mean=(0.5,) * 3, std=(0.5,) * 3),  # the tests' tiny models
         Preprocessing(resize=40, crop=24, interpolation="bicubic"),  # ImageNet statistics, resize != crop
         Preprocessing(resize=8, crop=8, interpolation="nearest"))
MAX_PIXELS = (1 << 20, 1 << 20, 1 << 20, 4096)  # mostly room for what a mutated header claims; sometimes tight


def parameters(data: bytes) -> tuple[Preprocessing, int]:
    """The spec and pixel limit an input is checked with: a function of its bytes, so replays are identical."""
    h = zlib.crc32(data)
    return SPECS[h % len(SPECS)], MAX_PIXELS[(h >> 8) % len(MAX_PIXELS)]


def _value_range(spec: Preprocessing) -> tuple[float, float]:
    mean, std = np.asarray(spec.mean, np.float32), np.asarray(spec.std, np.float32)
    return float(((0 - mean) / std).min()), float(((1 - mean) / std).max())


def check(data: bytes) -> None:
    """Raise AssertionError (or let an unexpected exception out) when an invariant fails for `data`."""
    spec, max_pixels = parameters(data)
    for min_side in (spec.resize, None):
        try:
            nbytes = decoded_nbytes(data, max_pixels, min_side=min_side)
        except InvalidImage:
            nbytes = None
        try:
            img = decode_image(data, max_pixels, min_side=min_side)
        except InvalidImage:
            continue
        assert nbytes is not None, f"decode_image accepted (min_side={min_side}) what decoded_nbytes refused"
        assert img.mode == "RGB", f"decode_image returned mode {img.mode}, not RGB"
        assert nbytes >= img.width * img.height * 4, \
            f"decoded_nbytes {nbytes} < the {img.width}x{img.height} RGB image decode_image returned"
        x = preprocess(img, spec)
        assert x.shape == (3, spec.crop, spec.crop), f"preprocess gave shape {x.shape}"
        assert x.dtype == np.float32, f"preprocess gave dtype {x.dtype}"
        assert np.isfinite(x).all(), "preprocess gave NaN or infinite values"
        lo, hi = _value_range(spec)
        assert lo - 1e-4 <= float(x.min()) and float(x.max()) <= hi + 1e-4, (float(x.min()), float(x.max()))


def test_one_input(data: bytes) -> None:
    check(bytes(data))


def main(argv: list[str]) -> None:
    if atheris is None:
        sys.exit("fuzz_decode: atheris is not installed (pip install -e '.[dev]')")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from seeds import write_seeds

    folders = [a for a in argv[1:] if not a.startswith("-") and not Path(a).is_file()]
    files = [a for a in argv[1:] if not a.startswith("-") and Path(a).is_file()]
    if not files:  # fuzzing (not replaying): seed the first corpus folder, or a temporary one
        if folders:
            write_seeds(folders[0])
        else:
            argv = argv + [str(write_seeds(tempfile.mkdtemp(prefix="fuzz-decode-")))]
    warnings.simplefilter("ignore")  # Pillow warns on corrupt EXIF and the like: not an invariant
    atheris.Setup(argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
