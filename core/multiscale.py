"""Multi-scale descriptors at inference, torch-free (onnxruntime only), for index build and eval.

An image is embedded at scales 1, 1/√2 and 1/2 of the model's input size (the same view: resize and crop are
both scaled), the embeddings are averaged and the mean is L2-normalised again. This needs a model exported with
dynamic spatial axes (every asymsearch export has them; every head accepts any size).

Use `MultiScaleEmbedder(OnnxEmbedder(path))` wherever an `OnnxEmbedder` is used: it has the same
`embed_images`, `embed_arrays`, `dim`, `manifest`, `teacher_id`. With `flip=True` every scale's pixels are also
embedded mirrored left-right (the prepared crop, reversed along its width) and the mirrored embeddings join the
mean: the flip-averaged descriptor, for a database embedded offline by the teacher (`--flip` of index build and
eval; the manifest records it as `build["flip"]`, read by `index_flip`). `embed_images` and `embed_scaled` prepare the
pixels of every scale from the image (exact); `embed_arrays` resamples pixels already prepared at scale 1
(close, not identical: resampling after the crop is not resizing before it).

Pipelines that decode an image once and prepare its pixels for several models (`asymsearch.index.pipeline`) use
`pixel_specs(embedder)` (what to prepare) and `embed_prepared(embedder, arrays)` (one array per spec), which work
for a plain `OnnxEmbedder` and a `MultiScaleEmbedder` alike. An index records the scales its database was embedded
at in its manifest (`build["scales"]`, read by `index_scales`); `index add` embeds new images at the same scales.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np
from PIL import Image

from asymsearch.core.errors import UserError
from asymsearch.core.manifest import Preprocessing
from asymsearch.core.preprocess import preprocess_batch

MULTISCALE_SCALES = (1.0, 1 / math.sqrt(2), 0.5)
MIN_SIZE = 16  # pixels: no scale goes below this


def scaled_preprocessing(spec: Preprocessing, scale: float) -> Preprocessing:
    """The same view at `scale`: resize and crop both multiplied (rounded), at least MIN_SIZE pixels."""
    if scale <= 0:
        raise UserError(f"scales must be positive, not {scale}")
    crop = max(MIN_SIZE, round(spec.crop * scale))
    resize = max(crop, round(spec.resize * scale))
    return dataclasses.replace(spec, resize=resize, crop=crop)


def _normalise(x: np.ndarray) -> np.ndarray:
    return (x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)).astype(np.float32)


def _resize_arrays(batch: np.ndarray, size: int) -> np.ndarray:
    """(N,3,H,W) float32 -> (N,3,size,size) by bilinear resampling of each channel (PIL mode "F")."""
    n, c = batch.shape[:2]
    out = np.empty((n, c, size, size), np.float32)
    for i in range(n):
        for j in range(c):
            img = Image.fromarray(np.ascontiguousarray(batch[i, j], np.float32), mode="F")
            out[i, j] = np.asarray(img.resize((size, size), Image.BILINEAR), np.float32)
    return out


SINGLE_SCALE = (1.0,)


def index_scales(manifest) -> tuple[float, ...]:
    """The scales an index's database was embedded at (`IndexManifest.build["scales"]`; absent: scale 1 only)."""
    return tuple(float(s) for s in manifest.build.get("scales", SINGLE_SCALE))


def index_flip(manifest) -> bool:
    """Whether an index's database was embedded flip-averaged (`IndexManifest.build["flip"]`; absent: no)."""
    return bool(manifest.build.get("flip", False))


def with_scales(embedder, scales: Sequence[float] | None, flip: bool = False):
    """`embedder` itself for a single scale 1 (or None) without flip, else a `MultiScaleEmbedder`."""
    if not flip and (scales is None or tuple(float(s) for s in scales) == SINGLE_SCALE):
        return embedder
    return MultiScaleEmbedder(embedder, SINGLE_SCALE if scales is None else scales, flip=flip)


