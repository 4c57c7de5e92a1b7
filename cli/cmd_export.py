"""`asymsearch export`: checkpoint -> ONNX + manifest."""
from __future__ import annotations

import argparse
from pathlib import Path

from asymsearch.cli.options import Commands, existing_path


def register(commands: Commands) -> None:
    p = commands.add("export", help="checkpoint -> ONNX model + manifest, verified against torch")
    p.add_argument("--checkpoint", required=True, type=existing_path("checkpoint"),
                   help="a teacher or student checkpoint")
    p.add_argument("--out", required=True, type=Path, help="NAME.onnx to write (NAME.json is written beside it)")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (default: %(default)s)")
    p.add_argument("--tolerance", type=float, default=1e-4,
                   help="largest allowed |onnxruntime - torch| on random inputs (default: %(default)s)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from asymsearch.core.manifest import manifest_path_for
    from asymsearch.export.onnx_export import export_checkpoint
    m = export_checkpoint(args.checkpoint, args.out, opset=args.opset, tolerance=args.tolerance)
    print(f"{m.role} exported: {args.out} (dim {m.dim}, teacher id {m.teacher_id}, "
          f"max |onnxruntime - torch| {m.extra.get('max_abs_diff', float('nan')):.2e}); "
          f"manifest {manifest_path_for(args.out)}")
    return 0
