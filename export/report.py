"""What each variant of an exported student costs and loses, measured in one run.

For every variant: file size, per-image latency and throughput at batch 1 and 16 on this machine's CPU (the
variants take turns, see `core.timing`), and its asymmetric retrieval quality on a labelled image folder —
Recall@K and mAP of the variant's query embeddings against a database embedded by the teacher (or, without a
teacher, by the fp32 student itself) — with the drop in points against the fp32 student. A variant that loses
more than `max_recall_drop` points of Recall@1 is marked `lossy`.

onnxruntime only (no torch): the numbers are those the server and the on-device client will see.
"""
from __future__ import annotations

import dataclasses
import os
import random
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from asymsearch.core.data import list_image_folder, select_classes
from asymsearch.core.errors import InvalidImage, UserError
from asymsearch.core.manifest import Preprocessing, check_pairing, require_teacher
from asymsearch.core.metrics import DEFAULT_KS, retrieval_metrics
from asymsearch.core.ort import CPU_PROVIDER, OnnxEmbedder
from asymsearch.core.preprocess import decode_image, preprocess
from asymsearch.core.timing import interleaved_timings, summarise

DEFAULT_BATCH_SIZES = (1, 16)
DEFAULT_MAX_RECALL_DROP = 1.0  # points of Recall@1


@dataclasses.dataclass
class ReportConfig:
    data: str | os.PathLike | None = None  # labelled image folder for the accuracy part (None: speed only)
    classes: str = "second-half"
    teacher: str | os.PathLike | None = None  # teacher ONNX embedding the database (None: the fp32 student)
    max_images: int | None = None  # a seeded sample of the folder's images (None: all of them)
    batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES
    rounds: int = 10
    threads: int = 1  # onnxruntime intra-op threads for every variant
    max_recall_drop: float = DEFAULT_MAX_RECALL_DROP
    ks: Sequence[int] = DEFAULT_KS
    seed: int = 0


def load_images(config: ReportConfig) -> tuple[list[str], list[str]]:
    """(paths, labels) of the evaluation images, a seeded sample when `max_images` is set."""
    root = Path(config.data)
    if not root.is_dir():
        raise UserError(f"evaluation image folder not found: {root}")
    items = list_image_folder(root, select_classes(root, config.classes))
    if config.max_images is not None and len(items) > config.max_images:
        items = sorted(random.Random(config.seed).sample(items, config.max_images), key=lambda it: it.path)
    if len(items) < 2:
        raise UserError(f"{root} (classes: {config.classes}) needs at least two images to evaluate retrieval")
    return [it.path for it in items], [it.label for it in items]


def embed_all(paths: Sequence[str], models: Mapping[str, OnnxEmbedder], batch_size: int = 32
              ) -> tuple[dict[str, np.ndarray], list[int]]:
    """Decode each image once, prepare it once per distinct preprocessing, embed it with every model.
    Returns ({name: (N, dim)}, indices of the readable images)."""
    specs: dict[Preprocessing, list[str]] = {}
    for name, model in models.items():
        specs.setdefault(model.manifest.preprocessing, []).append(name)
    blocks: dict[str, list[np.ndarray]] = {name: [] for name in models}
    kept: list[int] = []
    for start in range(0, len(paths), batch_size):
        pixels: dict[Preprocessing, list[np.ndarray]] = {spec: [] for spec in specs}
        for i in range(start, min(start + batch_size, len(paths))):
            try:
                img = decode_image(paths[i])
            except InvalidImage:
                continue
            kept.append(i)
            for spec in specs:
                pixels[spec].append(preprocess(img, spec))
        if not kept or kept[-1] < start:
            continue
        for spec, names in specs.items():
            batch = np.stack(pixels[spec])
            for name in names:
                blocks[name].append(models[name].embed_arrays(batch))
    return {name: np.concatenate(b) if b else np.zeros((0, models[name].dim), np.float32)
            for name, b in blocks.items()}, kept


def accuracy(models: Mapping[str, OnnxEmbedder], config: ReportConfig, teacher: OnnxEmbedder | None
             ) -> tuple[dict[str, dict[str, float]], int]:
    """({name: retrieval metrics of its queries against the database (teacher, else the model named fp32)},
    number of readable images)."""
    paths, labels = load_images(config)
    everyone = dict(models)
    if teacher is not None:
        everyone["teacher"] = teacher
    vectors, kept = embed_all(paths, everyone)
    labels = [labels[i] for i in kept]
    database = vectors["teacher"] if teacher is not None else vectors["fp32"]
    return {name: retrieval_metrics(vectors[name], labels, database, labels, exclude_self=True, ks=config.ks)
            for name in models}, len(labels)


