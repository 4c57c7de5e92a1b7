"""Student tiers: several query models of different cost on one index, each paired with it and gated.

A tier is a name (`server`, `mobile`, ...) and a student ONNX. Every tier's student belongs to the teacher that
embedded the index (`check_pairing`), so all of them query the same vectors. At load each tier is measured: its
cost (GFLOPs per image, counted from the ONNX graph at its input size; the milliseconds one image takes, timed on
this machine) and, when the index has a probe set (`asymsearch.index.probe`), its gate figures (asymmetric
Recall@1 / mAP against the teacher's symmetric ones). A tier whose Recall@1 ratio is below `min_ratio` is refused
with both figures (`GateRefused`): nothing is loaded and the tier it would replace keeps serving.

`--student NAME=MODEL.onnx` names a tier; a bare path is the single tier "default".
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
import re
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from asymsearch.core.errors import UserError
from asymsearch.core.manifest import check_pairing
from asymsearch.core.ort import OnnxEmbedder
from asymsearch.index.probe import DEFAULT_MIN_RATIO, GateResult, ProbeSet, check_student, find_probe, require_probe

log = logging.getLogger(__name__)

DEFAULT_TIER = "default"
TIER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
TIMING_RUNS = 5  # single-image runs timed at load (after the warm-up); the median is reported


@dataclasses.dataclass(frozen=True)
class GatePolicy:
    """When a tier is gated. `min_ratio`: the least student / teacher Recall@1 ratio that loads. `required`: an
    index without a probe set refuses the tier (`NoProbeSet`); else such a tier loads ungated (`gated` False)
    and the log says so. `min_ratio` None measures the figures where a probe set exists and refuses nothing."""

    min_ratio: float | None = None
    required: bool = False

    def __post_init__(self) -> None:
        if self.min_ratio is not None and not 0 <= self.min_ratio <= 10:
            raise UserError(f"--min-ratio must be between 0 and 10, got {self.min_ratio:g}")
        if self.required and self.min_ratio is None:
            object.__setattr__(self, "min_ratio", DEFAULT_MIN_RATIO)


@dataclasses.dataclass(frozen=True)
class Tier:
    """One query model of the served index, with its cost and gate figures as measured at load."""

    name: str
    student: OnnxEmbedder
    gflops: float = 0.0
    measured_ms: float = 0.0
    gate: GateResult | None = None

    @property
    def student_id(self) -> str:
        return self.student.manifest.model_id

    @property
    def image_size(self) -> int:
        return self.student.manifest.input_size

    def info(self) -> dict[str, Any]:
        """The fields of `StudentTier` in Info."""
        import json
        g = self.gate
        return {"name": self.name, "student_id": self.student_id, "gflops": self.gflops,
                "measured_ms": self.measured_ms, "image_size": self.image_size,
                "architecture": json.dumps(self.student.manifest.architecture, sort_keys=True),
                "gated": g is not None, "gate_recall_at_1": g.recall_at_1 if g else 0.0,
                "gate_teacher_recall_at_1": g.teacher_recall_at_1 if g else 0.0,
                "gate_map": g.map if g else 0.0, "gate_teacher_map": g.teacher_map if g else 0.0}


def check_tier_name(name: str) -> str:
    if not TIER_NAME.match(name or ""):
        raise UserError(f"tier name {name!r} is not valid: 1 to 64 letters, digits, '_', '.', '-', starting with a "
                        f"letter or digit")
    return name


def parse_student_specs(specs: Sequence[str | os.PathLike]) -> list[tuple[str, Path]]:
    """`--student` values -> (tier, path): `NAME=MODEL.onnx`, or a bare path (the tier "default"). Names must be
    unique; a bare path is allowed only alone."""
    out: list[tuple[str, Path]] = []
    for spec in specs:
        text = os.fspath(spec)
        name, sep, path = text.partition("=")
        if not sep or "/" in name or os.sep in name or not name:
            name, path = DEFAULT_TIER, text
        out.append((check_tier_name(name), Path(path)))
    names = [n for n, _ in out]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise UserError(f"tier {dup[0]!r} is given twice (--student NAME=MODEL.onnx names each tier once; a bare "
                        f"path is the tier {DEFAULT_TIER!r})")
    if not out:
        raise UserError("give at least one --student")
    return out


def onnx_gflops(path: str | os.PathLike, size: int) -> float:
    """Multiply-adds x 2 of the convolutions and matrix products of one (3, size, size) image, in GFLOPs, from
    the ONNX graph with its shapes inferred (quantized Conv / MatMul count like float ones). 0 (logged) when the
    graph cannot be read or its shapes not inferred."""
    import onnx
    from onnx import shape_inference

    try:
        model = onnx.load(str(path))
        dims = model.graph.input[0].type.tensor_type.shape.dim
        for d, v in zip(dims, (1, 3, size, size)):
            d.ClearField("dim_param")
            d.dim_value = v
        model = shape_inference.infer_shapes(model)
    except Exception as e:  # noqa: BLE001 - onnx raises many kinds; the cost is informative only
        log.warning("cannot count the GFLOPs of %s: %s", path, e)
        return 0.0
    shapes: dict[str, list[int]] = {}
    for vi in [*model.graph.value_info, *model.graph.input, *model.graph.output]:
        shapes[vi.name] = [d.dim_value for d in vi.type.tensor_type.shape.dim]
    for init in model.graph.initializer:
        shapes[init.name] = list(init.dims)
    flops = 0
    for node in model.graph.node:
        out = shapes.get(node.output[0]) if node.output else None
        if not out or not all(out):
            continue
        if node.op_type in ("Conv", "ConvInteger", "QLinearConv"):
            w = shapes.get(node.input[3] if node.op_type == "QLinearConv" else node.input[1])
            if w and all(w):
                flops += 2 * math.prod(out) * math.prod(w[1:])
        elif node.op_type in ("MatMul", "MatMulInteger", "QLinearMatMul", "Gemm"):
            a = shapes.get(node.input[0])
            if a and all(a):
                trans_a = any(att.name == "transA" and att.i for att in node.attribute)
                flops += 2 * math.prod(out) * (a[-2] if trans_a and len(a) >= 2 else a[-1])
    return flops / 1e9


def measure_ms(student: OnnxEmbedder) -> float:
    """Median milliseconds of embedding one image of the student's input size (already warmed up at load)."""
    size = student.manifest.input_size
    x = np.zeros((1, 3, size, size), np.float32)
    times = []
    for _ in range(TIMING_RUNS):
        start = time.perf_counter()
        student.embed_arrays(x)
        times.append((time.perf_counter() - start) * 1e3)
    return float(np.median(times))


