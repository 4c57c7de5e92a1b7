"""`asymsearch`: one command, a subcommand per stage.

The top floor: it imports the stages (lazily, so `asymsearch serve` never imports torch) and nothing imports
it. Every subcommand parses its options, calls the stage's plain function and prints what a person needs.
A `UserError` from any stage becomes one line on stderr and exit status 2; no traceback.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import typing
from pathlib import Path

from asymsearch.core.errors import UserError

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130

# Help for the options generated from the training configs (dataclass fields).
CONFIG_HELP = {
    "data": "image folder with one subfolder per class",
    "out": "checkpoint file to write",
    "teacher": "the frozen teacher's checkpoint",
    "backbone": "backbone name (an unknown name lists the valid ones)",
    "head": "pooling head name",
    "dim": "embedding dimension",
    "pretrained": "torchvision weights name (e.g. DEFAULT; needs internet once) or a local .pth state dict",
    "image_size": "square crop fed to the network, in pixels",
    "resize": "shorter side resized to this before the centre crop (default: image size)",
    "mean": "normalisation mean, per channel",
    "std": "normalisation std, per channel",
    "classes": "class folders to use: all, first-half, second-half, or a comma-separated list",
    "epochs": "passes over the training images",
    "classes_per_batch": "classes per batch (class-balanced batches)",
    "per_class": "images per class in a batch (m)",
    "batch_size": "images per batch",
    "lr": "learning rate",
    "weight_decay": "AdamW weight decay",
    "margin": "contrastive margin m: negatives are pushed below similarity m",
    "num_negatives": "hard negatives mined per anchor in the batch",
    "val_fraction": "fraction of the classes held out for per-epoch validation Recall@1 (0 disables)",
    "seed": "random seed",
    "workers": "data-loading worker processes",
    "device": "auto (CUDA when present), cpu or cuda",
}


def _add_config_options(parser: argparse.ArgumentParser, config_cls: type, required: tuple[str, ...]) -> None:
    """One `--option` per field of a training config dataclass, with its default shown in --help."""
    hints = typing.get_type_hints(config_cls)
    for field in dataclasses.fields(config_cls):
        flag = "--" + field.name.replace("_", "-")
        kind = hints[field.name]
        args = typing.get_args(kind)
        base = next((a for a in args if a is not type(None)), kind) if args else kind
        kw: dict = {"dest": field.name, "help": CONFIG_HELP.get(field.name, field.name.replace("_", " "))}
        if field.name in required:
            kw["required"] = True
        else:
            default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
            kw["default"] = default
            kw["help"] += f" (default: {default})"
        if kind is tuple or typing.get_origin(kind) is tuple:
            kw.update(type=float, nargs=3, metavar=("R", "G", "B"))
        elif base in (int, float):
            kw["type"] = base
        else:
            kw["type"] = str
        parser.add_argument(flag, **kw)


def _config_from_args(config_cls: type, args: argparse.Namespace):
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(config_cls)}
    for key in ("mean", "std"):
        if key in values and values[key] is not None:
            values[key] = tuple(values[key])
    return config_cls(**values)


# ---------------------------------------------------------------------------------------------- subcommands

def cmd_train_teacher(args: argparse.Namespace) -> int:
    from asymsearch.training.config import TeacherConfig
    from asymsearch.training.train import train_teacher
    path = train_teacher(_config_from_args(TeacherConfig, args))
    print(f"teacher checkpoint: {path}")
    return 0


def cmd_train_student(args: argparse.Namespace) -> int:
    from asymsearch.training.config import StudentConfig
    from asymsearch.training.train import train_student
    path = train_student(_config_from_args(StudentConfig, args))
    print(f"student checkpoint: {path}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from asymsearch.core.manifest import manifest_path_for
    from asymsearch.export.onnx_export import export_checkpoint
    manifest = export_checkpoint(args.checkpoint, args.out, opset=args.opset, tolerance=args.tolerance)
    print(f"{manifest.role} exported: {args.out} (dim {manifest.dim}, teacher id {manifest.teacher_id}, "
          f"max |onnxruntime - torch| {manifest.extra.get('max_abs_diff', float('nan')):.2e}); "
          f"manifest {manifest_path_for(args.out)}")
    return 0


def cmd_index_build(args: argparse.Namespace) -> int:
    from asymsearch.index.build import build_index
    manifest = build_index(args.teacher, args.images, args.out, factory=args.factory, classes=args.classes,
                           batch_size=args.batch_size, overwrite=args.overwrite)
    print(f"index {args.out}: {manifest.count} images, {manifest.factory}, dim {manifest.dim}, "
          f"teacher id {manifest.teacher_id}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from asymsearch.server.service import serve
    serve(args.index, args.student, host=args.host, port=args.port, max_workers=args.workers)
    return 0


def cmd_query(args: argparse.Namespace) -> int:
    from asymsearch.clients.client import OnDeviceEmbedder, SearchClient, SearchError
    embedder = OnDeviceEmbedder(args.on_device) if args.on_device else None
    results = []
    try:
        with SearchClient(args.server, timeout=args.timeout) as client:
            for image in args.images:
                if embedder is not None:
                    hits = client.search_on_device(embedder, image, k=args.k)
                else:
                    hits = client.search_image(image, k=args.k)
                results.append({"query": str(image), "hits": [dataclasses.asdict(h) for h in hits]})
    except SearchError as e:
        raise UserError(str(e)) from None
    if args.json:
        for r in results:
            print(json.dumps(r))
    else:
        for r in results:
            print(f"{r['query']}")
            for rank, h in enumerate(r["hits"], start=1):
                print(f"  {rank:>3}  {h['score']:.4f}  {h['label']:<24}  {h['path']}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from asymsearch.index.evaluate import evaluate, format_table
    result = evaluate(args.data, args.teacher, args.student, index=args.index, classes=args.classes,
                      batch_size=args.batch_size, progress=not args.json)
    print(json.dumps(result) if args.json else format_table(result))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from asymsearch.cli.demo import DemoConfig, run_demo
    run_demo(_config_from_args(DemoConfig, args))
    return 0


# ------------------------------------------------------------------------------------------------- parser

def _existing_path(kind: str):
    def check(value: str) -> Path:
        p = Path(value)
        if not p.exists():
            raise argparse.ArgumentTypeError(f"{kind} not found: {value}")
        return p
    return check


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="asymsearch",
        description="Image retrieval with asymmetric metric learning: a teacher embeds the database once, a small "
                    "student embeds each query into the same space.",
        epilog="Pipeline: train teacher -> train student -> export (both) -> index build -> serve -> query / eval. "
               "`asymsearch demo --workdir DIR` runs all of it on generated data.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = sub.add_parser("train", help="train the teacher or a student").add_subparsers(
        dest="role", required=True, metavar="ROLE")
    from asymsearch.cli.demo import DemoConfig
    from asymsearch.training.config import StudentConfig, TeacherConfig
    p = train.add_parser("teacher", help="symmetric metric learning: contrastive loss, hard negatives, GeM",
                         formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _add_config_options(p, TeacherConfig, required=("data", "out"))
    p.set_defaults(func=cmd_train_teacher)
    p = train.add_parser("student", help="asymmetric: regress the frozen teacher's embeddings (AML Reg)")
    _add_config_options(p, StudentConfig, required=("data", "teacher", "out"))
    p.set_defaults(func=cmd_train_student)

    p = sub.add_parser("export", help="checkpoint -> ONNX model + manifest, verified against torch")
    p.add_argument("--checkpoint", required=True, type=_existing_path("checkpoint"), help="a teacher or student checkpoint")
    p.add_argument("--out", required=True, type=Path, help="NAME.onnx to write (NAME.json is written beside it)")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (default: %(default)s)")
    p.add_argument("--tolerance", type=float, default=1e-4,
                   help="largest allowed |onnxruntime - torch| on random inputs (default: %(default)s)")
    p.set_defaults(func=cmd_export)

    index = sub.add_parser("index", help="build the database index").add_subparsers(
        dest="action", required=True, metavar="ACTION")
    p = index.add_parser("build", help="embed an image folder with the teacher and build a faiss index")
    p.add_argument("--teacher", required=True, type=_existing_path("teacher ONNX model"), help="teacher .onnx (with its .json)")
    p.add_argument("--images", required=True, type=_existing_path("image folder"), help="image folder, one subfolder per class")
    p.add_argument("--out", required=True, type=Path, help="index folder to create")
    p.add_argument("--factory", default="Flat", help="faiss index factory string, e.g. Flat, HNSW32, IVF256,PQ32 (default: %(default)s)")
    p.add_argument("--classes", default="all", help=CONFIG_HELP["classes"] + " (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=64, help="images per inference batch (default: %(default)s)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing index folder")
    p.set_defaults(func=cmd_index_build)

    p = sub.add_parser("serve", help="answer gRPC queries with the student against the index")
    p.add_argument("--index", required=True, type=_existing_path("index folder"), help="index folder")
    p.add_argument("--student", required=True, type=_existing_path("student ONNX model"), help="student .onnx (with its .json)")
    p.add_argument("--host", default="0.0.0.0", help="address to bind (default: %(default)s)")
    p.add_argument("--port", type=int, default=50051, help="port (default: %(default)s)")
    p.add_argument("--workers", type=int, default=8, help="request threads (default: %(default)s)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("query", help="send images to a running server and print the ranked results")
    p.add_argument("images", nargs="+", type=_existing_path("image"), metavar="IMAGE")
    p.add_argument("--server", default="localhost:50051", help="HOST:PORT (default: %(default)s)")
    p.add_argument("-k", type=int, default=5, help="results per query (default: %(default)s)")
    p.add_argument("--on-device", type=_existing_path("student ONNX model"), metavar="S.onnx",
                   help="embed locally with this student and send only the vector")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds per request (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="one JSON object per query on stdout")
    p.set_defaults(func=cmd_query)

    p = sub.add_parser("eval", help="Recall@K and mAP: teacher-teacher, student-student, student-teacher")
    p.add_argument("--data", required=True, type=_existing_path("image folder"), help="labelled image folder")
    p.add_argument("--teacher", required=True, type=_existing_path("teacher ONNX model"))
    p.add_argument("--student", required=True, type=_existing_path("student ONNX model"))
    p.add_argument("--index", type=_existing_path("index folder"),
                   help="query this built index for the asymmetric setting instead of an in-memory database")
    p.add_argument("--classes", default="all", help=CONFIG_HELP["classes"] + " (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--json", action="store_true", help="print exactly one JSON object")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("demo", help="the whole pipeline end to end on generated (or given) data")
    _add_config_options(p, DemoConfig, required=("workdir",))
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except UserError as e:
        print(f"asymsearch: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("asymsearch: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
