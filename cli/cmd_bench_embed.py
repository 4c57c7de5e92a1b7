"""`asymsearch bench embed`: images/s, per-image latency and CPU time of torch eager and onnxruntime, side by side."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from asymsearch.cli.options import Commands, existing_path


def register(commands: Commands) -> None:
    p = commands.add(
        "embed", group="bench",
        help="torch eager vs onnxruntime, teacher vs student vs int8 student: images/s and latency side by side",
        description="Time, in one run with the candidates taking turns: torch eager teacher, ORT teacher, torch "
                    "eager student, ORT student, ORT int8 student, each at its own input size, at each batch size: "
                    "wall ms, process CPU ms and images/s per image, and the ratios. Missing ONNX files are "
                    "exported from the checkpoints into a temporary folder.")
    p.add_argument("--student", required=True, type=existing_path("student checkpoint"), help="student checkpoint")
    p.add_argument("--teacher", type=existing_path("teacher checkpoint"),
                   help="its teacher's checkpoint (without it: the student rows only)")
    p.add_argument("--student-onnx", type=existing_path("student ONNX"),
                   help="the student's export (default: export now)")
    p.add_argument("--teacher-onnx", type=existing_path("teacher ONNX"),
                   help="the teacher's export (default: export now)")
    p.add_argument("--student-int8", type=existing_path("int8 student ONNX"),
                   help="an int8 variant of the student (default: make int8-static from --calibration-data, "
                        "else int8-dynamic)")
    p.add_argument("--calibration-data", type=existing_path("calibration image folder"),
                   help="image folder to calibrate the int8-static student made here")
    p.add_argument("--calibration-images", type=int, default=128, help="images sampled (default: %(default)s)")
    p.add_argument("--batch-sizes", default="1,16", help="comma-separated (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=10, help="timing rounds (default: %(default)s)")
    p.add_argument("--threads", type=int, default=1,
                   help="threads for torch and onnxruntime alike (default: %(default)s)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="(default: %(default)s)")
    p.add_argument("--json", type=Path, help="write the result (with its provenance) as JSON here")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from asymsearch.bench.embed import bench_embed, format_bench
    from asymsearch.core.errors import UserError
    from asymsearch.export.variants import Calibration

    try:
        batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
    except ValueError:
        raise UserError(f"--batch-sizes must be comma-separated whole numbers, not {args.batch_sizes!r}") from None
    if not batch_sizes or min(batch_sizes) < 1:
        raise UserError("--batch-sizes needs at least one size, each at least 1")
    calibration = None
    if args.calibration_data is not None:
        calibration = Calibration(args.calibration_data, classes="first-half", count=args.calibration_images)
    result = bench_embed(args.student, teacher=args.teacher, student_onnx=args.student_onnx,
                         teacher_onnx=args.teacher_onnx, student_int8=args.student_int8, calibration=calibration,
                         batch_sizes=batch_sizes, rounds=args.rounds, threads=args.threads, device=args.device)
    print(format_bench(result))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
        print(f"written: {args.json}")
    return 0
