"""`asymsearch index ...`: build the database index."""
from __future__ import annotations

import argparse
from pathlib import Path

from asymsearch.cli.options import CONFIG_HELP, Commands, existing_path


def register(commands: Commands) -> None:
    p = commands.add("build", group="index", help="embed an image folder with the teacher and build a faiss index")
    p.add_argument("--teacher", required=True, type=existing_path("teacher ONNX model"),
                   help="teacher .onnx (with its .json)")
    p.add_argument("--images", required=True, type=existing_path("image folder"),
                   help="image folder, one subfolder per class")
    p.add_argument("--out", required=True, type=Path, help="index folder to create")
    p.add_argument("--factory", default="Flat",
                   help="faiss index factory string, e.g. Flat, HNSW32, IVF256,PQ32 (default: %(default)s)")
    p.add_argument("--classes", default="all", help=CONFIG_HELP["classes"] + " (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=64, help="images per inference batch (default: %(default)s)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing index folder")
    p.set_defaults(func=run_build)


def run_build(args: argparse.Namespace) -> int:
    from asymsearch.index.build import build_index
    m = build_index(args.teacher, args.images, args.out, factory=args.factory, classes=args.classes,
                    batch_size=args.batch_size, overwrite=args.overwrite)
    print(f"index {args.out}: {m.count} images, {m.factory}, dim {m.dim}, teacher id {m.teacher_id}")
    return 0
