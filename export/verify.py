"""`asymsearch export --verify`: an exported file still is what its manifest and its checkpoint say.

Three checks, each failing with a message that names the file and the mismatch:
1. the load-time checks every stage runs (`OnnxEmbedder`): sha256 of the file equals the manifest's, the graph's
   input and output match the manifest, a student manifest has a teacher id, one warm-up run succeeds;
2. the manifest's model id and teacher id equal the checkpoint's;
3. onnxruntime's output equals the checkpoint's torch output on *fresh* random inputs (a new seed every run,
   batch 1 and 3, the manifest's crop and a larger size, so the dynamic axes are exercised too) within the
   variant's tolerance. An int8 variant has no tolerance here (random pixels say little about quantisation);
   its agreement is recorded and its accuracy is what `export --report` measures on real images.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from asymsearch.core.errors import ManifestError
from asymsearch.core.ort import CPU_PROVIDER, OnnxEmbedder
from asymsearch.export.onnx_export import ExportMismatch
from asymsearch.training.checkpoint import load_checkpoint, model_from_checkpoint

VERIFY_TOLERANCE = {"fp32": 1e-4, "optimized": 1e-4, "ort": 1e-4, "fp16": 2e-2}  # int8: none


def verify_model(onnx_path: str | os.PathLike, checkpoint: str | os.PathLike | dict | None = None, *,
                 tolerance: float | None = None, samples: int = 2, seed: int | None = None) -> dict:
    """Run the checks above; returns {"path", "variant", "sha256", "max_abs_diff", "min_cosine", "tolerance"}.

    `checkpoint` may be a path or an already loaded checkpoint dict; None skips checks 2 and 3.
    `tolerance` overrides the variant's default; `seed=None` draws fresh inputs.
    """
    path = Path(onnx_path)
    embedder = OnnxEmbedder(path, providers=[CPU_PROVIDER])
    m = embedder.manifest
    result = {"path": str(path), "variant": m.variant, "sha256": m.sha256, "teacher_id": m.teacher_id}
    if checkpoint is None:
        return result
    ckpt = load_checkpoint(checkpoint) if not isinstance(checkpoint, dict) else checkpoint
    source = checkpoint if not isinstance(checkpoint, dict) else "the checkpoint"
    for key in ("model_id", "teacher_id"):
        if ckpt[key] != getattr(m, key):
            raise ManifestError(f"{path} was not exported from {source}: its manifest's {key} is "
                                f"{getattr(m, key)}, the checkpoint's {ckpt[key]}")
    model = model_from_checkpoint(ckpt).cpu().eval()
    rng = np.random.default_rng(seed)
    worst, cos = 0.0, 1.0
    sizes = [m.input_size, m.input_size + 16]
    for i in range(samples):
        x = rng.normal(size=(1 + 2 * (i % 2), 3, sizes[i % 2], sizes[i % 2])).astype(np.float32)
        with torch.no_grad():
            expected = model(torch.from_numpy(x)).numpy()
        got = embedder.embed_arrays(x)
        if got.shape != expected.shape:
            raise ExportMismatch(f"{path} returns shape {got.shape} where torch returns {expected.shape}")
        worst = max(worst, float(np.max(np.abs(got - expected))))
        cos = min(cos, float(np.min(np.sum(got * expected, axis=1))))  # both unit-norm
    limit = tolerance if tolerance is not None else VERIFY_TOLERANCE.get(m.variant)
    if limit is not None and not worst <= limit:
        raise ExportMismatch(f"{path} ({m.variant}) differs from its checkpoint's torch output by up to "
                             f"{worst:.3g} on fresh random inputs (tolerance {limit:g})")
    result.update(max_abs_diff=worst, min_cosine=cos, tolerance=limit)
    return result
