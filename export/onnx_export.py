"""The export stage: a training checkpoint -> `NAME.onnx` plus its manifest `NAME.json`.

The ONNX model takes "images" (batch, 3, height, width) float32, already preprocessed as the manifest says,
and returns "embeddings" (batch, dim) unit-norm float32; batch, height and width are dynamic. Before the file
is published it must pass the ONNX checker and agree with torch on fresh random inputs.
"""
from __future__ import annotations

import dataclasses
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch

from asymsearch.core.config import config_path_for, save_config
from asymsearch.core.errors import UserError
from asymsearch.core.manifest import ModelManifest, Preprocessing, manifest_path_for, sha256_file
from asymsearch.core.spread import MAX_MEAN_COSINE, check_spread
from asymsearch.training.checkpoint import load_checkpoint, model_from_checkpoint

INPUT_NAME = "images"
OUTPUT_NAME = "embeddings"


class ExportMismatch(UserError):
    """onnxruntime's output differs from torch's by more than the tolerance."""


def _export_onnx(model: torch.nn.Module, path: Path, crop: int, opset: int) -> None:
    dummy = torch.randn(2, 3, crop, crop)
    with warnings.catch_warnings():
        # the legacy (TorchScript) exporter is deprecated in favour of dynamo; it is the one that handles
        # dynamic height/width for these models without guards, so it is used on purpose
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        # strided slices (EfficientNet-Lite's) are exported unfolded: a note for exporter developers, not users
        warnings.filterwarnings("ignore", message="Constant folding - Only steps=1", category=UserWarning)
        torch.onnx.export(
            model, (dummy,), str(path), dynamo=False, opset_version=opset, do_constant_folding=True,
            input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch", 2: "height", 3: "width"}, OUTPUT_NAME: {0: "batch"}})


def max_abs_difference(model: torch.nn.Module, onnx_path: Path, crop: int, samples: int, seed: int = 0) -> float:
    """Largest |torch - onnxruntime| over `samples` random inputs (batch 2 and 3 alternating, crop x crop)."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(onnx_path), sess_options=options, providers=["CPUExecutionProvider"])
    generator = torch.Generator().manual_seed(seed)
    worst = 0.0
    for i in range(samples):
        x = torch.randn(2 + i % 2, 3, crop, crop, generator=generator)
        with torch.no_grad():
            expected = model(x).numpy()
        got = session.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})[0]
        if got.shape != expected.shape:
            raise ExportMismatch(f"onnxruntime returned shape {got.shape}, torch {expected.shape}")
        worst = max(worst, float(np.max(np.abs(got - expected))))
    return worst


def _refuse_collapsed(model: torch.nn.Module, ckpt: dict, checkpoint: Path) -> None:
    """The collapse guard (core.spread) before anything is written, for a trained checkpoint (one with a training
    history): a model whose outputs for 8 different random inputs are one constant vector ignores its input (a
    spread training measured on held-out images and recorded in the checkpoint is judged again too; nearly parallel
    outputs for noise alone prove nothing, so only that one). An untrained checkpoint (`--epochs 0`: the zero-shot
    model, or random weights on purpose) exports as it is; `index build` still judges its embeddings of images."""
    if not ckpt.get("history"):
        return
    recorded = ckpt.get("config", {}).get("spread")
    if isinstance(recorded, dict) and recorded.get("mean_cosine", 0) > MAX_MEAN_COSINE:
        raise UserError(f"export of {checkpoint}: training recorded nearly parallel embeddings of held-out images "
                        f"(mean pairwise cosine {recorded['mean_cosine']:.4f}); the model collapsed")
    crop = int(ckpt["preprocessing"]["crop"])
    with torch.no_grad():
        out = model.eval()(torch.randn(8, 3, crop, crop, generator=torch.Generator().manual_seed(1))).numpy()
    check_spread(out, f"export of {checkpoint}", max_mean_cosine=1.01)  # only NaN and constant outputs here


def at_image_size(spec: Preprocessing, size: int) -> Preprocessing:
    """`spec` for a centre crop of `size` pixels, the resize scaled by the same factor (resize/crop kept).

    A larger test size than training can offset random-resized-crop training, which shows the network objects
    larger than a centre crop of the same size does (Touvron et al. 2019, "Fixing the train-test resolution
    discrepancy"); a smaller one serves cheaper. The convolutions and every head take any size, so only the manifest
    changes: the weights, and so the model and teacher ids, stay those of the checkpoint.
    """
    if size < 32:
        raise UserError(f"--image-size must be at least 32 pixels, not {size}")
    return dataclasses.replace(spec, crop=size, resize=round(spec.resize * size / spec.crop))


def export_checkpoint(checkpoint: str | os.PathLike, out: str | os.PathLike, *, opset: int = 17,
                      tolerance: float = 1e-4, samples: int = 3, image_size: int | None = None,
                      config: Any = None) -> ModelManifest:
    """Export `checkpoint` to the ONNX file `out` and write its manifest at `manifest_path_for(out)`.

    The ONNX is written under a temporary name, checked (`onnx.checker`, full check) and compared with torch
    on `samples` random inputs; it is renamed to `out` only when the largest absolute difference is within
    `tolerance` (otherwise `ExportMismatch`, and nothing is left behind). `image_size` replaces the trained
    crop in the manifest (`at_image_size`); the manifest's extra records the trained one. The config that made the
    export (`config`, e.g. the command's merged one; by default these arguments) is saved beside the manifest as
    `NAME.onnx.config.yaml` (`asymsearch.core.config`). Returns the manifest.
    """
    checkpoint, out = Path(checkpoint), Path(out)
    if manifest_path_for(out) == out:
        raise UserError(f"the ONNX output {out} would be overwritten by its own manifest; name it NAME.onnx")
    ckpt = load_checkpoint(checkpoint)
    model = model_from_checkpoint(ckpt).cpu()
    _refuse_collapsed(model, ckpt, checkpoint)
    spec = trained = Preprocessing.from_dict(ckpt["preprocessing"])
    if image_size is not None:
        spec = at_image_size(trained, image_size)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        _export_onnx(model, tmp, spec.crop, opset)
        try:
            onnx.checker.check_model(str(tmp), full_check=True)
        except onnx.checker.ValidationError as e:
            raise UserError(f"the exported model fails the ONNX checker: {str(e).strip().splitlines()[0]}") from None
        diff = max_abs_difference(model, tmp, spec.crop, samples)
        if not diff <= tolerance:
            raise ExportMismatch(f"onnxruntime differs from torch by up to {diff:.3g} (tolerance {tolerance:g}) "
                                 f"exporting {checkpoint}; try another opset")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    manifest = ModelManifest(
        role=ckpt["role"], architecture=dict(ckpt["arch"]), dim=int(ckpt["arch"]["dim"]), input_size=spec.crop,
        preprocessing=spec, opset=opset, sha256=sha256_file(out), teacher_id=ckpt["teacher_id"],
        model_id=ckpt["model_id"], input_name=INPUT_NAME, output_name=OUTPUT_NAME,
        extra={"checkpoint": str(checkpoint), "max_abs_diff": diff,
               **{k: ckpt["config"][k] for k in ("train_classes", "val_classes") if k in ckpt.get("config", {})},
               **({"trained_preprocessing": trained.to_dict()} if spec != trained else {}),
               # a teacher trained --compatible-with an old one (training.compat), or a student of such a teacher:
               # the old teacher ids whose indexes it may query (core.manifest.check_pairing)
               **({"compatible_with": [c]} if (c := (ckpt.get("config") or {}).get("compatible_with_teacher"))
                  else {})})
    if config is None:
        config = {"checkpoint": str(checkpoint.resolve()), "out": str(out.resolve()), "opset": opset,
                  "tolerance": tolerance, "image_size": image_size}
    save_config(config, config_path_for(out))
    manifest.save(manifest_path_for(out))
    return manifest
