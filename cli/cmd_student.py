"""`asymsearch student check`: the quality gate of a student on an index's probe set, before it goes live."""
from __future__ import annotations

import argparse
import json
import sys

from asymsearch.cli.cmd_index import index_location
from asymsearch.cli.options import Commands, existing_path

EXIT_BELOW_GATE = 1


def register(commands: Commands) -> None:
    group = commands.add("student", help="check a student against an index before it serves it",
                         description="Commands about student (query) models and the index they query.")
    sub = group.add_subparsers(dest="student_command", required=True, metavar="COMMAND")
    p = sub.add_parser(
        "check", help="the student's asymmetric Recall@1 / mAP on the index's probe set against the teacher's",
        description="Embed the index's probe set (database images kept by `index build`, see docs/server.md) with "
                    "the student and score it leave-one-out against the probe set's teacher vectors: the "
                    "student's asymmetric Recall@1 and mAP beside the teacher's symmetric ones, and their ratio. "
                    "Exit status 1 (and one line on stderr) when the Recall@1 ratio is below --min-ratio, 2 for "
                    "bad input (a student of another teacher, an index without a probe set).")
    p.add_argument("--index", required=True, type=index_location("index folder"),
                   help="index folder or root, or a Milvus location (milvus://..., milvus-lite://...)")
    p.add_argument("--student", required=True, type=existing_path("student ONNX model"),
                   help="student .onnx (with its .json)")
    p.add_argument("--min-ratio", type=float, default=None,
                   help="the least student / teacher Recall@1 ratio that passes (default: 0.95)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.set_defaults(func=run_check)


def run_check(args: argparse.Namespace) -> int:
    from asymsearch.core.errors import UserError
    from asymsearch.core.manifest import check_pairing
    from asymsearch.core.ort import OnnxEmbedder
    from asymsearch.core.provenance import provenance
    from asymsearch.index.probe import DEFAULT_MIN_RATIO, GateRefused, check_student, require_probe
    from asymsearch.index.backend import open_index

    min_ratio = DEFAULT_MIN_RATIO if args.min_ratio is None else args.min_ratio
    if not 0 <= min_ratio <= 10:
        raise UserError(f"--min-ratio must be between 0 and 10, got {min_ratio:g}")
    student = OnnxEmbedder(args.student, intra_op_threads=0)
    with open_index(args.index) as index:
        check_pairing(student, index.manifest, query_name=str(args.student), database_name=f"the index {args.index}")
        probe = require_probe(index)
        result = check_student(student, probe, progress=sys.stderr.isatty())
    passed = result.ratio >= min_ratio
    if args.json:
        print(json.dumps({"index": str(args.index), "student": str(args.student),
                          "student_id": student.manifest.model_id, "teacher_id": probe.teacher_id,
                          "min_ratio": min_ratio, "passed": passed, **result.to_dict(),
                          "provenance": provenance()}, sort_keys=True))
    else:
        print(f"probe set: {result.count} images of {args.index} ({result.mode})")
        print(f"{'':10s} {'Recall@1':>9s} {'mAP':>7s}")
        print(f"{'teacher':10s} {result.teacher_recall_at_1:9.4f} {result.teacher_map:7.4f}   (symmetric)")
        print(f"{'student':10s} {result.recall_at_1:9.4f} {result.map:7.4f}   (asymmetric: student queries, "
              f"teacher database)")
        print(f"ratio {result.ratio:.3f} of the teacher's Recall@1; the gate needs {min_ratio:g}: "
              f"{'passed' if passed else 'REFUSED'}")
    if not passed:
        try:
            result.require(min_ratio, str(args.student))
        except GateRefused as e:
            print(f"asymsearch: {e}".replace("; nothing loaded", ""), file=sys.stderr)
        return EXIT_BELOW_GATE
    return 0
