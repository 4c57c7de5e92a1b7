"""`asymsearch bench serve`: the gRPC server under load from client processes, interleaved with the in-process
limit of the same pipeline (see `asymsearch.bench.serve`)."""
from __future__ import annotations

import argparse
import shlex
from pathlib import Path

from asymsearch.cli.options import Commands, existing_path


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"concurrency levels must be positive, got {text!r}")
    return values


def _kinds(text: str) -> tuple[str, ...]:
    kinds = tuple(k.strip() for k in text.split(",") if k.strip())
    if not kinds or any(k not in ("image", "vector") for k in kinds):
        raise argparse.ArgumentTypeError(f"expected image, vector or image,vector; got {text!r}")
    return kinds


def register(commands: Commands) -> None:
    p = commands.add(
        "serve", group="bench", help="server q/s and CPU per query under load vs the in-process limit, interleaved",
        description="Start `asymsearch serve` in its own process and load it from client processes on 127.0.0.1, "
                    "in rounds interleaved with the in-process limit (the same decode + student + faiss steps in "
                    "this process, no gRPC). Reports q/s and process CPU ms per query of each (the server's from "
                    "its /metrics), refuses a server/limit q/s ratio above 1.05 (the limit would be wrong), and "
                    "the latency of health and vector queries with N idle streams open. Without --student: a "
                    "zero-shot EfficientNet-Lite2 teacher (260 px) and a Lite0 student (224 px) are made and "
                    "exported in --workdir, and the second half of --images' classes is indexed. Writes JSON with "
                    "provenance, Markdown and a PNG. Slow (minutes): run it with `nice` on a shared machine.")
    p.add_argument("--images", required=True, type=existing_path("image folder"),
                   help="labelled images ROOT/<class>/<image>: queries from the first half of the classes, the "
                        "index (when it is built here) from the second")
    p.add_argument("--student", type=existing_path("student model"),
                   help="student .onnx (with its .json) or checkpoint (exported here); default: the Lite0 made here")
    p.add_argument("--teacher", type=existing_path("teacher model"),
                   help="teacher .onnx or checkpoint that builds the index (with --student, without --index)")
    p.add_argument("--index", type=existing_path("index folder"), help="index folder or root (with --student)")
    p.add_argument("--student-size", type=int, default=None,
                   help="input size of the Lite0 student made here (default: its own, 224)")
    p.add_argument("--workdir", type=Path, default=Path("bench-serve-work"),
                   help="models and index made here are kept here and reused (default: %(default)s)")
    p.add_argument("--out", type=Path, default=Path("docs/results/bench_serve.json"),
                   help="JSON report; .md and .png beside it (default: %(default)s)")
    p.add_argument("--concurrency", type=_ints, default=(1, 16), help="server levels (default: 1,16)")
    p.add_argument("--kinds", type=_kinds, default=("image", "vector"), help="query kinds (default: image,vector)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default: %(default)s)")
    p.add_argument("--seconds", type=float, default=5.0, help="seconds per candidate per round (default: %(default)s)")
    p.add_argument("--client-processes", type=int, default=2,
                   help="load generator processes (default: %(default)s)")
    p.add_argument("-k", type=int, default=10, help="results per query (default: %(default)s)")
    p.add_argument("--query-images", type=int, default=64, help="distinct query images (default: %(default)s)")
    p.add_argument("--limit-threads", type=int, default=None, help="the limit's workers (default: as many as the server's decode + embed workers, so that a "
                        "shared machine gives both the same share)")
    p.add_argument("--limit-batch", type=int, default=8,
                   help="queries per faiss search in the limit (default: %(default)s)")
    p.add_argument("--limit-embed-batch", type=int, default=1,
                   help="images per student call in the limit (default: %(default)s, the cheapest per image for "
                        "EfficientNet-Lite on a CPU)")
    p.add_argument("--idle-streams", type=int, default=1000,
                   help="idle SearchStream calls held open for the resilience line; 0 skips it (default: %(default)s)")
    p.add_argument("--large-images", type=int, default=16,
                   help="16-bit PNGs sent at once for the large-image line; 0 skips it (default: %(default)s)")
    p.add_argument("--large-side", type=int, default=6300,
                   help="their side in pixels (default: %(default)s, under the default pixel cap)")
    p.add_argument("--serve-args", default="",
                   help="extra arguments for `asymsearch serve`, as one string (e.g. \"--embed-threads 2\")")
    p.add_argument("--compare-serve-args", default=None, metavar="ARGS",
                   help="also run a second server with these `asymsearch serve` arguments (one string; \"\" for the "
                        "defaults), interleaved in the same rounds as the first and the limit, to tell two "
                        "configurations apart on a busy machine; the targets are judged on the first server")
    p.add_argument("--compare-pythonpath", default=None, metavar="DIR",
                   help="run the second server's code from DIR (a PYTHONPATH holding another `asymsearch` tree, e.g. "
                        "a checkout of another commit), to compare two versions of the server in one run")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from asymsearch.bench.serve import ServeBenchConfig, refusals, run_bench
    from asymsearch.core.errors import UserError

    if args.rounds < 1 or args.seconds <= 0 or args.client_processes < 1 or args.idle_streams < 0 \
            or args.large_images < 0 or args.large_side < 1:
        raise UserError("--rounds, --seconds, --client-processes and --large-side must be positive, --idle-streams "
                        "and --large-images at least 0")
    cfg = ServeBenchConfig(images=args.images, workdir=args.workdir, out_json=args.out, student=args.student,
                           teacher=args.teacher, index=args.index, student_size=args.student_size,
                           concurrency=args.concurrency, kinds=args.kinds, rounds=args.rounds, seconds=args.seconds,
                           k=args.k, client_processes=args.client_processes, query_images=args.query_images,
                           limit_threads=args.limit_threads, limit_batch=args.limit_batch,
                           limit_embed_batch=args.limit_embed_batch,
                           idle_streams=args.idle_streams, large_images=args.large_images,
                           large_side=args.large_side, serve_args=tuple(shlex.split(args.serve_args)),
                           compare_serve_args=None if args.compare_serve_args is None and args.compare_pythonpath is None
                           else tuple(shlex.split(args.compare_serve_args or "")),
                           compare_pythonpath=args.compare_pythonpath)
    report = run_bench(cfg, log=lambda m: print(m, flush=True))
    print(f"wrote {args.out}, {args.out.with_suffix('.md')} and {args.out.with_suffix('.png')}")
    for name, t in report["targets"].items():
        print(f"target {name}: {'met' if t['met'] else 'NOT met'} ({t['target']}; measured {t['measured']})")
    refused = refusals(report)
    for message in refused:
        print(f"asymsearch: bench serve: {message}")
    return 1 if refused else 0
