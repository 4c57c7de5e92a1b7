"""The vectors `bench index --auto-*` measures on, from CUB-100 and real models (issue 24, docs/results/bench_index_auto*.md).

    python -m asymsearch.bench.index_auto_vectors --data ../shared/data/cub100 --work /tmp/auto-vectors

- Teacher: zero-shot EfficientNet-Lite2 (ImageNet weights, global average pooling, 1280-d) at 260 px, made and
  exported by `bench.artifacts.make_real_models`.
- Student: EfficientNet-Lite0 (ImageNet weights, frozen) at 224 px with a `gem` head whose pooling is average
  pooling (p = 1) and whose linear layer is a ridge regression (no bias) of the teacher's embeddings on the
  student's L2-normalised pooled features, fitted on the images of the first 40 training classes; the ridge
  strength is chosen by mean student-teacher cosine on the 10 **validation classes carved from the training half**
  (its last 10 of 50), which the final fit leaves out. Written as a student checkpoint of the teacher's id and
  exported to ONNX. The pooled features are the ONNX outputs of the same backbone exported with the identity
  projection (`gem:init=zero-shot`), so a query vector is normalise(W f) of them, which is what the fitted student's
  ONNX computes (checked on `CHECK_IMAGES` query images, the largest difference printed and recorded).
- Queries: every second image (positions 1, 3, 5, ... in sorted order) of each validation class -> `tune_student.npy`
  (what --auto tunes on); the same of each of the 50 evaluation classes (the second half) -> `eval_student.npy`
  (measured once on the chosen index). No query image is in the database.
- Database: the teacher's embeddings of every other image -> `db_real.npy` (bench index grows it to each size with
  synthetic vectors drawn around these, `bench.index.resembling_vectors`).

`meta.json` beside them records the splits, the ridge strengths tried and their validation cosines, the check and
the provenance.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

RIDGE_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)
FIT_CLASSES, VALIDATION_CLASSES = 40, 10  # of the 50 training-half classes, in sorted order
CHECK_IMAGES = 32


def ridge(x: np.ndarray, y: np.ndarray, lam: float) -> np.ndarray:
    """W (out, in) minimising |x W^T - y|^2 + lam |W|^2."""
    x64, y64 = x.astype(np.float64), y.astype(np.float64)
    a = x64.T @ x64 + lam * np.eye(x.shape[1])
    return np.linalg.solve(a, x64.T @ y64).T.astype(np.float32)


def normalise(v: np.ndarray) -> np.ndarray:
    return (v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)).astype(np.float32)


def main(argv: list[str] | None = None) -> int:
    import torch

    from asymsearch.bench.artifacts import STUDENT_BACKBONE, _own_size_spec, make_real_models
    from asymsearch.core.data import list_image_folder
    from asymsearch.core.ort import OnnxEmbedder
    from asymsearch.core.provenance import provenance
    from asymsearch.export.onnx_export import export_checkpoint
    from asymsearch.index.pipeline import embed_items
    from asymsearch.training.checkpoint import load_checkpoint, make_checkpoint, save_checkpoint
    from asymsearch.training.models import build_model

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, required=True, help="CUB-100 image folder root (class folders)")
    p.add_argument("--work", type=Path, required=True, help="where models and vectors are written")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--fit-classes", type=int, default=FIT_CLASSES,
                   help="training-half classes the ridge map is fitted on (default: %(default)s)")
    p.add_argument("--validation-classes", type=int, default=VALIDATION_CLASSES,
                   help="the training-half classes after them, which choose the ridge strength and give the tuning "
                        "queries (default: %(default)s)")
    args = p.parse_args(argv)
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    teacher_onnx, _ = make_real_models(work / "models", log=log)
    teacher_id = load_checkpoint(work / "models" / "teacher-lite2.pt")["model_id"]

    # the student's backbone with the identity projection: its outputs are the normalised pooled features
    arch = {"backbone": STUDENT_BACKBONE, "head": "gem:init=zero-shot", "dim": 1280, "pretrained": "imagenet"}
    features_onnx = work / "models" / "student-lite0-features.onnx"
    if not features_onnx.is_file():
        torch.manual_seed(0)
        model = build_model(arch).eval()
        ckpt = make_checkpoint(model, role="student", arch=arch, preprocessing=_own_size_spec(STUDENT_BACKBONE),
                               teacher_id=teacher_id, config={"made_by": "asymsearch.bench.index_auto_vectors "
                                                                         "(pooled features, identity projection)"})
        save_checkpoint(ckpt, features_onnx.with_suffix(".pt"))
        export_checkpoint(features_onnx.with_suffix(".pt"), features_onnx, samples=1)

    root = args.data / "images" if (args.data / "images").is_dir() else args.data
    items = list_image_folder(root)
    classes = sorted({it.label for it in items})
    train_half, eval_half = classes[:len(classes) // 2], classes[len(classes) // 2:]
    fit = train_half[:args.fit_classes]
    validation = train_half[args.fit_classes:args.fit_classes + args.validation_classes]
    if not fit or not validation:
        raise SystemExit(f"{len(train_half)} training-half classes: too few for {args.fit_classes} fit + "
                         f"{args.validation_classes} validation classes")
    cache = work / "embeddings.npz"
    if cache.is_file():
        z = np.load(cache, allow_pickle=False)
        paths, labels, teacher, feats = list(z["paths"]), list(z["labels"]), z["teacher"], z["features"]
    else:
        log(f"embedding {len(items)} images with the teacher ({teacher_onnx.name}) and the student's backbone")
        done = embed_items(items, [OnnxEmbedder(teacher_onnx), OnnxEmbedder(features_onnx)],
                           batch_size=args.batch_size, desc="teacher + student features")
        paths, labels = [it.path for it in done.items], [it.label for it in done.items]
        teacher, feats = done.vectors
        np.savez(cache, paths=np.array(paths), labels=np.array(labels), teacher=teacher, features=feats)
    labels_a = np.asarray(labels)
    position = np.zeros(len(paths), np.int64)  # the image's position within its class, sorted by path
    for c in classes:
        rows = np.flatnonzero(labels_a == c)
        rows = rows[np.argsort(np.asarray(paths)[rows], kind="stable")]
        position[rows] = np.arange(len(rows))
    in_fit, in_val, in_eval = (np.isin(labels_a, fit), np.isin(labels_a, validation), np.isin(labels_a, eval_half))
    query = (position % 2 == 1) & (in_val | in_eval)

    tried = []
    for lam in RIDGE_GRID:
        w = ridge(feats[in_fit], teacher[in_fit], lam)
        cos = float(np.mean(np.sum(normalise(feats[in_val] @ w.T) * teacher[in_val], axis=1)))
        tried.append({"ridge": lam, "validation_cosine": round(cos, 4)})
        log(f"ridge {lam:g}: mean validation cosine {cos:.4f}")
    lam = max(tried, key=lambda t: t["validation_cosine"])["ridge"]
    w = ridge(feats[in_fit], teacher[in_fit], lam)
    student = normalise(feats @ w.T)
    cosine = {name: round(float(np.mean(np.sum(student[m] * teacher[m], axis=1))), 4)
              for name, m in (("fit", in_fit), ("validation", in_val), ("evaluation", in_eval))}

    # the fitted student as a checkpoint and ONNX: GeM p = 1 (average pooling), the ridge map, no bias
    model = build_model({**arch, "head": "gem"}).eval()
    with torch.no_grad():
        model.head.pool.p.fill_(1.0)
        model.head.proj.weight.copy_(torch.from_numpy(w))
        model.head.proj.bias.zero_()
    student_pt = work / "models" / "student-lite0-ridge.pt"
    save_checkpoint(make_checkpoint(model, role="student", arch={**arch, "head": "gem"},
                                    preprocessing=_own_size_spec(STUDENT_BACKBONE), teacher_id=teacher_id,
                                    config={"made_by": "asymsearch.bench.index_auto_vectors", "ridge": lam,
                                            "fit_classes": fit}), student_pt)
    student_onnx = student_pt.with_suffix(".onnx")
    export_checkpoint(student_pt, student_onnx, samples=1)
    check_rows = np.flatnonzero(query)[:: max(1, int(query.sum()) // CHECK_IMAGES)][:CHECK_IMAGES]
    by_path = {it.path: it for it in items}
    direct = embed_items([by_path[paths[r]] for r in check_rows], [OnnxEmbedder(student_onnx)],
                         batch_size=args.batch_size, progress=False).vectors[0]
    check = float(np.abs(direct - student[check_rows]).max())
    log(f"the fitted student's ONNX against normalise(W f) on {len(check_rows)} query images: max |diff| {check:.2e}")

    np.save(work / "db_real.npy", teacher[~query])
    np.save(work / "tune_student.npy", student[query & in_val])
    np.save(work / "eval_student.npy", student[query & in_eval])
    meta = {"data": str(args.data), "images": len(paths), "classes": {"fit": len(fit), "validation": len(validation),
                                                                       "evaluation": len(eval_half)},
            "database_real": int((~query).sum()), "tune_queries": int((query & in_val).sum()),
            "eval_queries": int((query & in_eval).sum()), "ridge_tried": tried, "ridge": lam,
            "mean_cosine_to_teacher": cosine, "onnx_check_max_abs_diff": check, "teacher": str(teacher_onnx),
            "student": str(student_onnx), "teacher_id": teacher_id,
            "rule": "queries: positions 1, 3, 5, ... of each validation / evaluation class in sorted order; database: "
                    "every other image; ridge fitted on the 40 fit classes, chosen on the 10 validation classes",
            "provenance": provenance()}
    (work / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    log(json.dumps({k: v for k, v in meta.items() if k != "provenance"}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
