"""Variants of an exported model: fp16, int8 (dynamic and static), the onnxruntime-optimised graph, ORT format.

Every variant is made from the verified fp32 export `NAME.onnx` (its *parent*) and gets its own file and its own
manifest, a copy of the parent's with `variant`, `sha256` and `parent_sha256` filled in, so the teacher id (and
the pairing with an index) is the same for all of them:

| variant        | file               | what                                                                        |
|----------------|--------------------|-----------------------------------------------------------------------------|
| `optimized`    | NAME.optimized.onnx| onnxruntime's graph optimisations (constant folding, Conv+BN+activation      |
|                |                    | fusion, ...; level "extended") applied once, offline, and saved             |
| `fp16`         | NAME.fp16.onnx     | weights and arithmetic in float16 (for GPUs); inputs and outputs stay float32|
|                |                    | (`keep_io_types`), so callers change nothing                                |
| `int8-dynamic` | NAME.int8-dynamic.onnx | int8 weights, activations quantised on the fly per batch (no calibration)|
| `int8-static`  | NAME.int8-static.onnx  | int8 weights (per channel) and activations (QDQ), activation ranges from |
|                |                    | a calibration sample of the user's images                                   |
| `ort`          | NAME.mobile.ort    | the ORT flatbuffer format onnxruntime's mobile runtime loads, optimised     |
|                |                    | offline at level "extended" (any CPU) or "all" (this x86 CPU only)          |

The embedding head (GeM pooling with its learnable power, the projection and the L2 normalisation) is kept in
float for the int8 variants by default (`HEAD_NODE`; in a joined student, every member's head): the power p in
x^p amplifies quantisation error and the projection is a negligible share of the compute. Every variant is
compared with its parent on fresh random inputs; the fp32-equivalent ones (`optimized`, `ort`) and `fp16` must
agree within a tolerance, the int8 ones record their agreement (their accuracy is measured on real images by
`asymsearch export --report`).
"""
from __future__ import annotations

import dataclasses
import os
import random
import re
import tempfile
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import onnx
import onnxruntime as ort

from asymsearch.core.data import list_image_folder, select_classes
from asymsearch.core.errors import InvalidImage, UserError
from asymsearch.core.manifest import VARIANTS, ModelManifest, manifest_path_for, sha256_file
from asymsearch.core.ort import OnnxEmbedder
from asymsearch.core.preprocess import decode_image, preprocess

STUDENT_VARIANTS = ("optimized", "fp16", "int8-dynamic", "int8-static", "ort")  # what `all` makes
# node names the torch exporter gives the embedding head: EmbeddingNet.head, or each member's in an EnsembleNet
HEAD_NODE = re.compile(r"^(?:/members\.\d+)?/head/")
TOLERANCE = {"optimized": 1e-4, "ort": 1e-4, "fp16": 2e-2}  # largest |variant - fp32| on random inputs
DEFAULT_CALIBRATION_IMAGES = 256


class VariantError(UserError):
    """A variant that cannot be made, or that differs from its parent beyond its tolerance."""


def variant_path(parent: str | os.PathLike, variant: str) -> Path:
    """`student.onnx` -> `student.fp16.onnx`, ...; the ORT format -> `student.mobile.ort` (its manifest is
    `student.mobile.json`, so it never collides with the parent's `student.json`)."""
    parent = Path(parent)
    if variant == "fp32":
        return parent
    if variant not in VARIANTS:
        raise UserError(f"unknown variant {variant!r}; choose from {', '.join(VARIANTS)}")
    if variant == "ort":
        return parent.with_name(f"{parent.stem}.mobile.ort")
    return parent.with_name(f"{parent.stem}.{variant}.onnx")


def parse_variants(spec: str) -> list[str]:
    """'fp16,int8-static' -> ['fp16', 'int8-static']; 'all' -> every student variant; '' or 'none' -> []."""
    spec = spec.strip()
    if spec in ("", "none"):
        return []
    if spec == "all":
        return list(STUDENT_VARIANTS)
    names = [s.strip() for s in spec.split(",") if s.strip()]
    unknown = [n for n in names if n not in STUDENT_VARIANTS]
    if unknown:
        raise UserError(f"unknown variant {unknown[0]!r}; choose from {', '.join(STUDENT_VARIANTS)} or all")
    return list(dict.fromkeys(names))


