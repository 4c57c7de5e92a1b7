"""What `asymsearch bench serve` measures with: real models and an index, made through the stages' public APIs.

By default the teacher is a zero-shot EfficientNet-Lite2 (its offline ImageNet weights, global average pooling,
1280-d) at its own input size (260 px) and the student an EfficientNet-Lite0 (ImageNet weights and a GeM head
into the teacher's 1280 dimensions) at its own, smaller size (224 px). Neither is trained: speed does not depend
on the weights, only on the networks and their input sizes, which are those a trained pair has. Both are written
as checkpoints (`training.checkpoint`), exported with `export.onnx_export.export_checkpoint` (checked against torch
as every export is), and the index is built from the database images with `index.build.build_index`.

Everything is made once in the work folder and reused when it is there (the models are matched by their ids).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable, Sequence

from asymsearch.core.data import list_image_folder, select_classes
from asymsearch.core.errors import UserError
from asymsearch.core.manifest import IndexManifest, ModelManifest, Preprocessing, check_pairing, manifest_path_for

TEACHER_BACKBONE = "efficientnet_lite2"
STUDENT_BACKBONE = "efficientnet_lite0"
LITE_CHANNELS = 1280  # every EfficientNet-Lite ends in a 1280-channel 1x1 convolution


@dataclasses.dataclass
class Artifacts:
    student: Path  # ONNX with its manifest
    index: Path  # index folder or versioned root
    query_paths: list[str]
    source: str  # "real models made here", or "given"
    teacher: Path | None = None


def _own_size_spec(backbone: str, size: int | None = None) -> Preprocessing:
    from asymsearch.training.backbones import backbone_preprocessing
    own = backbone_preprocessing(backbone)
    size = int(size or own["image_size"])
    return Preprocessing(resize=size, crop=size, mean=tuple(own["mean"]), std=tuple(own["std"]))


def make_real_models(work: Path, *, student_size: int | None = None, log: Callable[[str], None] = print
                     ) -> tuple[Path, Path]:
    """(teacher ONNX, student ONNX): zero-shot Lite2 at 260 px and Lite0 at `student_size` (default its own 224),
    made as checkpoints and exported through the export API; reused when the work folder has them."""
    import torch

    from asymsearch.export.onnx_export import export_checkpoint
    from asymsearch.training.checkpoint import load_checkpoint, make_checkpoint, save_checkpoint
    from asymsearch.training.models import build_model

    work.mkdir(parents=True, exist_ok=True)
    t_ckpt_path, s_ckpt_path = work / "teacher-lite2.pt", work / f"student-lite0-{student_size or 'own'}.pt"
    if not t_ckpt_path.is_file():
        log(f"making the teacher: zero-shot {TEACHER_BACKBONE} (ImageNet weights, GAP) -> {t_ckpt_path}")
        arch = {"backbone": TEACHER_BACKBONE, "head": "gap", "dim": LITE_CHANNELS, "pretrained": "imagenet"}
        model = build_model(arch).eval()
        save_checkpoint(make_checkpoint(model, role="teacher", arch=arch, preprocessing=_own_size_spec(
            TEACHER_BACKBONE), config={"made_by": "asymsearch.bench.artifacts (zero-shot, untrained)"}), t_ckpt_path)
    teacher = load_checkpoint(t_ckpt_path)
    student = load_checkpoint(s_ckpt_path) if s_ckpt_path.is_file() else None
    if student is None or student["teacher_id"] != teacher["model_id"]:
        log(f"making the student: {STUDENT_BACKBONE} (ImageNet weights, GeM head, untrained) -> {s_ckpt_path}")
        arch = {"backbone": STUDENT_BACKBONE, "head": "gem", "dim": LITE_CHANNELS, "pretrained": "imagenet"}
        torch.manual_seed(0)
        model = build_model(arch).eval()
        save_checkpoint(make_checkpoint(model, role="student", arch=arch,
                                        preprocessing=_own_size_spec(STUDENT_BACKBONE, student_size),
                                        teacher_id=teacher["model_id"],
                                        config={"made_by": "asymsearch.bench.artifacts (untrained)"}), s_ckpt_path)
        student = load_checkpoint(s_ckpt_path)
    out = []
    for ckpt_path, ckpt in ((t_ckpt_path, teacher), (s_ckpt_path, student)):
        onnx_path = ckpt_path.with_suffix(".onnx")
        mpath = manifest_path_for(onnx_path)
        if not (onnx_path.is_file() and mpath.is_file() and ModelManifest.load(mpath).model_id == ckpt["model_id"]):
            log(f"exporting {ckpt_path.name} -> {onnx_path.name}")
            export_checkpoint(ckpt_path, onnx_path, samples=1)
        out.append(onnx_path)
    return out[0], out[1]


def ensure_index(teacher: Path, images: Path, out: Path, *, classes: str = "second-half",
                 log: Callable[[str], None] = print) -> Path:
    """The index of `images` (those `classes`) embedded by `teacher`, built with `build_index` unless `out` already
    holds one of this teacher."""
    from asymsearch.index.build import build_index

    manifest_file = out / "manifest.json"
    teacher_id = ModelManifest.load(manifest_path_for(teacher)).teacher_id
    if manifest_file.is_file() and IndexManifest.load(manifest_file).teacher_id == teacher_id:
        return out
    log(f"building the index of {images} ({classes}) with {teacher.name} -> {out}")
    build_index(teacher, images, out, classes=classes, overwrite=True, progress=True)
    return out


def query_paths(images: Path, count: int, classes: str = "first-half") -> list[str]:
    """`count` query images spread evenly over `classes` of `images` (the half the index does not hold)."""
    items = list_image_folder(images, select_classes(images, classes))
    if not items:
        raise UserError(f"no images in {images} ({classes})")
    step = max(1, len(items) // count)
    return [it.path for it in items[::step][:count]]


def prepare(work: Path, *, images: Path, student: Path | None = None, teacher: Path | None = None,
            index: Path | None = None, student_size: int | None = None, query_images: int = 64,
            log: Callable[[str], None] = print) -> Artifacts:
    """The artifacts of one bench serve run: the given ones, else real models made here (see the module)."""
    if not Path(images).is_dir():
        raise UserError(f"query image folder not found: {images}")
    if index is not None and student is None:
        raise UserError("with --index, give the --student that serves it")
    if student is not None and index is None and teacher is None:
        raise UserError("with --student, give --index, or --teacher to build one")
    if student is None and teacher is not None:
        raise UserError("with --teacher, give its --student too (or neither, for the default real models)")
    source = "given"
    if student is None:
        teacher, student = make_real_models(work / "models", student_size=student_size, log=log)
        source = f"made here: zero-shot {TEACHER_BACKBONE} teacher, untrained {STUDENT_BACKBONE} student"
    student, teacher = _as_onnx(Path(student), work, log), (_as_onnx(Path(teacher), work, log) if teacher else None)
    if index is None:
        teacher_id = ModelManifest.load(manifest_path_for(teacher)).model_id
        index = ensure_index(teacher, Path(images), work / f"index-{teacher_id}", log=log)
    check_pairing(ModelManifest.load(manifest_path_for(student)), IndexManifest.load(_index_manifest(Path(index))),
                  query_name=str(student), database_name=str(index))
    return Artifacts(student=student, index=Path(index), teacher=teacher, source=source,
                     query_paths=query_paths(Path(images), query_images))


def _as_onnx(model: Path, work: Path, log: Callable[[str], None]) -> Path:
    """An ONNX model as it is; a checkpoint exported (once) into the work folder through the export API."""
    if model.suffix == ".onnx":
        return model
    from asymsearch.export.onnx_export import export_checkpoint
    from asymsearch.training.checkpoint import load_checkpoint
    ckpt = load_checkpoint(model)
    out = work / "models" / f"{model.stem}-{ckpt['model_id']}.onnx"
    if not (out.is_file() and manifest_path_for(out).is_file()):
        log(f"exporting {model} -> {out}")
        export_checkpoint(model, out, samples=1)
    return out


def _index_manifest(index: Path) -> Path:
    from asymsearch.index.versions import resolve_index_folder
    folder, _ = resolve_index_folder(index)
    return Path(folder) / "manifest.json"


def describe(paths: Sequence[Path]) -> dict[str, dict]:
    """Architecture, input size and ids of each ONNX model, from its manifest."""
    out = {}
    for p in paths:
        m = ModelManifest.load(manifest_path_for(p))
        out[str(p)] = {"role": m.role, "architecture": m.architecture, "input_size": m.preprocessing.crop,
                       "dim": m.dim, "model_id": m.model_id, "teacher_id": m.teacher_id}
    return out