def speed(models: Mapping[str, OnnxEmbedder], config: ReportConfig) -> dict[str, dict[str, dict[str, float]]]:
    """{name: {"batch1": {...}, "batch16": {...}}} from interleaved timing on random pixels."""
    out: dict[str, dict[str, dict[str, float]]] = {name: {} for name in models}
    rng = np.random.default_rng(config.seed)
    for batch in config.batch_sizes:
        sizes = {m.manifest.input_size for m in models.values()}
        inputs = {s: rng.normal(size=(batch, 3, s, s)).astype(np.float32) for s in sizes}
        calls = {name: (lambda m=m, x=inputs[m.manifest.input_size]: m.embed_arrays(x)) for name, m in models.items()}
        reps = max(1, 16 // batch)  # about the same number of images per timed call group at every batch size
        times = interleaved_timings(calls, rounds=config.rounds, reps=reps, warmup=2)
        for name, t in times.items():
            out[name][f"batch{batch}"] = summarise(t, batch)
    return out


def variant_report(files: Mapping[str, str | os.PathLike], config: ReportConfig) -> dict:
    """Measure every variant in `files` ({variant: path}, which must include "fp32") side by side.

    Returns {"config": ..., "variants": {name: {"file", "bytes", "size_ratio", "speed", "accuracy",
    "recall@1_drop", "map_drop", "lossy", "speedup_batch1", ...}}}: drops are in points (percent) against
    fp32, ratios are fp32 / variant (above 1: the variant is smaller or faster).
    """
    if "fp32" not in files:
        raise UserError("the report compares every variant with the fp32 export; it is missing")
    models = {name: OnnxEmbedder(path, providers=[CPU_PROVIDER], intra_op_threads=config.threads,
                                 inter_op_threads=1) for name, path in files.items()}
    base = models["fp32"].manifest
    for name, m in models.items():
        check_pairing(m, base, query_name=str(files[name]), database_name="the fp32 export")
    teacher = None
    if config.teacher is not None:
        teacher = OnnxEmbedder(config.teacher, providers=[CPU_PROVIDER], intra_op_threads=config.threads)
        require_teacher(teacher, str(config.teacher))
        check_pairing(base, teacher, query_name="the student", database_name=str(config.teacher))
    timings = speed(models, config)
    metrics, images = accuracy(models, config, teacher) if config.data is not None else (None, 0)
    size0 = os.path.getsize(files["fp32"])
    variants = {}
    for name, path in files.items():
        size = os.path.getsize(path)
        entry = {"file": str(path), "bytes": size, "size_ratio": size0 / size, "speed": timings[name],
                 "providers": models[name].providers}
        for b in config.batch_sizes:
            key = f"batch{b}"
            entry[f"speedup_{key}"] = timings["fp32"][key]["ms_per_image"] / timings[name][key]["ms_per_image"]
        if metrics is not None:
            entry["accuracy"] = metrics[name]
            entry["recall@1_drop"] = 100 * (metrics["fp32"]["recall@1"] - metrics[name]["recall@1"])
            entry["map_drop"] = 100 * (metrics["fp32"]["map"] - metrics[name]["map"])
            entry["lossy"] = entry["recall@1_drop"] > config.max_recall_drop
        variants[name] = entry
    cfg = {k: (str(v) if isinstance(v, os.PathLike) else v) for k, v in dataclasses.asdict(config).items()}
    cfg["database"] = "teacher" if teacher is not None else "fp32 student"
    cfg["ks"], cfg["batch_sizes"] = list(config.ks), list(config.batch_sizes)
    cfg["images"] = images
    return {"config": cfg, "variants": variants}


def format_report(report: dict) -> str:
    """A markdown table of the report."""
    variants = report["variants"]
    batches = report["config"]["batch_sizes"]
    head = ["variant", "MB", "size x"]
    for b in batches:
        head += [f"ms/img b{b}", f"img/s b{b}", f"speed x b{b}"]
    with_acc = any("accuracy" in v for v in variants.values())
    if with_acc:
        head += ["R@1", "mAP", "R@1 drop (pts)", "mAP drop (pts)", "status"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, v in variants.items():
        row = [name, f"{v['bytes'] / 1e6:.2f}", f"{v['size_ratio']:.2f}"]
        for b in batches:
            s = v["speed"][f"batch{b}"]
            row += [f"{s['ms_per_image']:.2f}", f"{s['images_per_s']:.1f}", f"{v[f'speedup_batch{b}']:.2f}"]
        if with_acc:
            a = v["accuracy"]
            row += [f"{100 * a['recall@1']:.2f}", f"{100 * a['map']:.2f}", f"{v['recall@1_drop']:+.2f}",
                    f"{v['map_drop']:+.2f}", v.get("status", "lossy" if v["lossy"] else "ok")]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)