def pixel_specs(embedder) -> list[Preprocessing]:
    """The pixel preparations `embed_prepared(embedder, ...)` takes, one array each."""
    if isinstance(embedder, MultiScaleEmbedder):
        return list(embedder.specs)
    return [embedder.manifest.preprocessing]


def embed_prepared(embedder, arrays: Sequence[np.ndarray]) -> np.ndarray:
    """Embeddings from the arrays prepared with `pixel_specs(embedder)`, in that order."""
    if isinstance(embedder, MultiScaleEmbedder):
        return embedder.embed_scaled(arrays)
    return embedder.embed_arrays(arrays[0])


def _check_dynamic_size(embedder, specs: Sequence[Preprocessing]) -> None:
    """A model whose graph fixes its input height/width cannot take the other scales: say so before any image."""
    session = getattr(embedder, "session", None)
    if session is None:
        return
    fixed = [d for d in session.get_inputs()[0].shape[2:] if isinstance(d, int)]
    other = sorted({s.crop for s in specs} - set(fixed)) if fixed else []
    if other:
        raise UserError(f"{getattr(embedder, 'path', 'the model')} has a fixed {'x'.join(map(str, fixed))} input, so "
                        f"it cannot embed the multi-scale crops {', '.join(map(str, other))} px; re-export it with "
                        f"dynamic height/width (asymsearch export does) or leave out --multiscale")


class MultiScaleEmbedder:
    """Wraps an embedder (`OnnxEmbedder`): embeddings are the re-normalised mean over `scales` (and, with `flip`,
    over each scale's mirrored pixels too)."""

    def __init__(self, embedder, scales: Sequence[float] = MULTISCALE_SCALES, flip: bool = False) -> None:
        if not scales:
            raise UserError("give at least one scale")
        self.embedder = embedder
        self.flip = bool(flip)
        self.scales = tuple(float(s) for s in scales)
        self.specs = [scaled_preprocessing(embedder.manifest.preprocessing, s) for s in self.scales]
        _check_dynamic_size(embedder, self.specs)

    @property
    def path(self):
        return self.embedder.path

    @property
    def dim(self) -> int:
        return self.embedder.dim

    @property
    def manifest(self):
        return self.embedder.manifest

    @property
    def teacher_id(self) -> str:
        return self.embedder.teacher_id

    def embed_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        """Each scale prepares its pixels from the original image (resize + centre crop at that scale)."""
        images = list(images)
        if not images:
            return np.zeros((0, self.dim), np.float32)
        return _normalise(sum(self._embed(preprocess_batch(images, spec)) for spec in self.specs))

    def _embed(self, batch: np.ndarray) -> np.ndarray:
        """The sum of the batch's embeddings and, with flip, its mirrored copy's."""
        out = self.embedder.embed_arrays(batch)
        if self.flip:
            out = out + self.embedder.embed_arrays(np.ascontiguousarray(batch[..., ::-1]))
        return out

    def embed_scaled(self, batches: Sequence[np.ndarray]) -> np.ndarray:
        """One pixel batch per scale, batch i prepared with `self.specs[i]` (`preprocess_batch`): the exact
        multi-scale descriptor for pipelines that prepare pixels themselves."""
        if len(batches) != len(self.specs):
            raise ValueError(f"need {len(self.specs)} batches (one per scale), got {len(batches)}")
        if batches[0].shape[0] == 0:
            return np.zeros((0, self.dim), np.float32)
        return _normalise(sum(self._embed(b) for b in batches))

    def embed_arrays(self, batch: np.ndarray) -> np.ndarray:
        """Already preprocessed pixels (N,3,S,S) at the model's size: the smaller scales resample them."""
        if batch.shape[0] == 0:
            return np.zeros((0, self.dim), np.float32)
        total = 0
        for spec, scale in zip(self.specs, self.scales):
            size = spec.crop if scale != 1.0 else batch.shape[-1]
            arr = batch if size == batch.shape[-1] else _resize_arrays(batch, size)
            total = total + self._embed(arr)
        return _normalise(total)