def gate_tier(tier: Tier, index: Any, policy: GatePolicy, probe: ProbeSet | None = None,
              max_pixels: int | None = None) -> Tier:
    """`tier` with its gate figures on `index`'s probe set (or `probe`), refused (`GateRefused`, both figures in
    the message) below `policy.min_ratio`; ungated when the index has no probe set and the policy allows it."""
    if probe is None:
        probe = require_probe(index) if policy.required else find_probe(index)
    if probe is None:
        log.warning("tier %r (student %s) is not gated: the index %s has no probe set (built before probe sets, or "
                    "kept in Milvus); Info reports it with gated false", tier.name, tier.student_id,
                    getattr(index, "root", getattr(index, "folder", "")),
                    extra={"event": "tier_ungated", "tier": tier.name, "student_id": tier.student_id})
        return dataclasses.replace(tier, gate=None)
    result = check_student(tier.student, probe, **({"max_pixels": max_pixels} if max_pixels else {}))
    if policy.min_ratio is not None:
        result.require(policy.min_ratio, f"tier {tier.name!r} ({tier.student.path}, student {tier.student_id})")
    log.info("tier %r (student %s): %s", tier.name, tier.student_id, result.summary(),
             extra={"event": "tier_gated", "tier": tier.name, "student_id": tier.student_id, **result.to_dict()})
    return dataclasses.replace(tier, gate=result)


def load_tier(name: str, path: str | os.PathLike, index: Any, policy: GatePolicy = GatePolicy(), *,
              intra_op_threads: int = 0, probe: ProbeSet | None = None, max_pixels: int | None = None) -> Tier:
    """Open the student `path` as tier `name`: pairing with `index` (`PairingError` naming both teacher ids),
    cost, then the gate (`gate_tier`)."""
    check_tier_name(name)
    student = OnnxEmbedder(path, intra_op_threads=intra_op_threads)
    check_pairing(student.manifest, index.manifest, query_name=f"tier {name!r} ({path}, student "
                  f"{student.manifest.model_id})")
    tier = Tier(name, student, onnx_gflops(path, student.manifest.input_size), measure_ms(student))
    return gate_tier(tier, index, policy, probe, max_pixels)


def tier_of(student: OnnxEmbedder, name: str = DEFAULT_TIER) -> Tier:
    """An already opened student as a tier, with its cost measured (the gate is the engine's)."""
    return Tier(check_tier_name(name), student, onnx_gflops(student.path, student.manifest.input_size),
                measure_ms(student))


__all__ = ["DEFAULT_TIER", "GatePolicy", "Tier", "check_tier_name", "gate_tier", "load_tier", "measure_ms",
           "onnx_gflops", "parse_student_specs", "tier_of"]
