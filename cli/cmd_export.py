"""`asymsearch export`: checkpoint -> ONNX + manifest, its variants, their verification and their report."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from asymsearch.cli.options import Commands, bind_config, existing_path


def register(commands: Commands) -> None:
    p = commands.add(
        "export", help="checkpoint -> ONNX model + manifest, verified against torch; fp16/int8/ORT variants",
        description="Export a checkpoint to NAME.onnx + NAME.json (checked against torch on random inputs), "
                    "optionally make variants of it (NAME.fp16.onnx, NAME.int8-static.onnx, NAME.mobile.ort, ...) "
                    "each with its own manifest, verify existing files (--verify), and measure every variant's "
                    "size, speed and retrieval loss in one run (--report).")
    p.add_argument("--checkpoint", required=True, type=existing_path("checkpoint"),
                   help="a teacher or student checkpoint")
    p.add_argument("--out", required=True, type=Path, help="NAME.onnx to write (NAME.json is written beside it)")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (default: %(default)s)")
    p.add_argument("--image-size", type=int,
                   help="centre crop the manifest asks for, if not the trained one: a smaller size serves cheaper, "
                        "a larger one may offset random-crop training (on CUB-100 the trained size was best; "
                        "docs/export.md). The resize follows in proportion (default: the checkpoint's size)")
    p.add_argument("--tolerance", type=float, default=1e-4,
                   help="largest allowed |onnxruntime - torch| on random inputs (default: %(default)s)")
    v = p.add_argument_group("variants")
    v.add_argument("--variants", default="",
                   help="comma-separated: optimized, fp16, int8-dynamic, int8-static, ort; or all (default: none)")
    v.add_argument("--calibration-data", type=existing_path("calibration image folder"),
                   help="image folder whose images calibrate int8-static (needed for it)")
    v.add_argument("--calibration-classes", default="first-half",
                   help="class folders of --calibration-data to sample (default: %(default)s, the training half)")
    v.add_argument("--calibration-images", type=int, default=256, help="images sampled (default: %(default)s)")
    v.add_argument("--calibration-method", default="minmax", choices=("minmax", "percentile", "entropy"),
                   help="activation range estimator; percentile and entropy hold histograms of every activation "
                        "in memory, so give them at most ~64 images (default: %(default)s)")
    v.add_argument("--ort-level", default="extended", choices=("basic", "extended", "all"),
                   help="graph optimisation baked into the ORT-format file: extended runs on any CPU (phones); all "
                        "adds this x86 CPU's NCHWc layout, faster here but not portable (default: %(default)s)")
    v.add_argument("--float-nodes", default="",
                   help="comma-separated ONNX node-name prefixes int8 variants keep in float, e.g. "
                        "/backbone/_conv_head/ for a layer that resists quantisation (default: none)")
    v.add_argument("--quantize-head", action="store_true",
                   help="quantise the embedding head too (default: the GeM head stays float)")
    c = p.add_argument_group("verification and report")
    c.add_argument("--verify", action="store_true",
                   help="write nothing: check the existing --out (and its variant files) against their manifests "
                        "and against --checkpoint's torch output on fresh random inputs")
    c.add_argument("--report", action="store_true",
                   help="measure size, latency and throughput at batch 1 and 16, and the Recall@1/mAP drop against "
                        "fp32 for every variant, side by side")
    c.add_argument("--eval-data", type=existing_path("evaluation image folder"),
                   help="labelled image folder for the report's accuracy part (without it: speed only)")
    c.add_argument("--eval-classes", default="second-half",
                   help="class folders of --eval-data (default: %(default)s, the held-out half)")
    c.add_argument("--eval-images", type=int, help="a seeded sample of that many images (default: all)")
    c.add_argument("--teacher", type=existing_path("teacher ONNX"),
                   help="teacher ONNX that embeds the report's database (asymmetric); default: the fp32 student")
    c.add_argument("--max-recall-drop", type=float, default=1.0,
                   help="a variant losing more Recall@1 points than this is refused (default: %(default)s)")
    c.add_argument("--keep-lossy", action="store_true", help="keep (and mark) variants over --max-recall-drop")
    c.add_argument("--threads", type=int, default=1, help="onnxruntime threads in the report (default: %(default)s)")
    c.add_argument("--rounds", type=int, default=10, help="timing rounds in the report (default: %(default)s)")
    c.add_argument("--report-json", type=Path, help="where the report goes (default: NAME.report.json)")
    p.set_defaults(func=run)
    bind_config(p)  # every option is a key; the merged config is saved beside the manifest


def run(args: argparse.Namespace) -> int:
    from asymsearch.core.errors import UserError
    from asymsearch.export.variants import STUDENT_VARIANTS, Calibration, parse_variants, variant_path

    variants = parse_variants(args.variants)
    calibration = None
    if args.calibration_data is not None:
        calibration = Calibration(args.calibration_data, classes=args.calibration_classes,
                                  count=args.calibration_images, method=args.calibration_method)
    if "int8-static" in variants and calibration is None and not args.verify:
        raise UserError("the int8-static variant needs --calibration-data DIR (a sample of your images)")
    if args.verify:
        _verify(args, variants)
    else:
        _export(args, variants, calibration)
    if args.report:
        names = variants or [v for v in STUDENT_VARIANTS if variant_path(args.out, v).is_file()]
        _report(args, {"fp32": args.out, **{v: variant_path(args.out, v) for v in names}})
    return 0


def _export(args: argparse.Namespace, variants: list[str], calibration) -> None:
    from asymsearch.core.manifest import manifest_path_for
    from asymsearch.export.onnx_export import export_checkpoint
    from asymsearch.export.variants import make_variant, variant_path

    m = export_checkpoint(args.checkpoint, args.out, opset=args.opset, tolerance=args.tolerance,
                          image_size=args.image_size, config=_resolved_config(args))
    print(f"{m.role} exported: {args.out} (dim {m.dim}, {m.input_size} px, teacher id {m.teacher_id}, "
          f"max |onnxruntime - torch| {m.extra.get('max_abs_diff', float('nan')):.2e}); "
          f"manifest {manifest_path_for(args.out)}")
    for v in variants:
        vm = make_variant(args.out, v, calibration=calibration, float_head=not args.quantize_head,
                          float_nodes=[x.strip() for x in args.float_nodes.split(",") if x.strip()],
                          ort_level=args.ort_level)
        path = variant_path(args.out, v)
        agree = vm.extra["vs_parent_random_inputs"]
        print(f"  {v}: {path} ({path.stat().st_size / 1e6:.2f} MB; vs fp32 on random inputs: max |diff| "
              f"{agree['max_abs_diff']:.2e}, min cosine {agree['min_cosine']:.4f})")


def _resolved_config(args: argparse.Namespace):
    """The merged config with the checkpoint and output as absolute paths (so it reproduces from any folder)."""
    from asymsearch.core.config import to_plain
    config = to_plain(args.config_merged)
    for key in ("checkpoint", "out"):
        config[key] = str(Path(config[key]).resolve())
    return config


def _verify(args: argparse.Namespace, variants: list[str]) -> None:
    from asymsearch.core.errors import UserError
    from asymsearch.export.variants import STUDENT_VARIANTS, variant_path
    from asymsearch.export.verify import verify_model
    from asymsearch.training.checkpoint import load_checkpoint

    if not args.out.is_file():
        raise UserError(f"--verify checks an existing export, and {args.out} does not exist")
    if variants:
        missing = [str(variant_path(args.out, v)) for v in variants if not variant_path(args.out, v).is_file()]
        if missing:
            raise UserError(f"variant file not found: {missing[0]}")
    else:
        variants = [v for v in STUDENT_VARIANTS if variant_path(args.out, v).is_file()]
    ckpt = load_checkpoint(args.checkpoint)
    for v in ["fp32", *variants]:
        path = variant_path(args.out, v)
        r = verify_model(path, ckpt, tolerance=args.tolerance if v == "fp32" else None)
        limit = f"tolerance {r['tolerance']:g}" if r["tolerance"] is not None else "no tolerance for int8"
        print(f"verified {path} ({v}): sha256 matches its manifest, exported from {args.checkpoint}; max "
              f"|onnxruntime - torch| {r['max_abs_diff']:.2e} ({limit}), min cosine {r['min_cosine']:.4f}")


def _report(args: argparse.Namespace, files: dict) -> None:
    from asymsearch.core.manifest import ModelManifest, manifest_path_for
    from asymsearch.export.report import ReportConfig, format_report, variant_report

    config = ReportConfig(data=args.eval_data, classes=args.eval_classes, teacher=args.teacher,
                          max_images=args.eval_images, rounds=args.rounds, threads=args.threads,
                          max_recall_drop=args.max_recall_drop)
    report = variant_report(files, config)
    for name, entry in report["variants"].items():
        if "lossy" not in entry:
            continue
        if not entry["lossy"] or name == "fp32":  # the reference itself is never refused
            entry["status"] = "ok"
        elif args.keep_lossy:
            entry["status"] = "kept-lossy"
        else:
            entry["status"] = "refused"
        path = Path(entry["file"])
        mpath = manifest_path_for(path)
        if entry["status"] == "refused":
            path.unlink(missing_ok=True)
            mpath.unlink(missing_ok=True)
            continue
        m = ModelManifest.load(mpath)
        summary = {k: entry[k] for k in ("accuracy", "recall@1_drop", "map_drop", "lossy", "status")}
        summary.update(data=str(args.eval_data), classes=args.eval_classes, images=report["config"]["images"],
                       database=report["config"]["database"])
        m.extra["report"] = summary  # the manifest describes the file; sha256 is unchanged
        m.save(mpath)
    out = args.report_json or args.out.with_name(f"{args.out.stem}.report.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    print(format_report(report))
    if report["config"]["data"] is None:
        print("(speed only: pass --eval-data DIR for the Recall@1 / mAP drop)")
    for name, entry in report["variants"].items():
        if entry.get("status") == "refused":
            print(f"REFUSED {name}: loses {entry['recall@1_drop']:.2f} points of Recall@1 (> "
                  f"{args.max_recall_drop:g}); its file was removed. Pass --keep-lossy to keep it.")
        elif entry.get("status") == "kept-lossy":
            print(f"WARNING {name}: loses {entry['recall@1_drop']:.2f} points of Recall@1 (> "
                  f"{args.max_recall_drop:g}); kept because of --keep-lossy and marked in its manifest.")
    print(f"report written: {out}")