# ---------------------------------------------------------------------------------------------- calibration


@dataclasses.dataclass
class Calibration:
    """Where int8-static takes its activation ranges: `count` images sampled (seeded) from the class folders
    `classes` of the image folder `data`, prepared by the model's own preprocessing."""

    data: str | os.PathLike
    classes: str = "all"
    count: int = DEFAULT_CALIBRATION_IMAGES
    batch_size: int = 8
    seed: int = 0
    method: str = "minmax"  # minmax | percentile | entropy

    def sample(self) -> list[str]:
        root = Path(self.data)
        if not root.is_dir():
            raise UserError(f"calibration image folder not found: {root}")
        items = list_image_folder(root, select_classes(root, self.classes))
        if not items:
            raise UserError(f"no images to calibrate on in {root} (classes: {self.classes})")
        if self.count < 1:
            raise UserError(f"calibration needs at least one image, not {self.count}")
        rng = random.Random(self.seed)
        return [it.path for it in rng.sample(items, min(self.count, len(items)))]


def calibration_batches(calibration: Calibration, manifest: ModelManifest) -> Iterator[np.ndarray]:
    """Preprocessed pixel batches of the calibration sample; unreadable images are skipped."""
    batch: list[np.ndarray] = []
    for path in calibration.sample():
        try:
            batch.append(preprocess(decode_image(path), manifest.preprocessing))
        except InvalidImage:
            continue
        if len(batch) == calibration.batch_size:
            yield np.stack(batch)
            batch = []
    if batch:
        yield np.stack(batch)


class _Reader:
    """onnxruntime's CalibrationDataReader protocol over `calibration_batches`."""

    def __init__(self, batches: Callable[[], Iterator[np.ndarray]], input_name: str) -> None:
        self._make, self._input = batches, input_name
        self._it: Iterator[np.ndarray] | None = None
        self.seen = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._it is None:
            self._it = self._make()
        batch = next(self._it, None)
        if batch is None:
            return None
        self.seen += len(batch)
        return {self._input: batch}

    def rewind(self) -> None:
        self._it = None


# ------------------------------------------------------------------------------------------------ builders


def _preprocessed(parent: Path, workdir: Path) -> Path:
    """onnxruntime's recommended step before quantisation: shape inference and basic graph optimisation."""
    from onnxruntime.quantization import quant_pre_process

    out = workdir / "pre.onnx"
    try:
        quant_pre_process(str(parent), str(out), skip_symbolic_shape=False)
    except Exception:  # noqa: BLE001 - symbolic shape inference can fail on unusual graphs; the plain path still works
        quant_pre_process(str(parent), str(out), skip_symbolic_shape=True)
    return out


def _node_lists(model: onnx.ModelProto, float_head: bool, float_nodes: Sequence[str] = ()
                ) -> tuple[list[str] | None, list[str]]:
    """(nodes_to_quantize, nodes_to_exclude) for onnxruntime's quantizers: nodes whose name starts with one of
    `float_nodes` (and the head's, with `float_head`) stay float. The others are listed explicitly, because
    quantize_dynamic rewrites Gemm into MatMul + Add under new names, so excluding by name alone would miss it."""
    prefixes = tuple(float_nodes)
    kept = {n.name for n in model.graph.node
            if (prefixes and n.name.startswith(prefixes)) or (float_head and HEAD_NODE.match(n.name))}
    kept |= _unfused_bn(model)
    if not kept:
        return None, []
    return [n.name for n in model.graph.node if n.name not in kept], sorted(kept)


def _unfused_bn(model: onnx.ModelProto) -> set[str]:
    """BatchNormalization nodes that survived Conv+BN folding (a Slice or Pad between them, as in TF-"same"
    padded strided convolutions) and that Slice/Pad. Quantising them only adds a requantisation step around a
    float BatchNormalization; keeping them float cut the Recall@1 loss of the CUB-100 EfficientNet-Lite0 student
    from 4.0 to 2.8 points (docs/results/export_cub100.md)."""
    producer = {o: n for n in model.graph.node for o in n.output}
    names = set()
    for n in model.graph.node:
        if n.op_type == "BatchNormalization":
            names.add(n.name)
            before = producer.get(n.input[0])
            if before is not None and before.op_type in ("Slice", "Pad"):
                names.add(before.name)
    return names


