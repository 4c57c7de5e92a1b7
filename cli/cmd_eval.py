"""`asymsearch eval`: Recall@K and mAP in the three settings."""
from __future__ import annotations

import argparse
import json

from asymsearch.cli.options import CONFIG_HELP, Commands, existing_path


def register(commands: Commands) -> None:
    p = commands.add("eval", help="Recall@K and mAP: teacher-teacher, student-student, student-teacher")
    p.add_argument("--data", required=True, type=existing_path("image folder"), help="labelled image folder")
    p.add_argument("--teacher", required=True, type=existing_path("teacher ONNX model"))
    p.add_argument("--student", required=True, type=existing_path("student ONNX model"))
    p.add_argument("--index", type=existing_path("index folder"),
                   help="query this built index for the asymmetric setting instead of an in-memory database")
    p.add_argument("--classes", default="all", help=CONFIG_HELP["classes"] + " (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--json", action="store_true", help="print exactly one JSON object")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from asymsearch.index.evaluate import evaluate, format_table
    result = evaluate(args.data, args.teacher, args.student, index=args.index, classes=args.classes,
                      batch_size=args.batch_size, progress=not args.json)
    print(json.dumps(result) if args.json else format_table(result))
    return 0
