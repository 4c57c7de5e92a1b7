"""Which teacher / student input sizes the demo's recipe uses (issue 23), chosen on validation classes only.

For each labelled folder: the validation classes the recipe carves from its training half (`--val-fraction`,
evenly spaced, `training.common.prepare_data`), embedded by the zero-shot model (ImageNet EfficientNet-Lite0,
average pooling, exported to ONNX) at each teacher size and each student size. For every (teacher, student) pair
it reports teacher->teacher Recall@1 / mAP, student->teacher Recall@1 / mAP and their ratios, and the FLOPs ratio
counted on the exported graphs (`server.tiers.onnx_gflops`). The student of the recipe starts as the teacher at
its own size, so these untrained pairs are where it starts. The evaluation half is not read.

    python -m experiments.recipe_sizes --data DIR [--data DIR2] --out docs/results/recipe_sizes
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

TEACHER_SIZES = (224, 256, 288)
STUDENT_SIZES = (128, 144, 160)


def measure(data: str, work: Path, val_fraction: float, teacher_sizes=TEACHER_SIZES,
            student_sizes=STUDENT_SIZES) -> dict:
    from asymsearch.core.manifest import Preprocessing
    from asymsearch.core.metrics import retrieval_metrics
    from asymsearch.core.ort import OnnxEmbedder
    from asymsearch.export.onnx_export import export_checkpoint
    from asymsearch.index.pipeline import embed_items
    from asymsearch.server.tiers import onnx_gflops
    from asymsearch.training.backbones import backbone_preprocessing
    from asymsearch.training.checkpoint import make_checkpoint, save_checkpoint
    from asymsearch.training.common import prepare_data
    from asymsearch.training.floor import zero_shot_model

    _, val_items, _ = prepare_data(data, "first-half", val_fraction)
    own = backbone_preprocessing("efficientnet_lite0")
    model, arch = zero_shot_model("efficientnet_lite0", "imagenet")
    sizes = sorted(set(teacher_sizes) | set(student_sizes))
    paths, gflops = {}, {}
    for s in sizes:
        spec = Preprocessing(resize=s, crop=s, mean=tuple(own["mean"]), std=tuple(own["std"]))
        ckpt = save_checkpoint(make_checkpoint(model, role="teacher", arch=arch, preprocessing=spec),
                               work / f"zs{s}.pt")
        paths[s] = work / f"zs{s}.onnx"
        export_checkpoint(ckpt, paths[s])
        gflops[s] = onnx_gflops(paths[s], s)
    embedded = embed_items(val_items, [OnnxEmbedder(paths[s]) for s in sizes], progress=True,
                           desc=f"{Path(data).name}: validation images")
    labels = [it.label for it in embedded.items]
    vec = dict(zip(sizes, embedded.vectors))

    def m(q, d):
        r = retrieval_metrics(vec[q], labels, vec[d], labels, exclude_self=True)
        return {"recall@1": r["recall@1"], "map": r["map"]}
    pairs = []
    for t in teacher_sizes:
        tt = m(t, t)
        for s in student_sizes:
            st = m(s, t)
            pairs.append({"teacher": t, "student": s, "flops_ratio": gflops[t] / gflops[s], "teacher_teacher": tt,
                          "student_teacher": st, "ratio_recall@1": st["recall@1"] / tt["recall@1"],
                          "ratio_map": st["map"] / tt["map"]})
    return {"data": data, "val_images": len(labels), "val_classes": sorted(set(labels)), "gflops": gflops,
            "pairs": pairs}


def main(argv=None) -> int:
    from asymsearch.core.provenance import provenance
    p = argparse.ArgumentParser(prog="python -m experiments.recipe_sizes", description=__doc__.split("\n")[0])
    p.add_argument("--data", action="append", required=True)
    p.add_argument("--val-fraction", type=float, default=0.2)
    p.add_argument("--out", default="docs/results/recipe_sizes")
    args = p.parse_args(argv)
    out = {"what": __doc__.split("\n\n")[0], "provenance": provenance(sys.argv if argv is None else argv),
           "sets": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for d in args.data:
            out["sets"][Path(d).parent.name if Path(d).name == "images" else Path(d).name] = \
                measure(d, Path(tmp), args.val_fraction)
    Path(args.out + ".json").write_text(json.dumps(out, indent=1) + "\n")
    for name, r in out["sets"].items():
        print(f"{name}: {r['val_images']} validation images, {len(r['val_classes'])} classes")
        print(f"  {'T':>4} {'S':>4} {'FLOPs x':>8} {'TT R@1':>7} {'TT mAP':>7} {'ST R@1':>7} {'ST mAP':>7} "
              f"{'xR@1':>6} {'xmAP':>6}")
        for q in r["pairs"]:
            print(f"  {q['teacher']:4d} {q['student']:4d} {q['flops_ratio']:8.2f} "
                  f"{q['teacher_teacher']['recall@1']:7.3f} {q['teacher_teacher']['map']:7.3f} "
                  f"{q['student_teacher']['recall@1']:7.3f} {q['student_teacher']['map']:7.3f} "
                  f"{q['ratio_recall@1']:6.3f} {q['ratio_map']:6.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