def build_fp16(parent: Path, out: Path, **_) -> dict:
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(onnx.load(str(parent)), keep_io_types=True)
    onnx.save(model, str(out))
    return {"io_types": "float32", "converter": "onnxruntime.transformers.float16 (keep_io_types=True)"}


def build_int8_dynamic(parent: Path, out: Path, *, float_head: bool = True, float_nodes: Sequence[str] = (),
                       **_) -> dict:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory() as tmp:
        pre = _preprocessed(parent, Path(tmp))
        included, excluded = _node_lists(onnx.load(str(pre)), float_head, float_nodes)
        quantize_dynamic(str(pre), str(out), per_channel=True, weight_type=QuantType.QInt8,
                         nodes_to_quantize=included, nodes_to_exclude=excluded)
    return {"weights": "int8 per channel", "activations": "uint8, quantised per batch at run time",
            "float_nodes": len(excluded), "float_node_prefixes": list(float_nodes)}


def build_int8_static(parent: Path, out: Path, *, calibration: Calibration | None = None,
                      float_head: bool = True, float_nodes: Sequence[str] = (), manifest: ModelManifest,
                      **_) -> dict:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    if calibration is None:
        raise VariantError("int8-static needs calibration images: pass --calibration-data DIR")
    methods = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
               "entropy": CalibrationMethod.Entropy}
    if calibration.method not in methods:
        raise UserError(f"unknown calibration method {calibration.method!r}; choose from {', '.join(methods)}")
    reader = _Reader(lambda: calibration_batches(calibration, manifest), manifest.input_name)
    with tempfile.TemporaryDirectory() as tmp:
        pre = _preprocessed(parent, Path(tmp))
        included, excluded = _node_lists(onnx.load(str(pre)), float_head, float_nodes)
        quantize_static(str(pre), str(out), reader, quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        nodes_to_quantize=included, nodes_to_exclude=excluded,
                        calibrate_method=methods[calibration.method],
                        extra_options={"CalibTensorRangeSymmetric": False})
    if reader.seen == 0:
        raise VariantError(f"no readable calibration images in {calibration.data}")
    return {"weights": "int8 per channel", "activations": "uint8 per tensor (QDQ), static ranges",
            "calibration": {"data": str(calibration.data), "classes": calibration.classes, "images": reader.seen,
                            "method": calibration.method, "seed": calibration.seed},
            "float_nodes": len(excluded), "float_node_prefixes": list(float_nodes)}


def _save_optimised(parent: Path, out: Path, level: ort.GraphOptimizationLevel, ort_format: bool) -> None:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = level
    options.optimized_model_filepath = str(out)
    if ort_format:
        options.add_session_config_entry("session.save_model_format", "ORT")
    ort.InferenceSession(str(parent), sess_options=options, providers=["CPUExecutionProvider"])


def build_optimized(parent: Path, out: Path, **_) -> dict:
    _save_optimised(parent, out, ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED, ort_format=False)
    return {"optimization": "extended", "onnxruntime": ort.__version__,
            "note": "uses onnxruntime contrib ops (e.g. FusedConv): load with onnxruntime, not other runtimes"}


ORT_LEVELS = {"basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
              "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
              "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}


def build_ort(parent: Path, out: Path, *, ort_level: str = "extended", **_) -> dict:
    """onnxruntime applies no graph optimisation when it loads an ORT-format file, so the level chosen here is
    what runs: "extended" (fusions for the CPU provider, on any CPU: the default, for phones) or "all" (adds
    the NCHWc layout of this machine's x86 vector width: fastest here, not portable to ARM)."""
    if ort_level not in ORT_LEVELS:
        raise UserError(f"unknown ORT optimisation level {ort_level!r}; choose from {', '.join(ORT_LEVELS)}")
    _save_optimised(parent, out, ORT_LEVELS[ort_level], ort_format=True)
    return {"optimization": ort_level, "format": "ORT flatbuffer", "onnxruntime": ort.__version__}


BUILDERS = {"fp16": build_fp16, "int8-dynamic": build_int8_dynamic, "int8-static": build_int8_static,
            "optimized": build_optimized, "ort": build_ort}


# -------------------------------------------------------------------------------------------------- checking


def compare_with_parent(parent: OnnxEmbedder, child: OnnxEmbedder, *, samples: int = 2, seed: int | None = None
                        ) -> dict[str, float]:
    """Largest |child - parent| and smallest cosine between them over fresh random inputs (batches of 2 and 3 at
    the manifest's crop). `seed=None` draws fresh inputs each call."""
    rng = np.random.default_rng(seed)
    size = parent.manifest.input_size
    worst, cos = 0.0, 1.0
    for i in range(samples):
        x = rng.normal(size=(2 + i % 2, 3, size, size)).astype(np.float32)
        a, b = parent.embed_arrays(x), child.embed_arrays(x)
        if a.shape != b.shape:
            raise VariantError(f"{child.path} returns shape {b.shape}, its parent {a.shape}")
        worst = max(worst, float(np.max(np.abs(a - b))))
        norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
        cos = min(cos, float(np.min(np.sum(a * b, axis=1) / np.maximum(norms, 1e-12))))
    return {"max_abs_diff": worst, "min_cosine": cos}


def make_variant(parent: str | os.PathLike, variant: str, *, calibration: Calibration | None = None,
                 float_head: bool = True, float_nodes: Sequence[str] = (), ort_level: str = "extended",
                 samples: int = 2) -> ModelManifest:
    """Make `variant` of the fp32 export `parent` at `variant_path(parent, variant)`, with its manifest.

    The parent is loaded through `OnnxEmbedder` (so a parent that drifted from its manifest is refused); the
    variant is written under a temporary name, compared with the parent on fresh random inputs, and renamed
    into place with its manifest only when it loads and (for optimized, ort, fp16) agrees within `TOLERANCE`.
    """
    parent = Path(parent)
    if variant not in BUILDERS:
        raise UserError(f"unknown variant {variant!r}; choose from {', '.join(BUILDERS)}")
    source = OnnxEmbedder(parent, providers=["CPUExecutionProvider"], warmup=False)
    if source.manifest.variant != "fp32":
        raise VariantError(f"{parent} is itself a {source.manifest.variant} variant; make variants from the fp32 "
                           f"export")
    out = variant_path(parent, variant)
    tmp = out.with_name(f".{out.stem}.tmp{out.suffix}")
    tmp_manifest = manifest_path_for(tmp)
    try:
        extra = BUILDERS[variant](parent, tmp, calibration=calibration, float_head=float_head,
                                  float_nodes=float_nodes, ort_level=ort_level, manifest=source.manifest)
        manifest = dataclasses.replace(
            source.manifest, variant=variant, sha256=sha256_file(tmp), parent_sha256=source.manifest.sha256,
            extra={"parent": parent.name, **extra})
        manifest.save(tmp_manifest)
        child = OnnxEmbedder(tmp, providers=["CPUExecutionProvider"])
        agreement = compare_with_parent(source, child, samples=samples)
        limit = TOLERANCE.get(variant)
        if limit is not None and not agreement["max_abs_diff"] <= limit:
            raise VariantError(f"the {variant} variant of {parent} differs from it by up to "
                               f"{agreement['max_abs_diff']:.3g} (tolerance {limit:g}) on random inputs")
        manifest = dataclasses.replace(manifest, extra={**manifest.extra, "vs_parent_random_inputs": agreement})
        os.replace(tmp, out)
        manifest.save(manifest_path_for(out))
        return manifest
    finally:
        tmp.unlink(missing_ok=True)
        tmp_manifest.unlink(missing_ok=True)


def make_variants(parent: str | os.PathLike, variants: Sequence[str], **kw) -> dict[str, ModelManifest]:
    return {v: make_variant(parent, v, **kw) for v in variants}
