"""`asymsearch bench index`: teacher embedding throughput (raw ORT vs the build pipeline) and faiss index types on
synthetic vectors (build time, memory, latency, QPS, recall@10 against exact search)."""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from asymsearch.cli.options import Commands, existing_path


def register(commands: Commands) -> None:
    p = commands.add("index", group="bench",
                     help="teacher embedding: raw ORT vs full build pipeline; faiss index types on synthetic vectors")
    p.add_argument("--teacher", type=existing_path("teacher ONNX model"),
                   help="teacher .onnx for the embedding part (left out: only the faiss part runs)")
    p.add_argument("--images", type=existing_path("image folder"), help="images for the embedding part")
    p.add_argument("--limit", type=int, default=256, help="images used for the embedding part (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=32, help="inference batch (default: %(default)s)")
    p.add_argument("--workers", type=int, default=None, help="decoding threads (default: CPU count, max 8)")
    p.add_argument("--reps", type=int, default=2, help="interleaved repetitions of each side (default: %(default)s)")
    p.add_argument("--sizes", default="100000,1000000",
                   help="comma-separated database sizes for the faiss part; empty to skip (default: %(default)s)")
    p.add_argument("--factories", default=None,
                   help="comma-separated factories (';' between them when a factory has commas), default: "
                        "Flat, HNSW32, IVF{n},Flat, IVF{n},SQ8, IVF{n},PQ64, OPQ64,IVF{n},PQ64")
    p.add_argument("--dim", type=int, default=512, help="vector dimension (default: %(default)s)")
    p.add_argument("--queries", type=int, default=1000, help="held-out queries (default: %(default)s)")
    p.add_argument("--threads", type=int, default=None,
                   help="faiss OpenMP threads for the faiss part (default: faiss's own; 1 gives stable figures on a "
                        "shared machine)")
    p.add_argument("--milvus", nargs="?", const="milvus-lite:///tmp/asymsearch-bench-milvus/bench.db", default=None,
                   metavar="LOCATION",
                   help="instead of the faiss sweep: Milvus against faiss on the same synthetic vectors at each of "
                        "--sizes (FLAT and IVF_FLAT with full probing: top-10 agreement; each backend's IVF and HNSW "
                        "side by side), written to --milvus-out; LOCATION a Milvus Lite file or milvus://HOST:PORT/NAME "
                        "(default: a Lite file under /tmp); scratch collections are dropped afterwards")
    p.add_argument("--milvus-out", type=Path, default=Path("docs/results/bench_index_milvus.md"),
                   help="results of --milvus; a .json beside it (default: %(default)s)")
    p.add_argument("--nlist", type=int, default=256, help="--milvus: IVF lists on both backends (default: %(default)s)")
    p.add_argument("--filter-bench", action="store_true",
                   help="only the filtered-query bench: an index folder of --filter-size synthetic vectors of "
                        "--filter-dim with metadata; filters matching 1%% (and ~50%%) searched on Flat, IVF and HNSW "
                        "against brute force over the matching items (writes --filter-out)")
    p.add_argument("--filter-size", type=int, default=1_000_000, help="--filter-bench items (default: %(default)s)")
    p.add_argument("--filter-dim", type=int, default=32, help="--filter-bench dimension (default: %(default)s)")
    p.add_argument("--filter-out", type=Path, default=Path("docs/results/bench_index_filter.md"),
                   help="results of --filter-bench; a .json beside it (default: %(default)s)")
    p.add_argument("--auto-database", type=existing_path("database vectors"), metavar="REAL.npy",
                   help="--auto on student queries instead of the synthetic sweep: the teacher's vectors of real "
                        "database images (count, dim), grown to each of --sizes with synthetic vectors drawn around "
                        "them; needs --auto-queries and --auto-eval-queries")
    p.add_argument("--auto-queries", type=existing_path("tuning query vectors"), metavar="TUNE.npy",
                   help="student query vectors --auto tunes on (held-out images of validation classes)")
    p.add_argument("--auto-eval-queries", type=existing_path("evaluation query vectors"), metavar="EVAL.npy",
                   help="student query vectors the chosen index is measured on once (evaluation classes)")
    p.add_argument("--auto-min-speedup", type=float, default=10.0,
                   help="--auto latency target: exact search's single-query time divided by this "
                        "(default: %(default)s)")
    p.add_argument("--auto-max-memory", default="4G", help="--auto memory budget (default: %(default)s)")
    p.add_argument("--out", type=Path, default=Path("docs/results/bench_index.md"),
                   help="results table; a .json beside it (default: %(default)s)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from asymsearch.bench.index import bench_ann, bench_teacher, check_writable, log_stderr, write_results
    from asymsearch.core.data import list_images_flat
    from asymsearch.core.errors import UserError
    command = "asymsearch " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    if args.filter_bench:
        return run_filter(args, command)
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    factories = None
    if args.factories:
        factories = [f.strip() for f in args.factories.split(";" if ";" in args.factories else ",") if f.strip()]
    if bool(args.teacher) != bool(args.images):
        raise UserError("the embedding part needs both --teacher and --images")
    if args.auto_database or args.auto_queries or args.auto_eval_queries:
        return run_auto(args, command, sizes)
    check_writable(args.out.with_suffix(".json"))  # before minutes of measuring
    teacher = None
    if args.teacher:
        items = list_images_flat(args.images)[:args.limit]
        teacher = bench_teacher(args.teacher, items, batch_size=args.batch_size, workers=args.workers,
                                reps=args.reps, log=log_stderr)
        write_results(args.out, command, teacher, [])
    if args.milvus:
        return run_milvus(args, command, sizes)
    ann: list[dict] = []
    if args.threads:
        import faiss
        faiss.omp_set_num_threads(args.threads)
    bench_ann(sizes, dim=args.dim, queries=args.queries, factories=factories, log=log_stderr,
              on_result=lambda row: (ann.append(row), write_results(args.out, command, teacher, ann)))
    write_results(args.out, command, teacher, ann)
    print(args.out.read_text())
    return 0


def run_auto(args: argparse.Namespace, command: str, sizes: list[int]) -> int:
    import numpy as np

    from asymsearch.bench.index import bench_auto, check_writable, log_stderr, write_auto_results
    from asymsearch.core.errors import UserError
    from asymsearch.index.auto import check_queries
    if not (args.auto_database and args.auto_queries and args.auto_eval_queries):
        raise UserError("--auto on student queries needs --auto-database, --auto-queries and --auto-eval-queries")
    if not sizes:
        raise UserError("--auto on student queries needs at least one of --sizes")
    check_writable(args.out.with_suffix(".json"), key="auto")
    loaded = {}
    for name in ("auto_database", "auto_queries", "auto_eval_queries"):
        try:
            loaded[name] = np.load(getattr(args, name), allow_pickle=False)
        except (OSError, ValueError) as e:
            raise UserError(f"cannot read {getattr(args, name)} as a .npy array ({e.__class__.__name__})") from None
    real = check_queries(loaded["auto_database"], np.shape(loaded["auto_database"])[-1], str(args.auto_database))
    tune = check_queries(loaded["auto_queries"], real.shape[1], str(args.auto_queries))
    evaluate = check_queries(loaded["auto_eval_queries"], real.shape[1], str(args.auto_eval_queries))
    rows = bench_auto(real, tune, evaluate, sizes, min_speedup=args.auto_min_speedup,
                      max_memory=args.auto_max_memory, log=log_stderr)
    write_auto_results(args.out, command, rows)
    print(args.out.read_text())
    return 0


def run_milvus(args: argparse.Namespace, command: str, sizes: list[int]) -> int:
    from asymsearch.bench.index import check_writable, log_stderr
    from asymsearch.core.errors import UserError
    from asymsearch.index.milvus import parse_location
    parse_location(args.milvus)
    if not sizes:
        raise UserError("--milvus needs at least one of --sizes")
    check_writable(args.milvus_out.with_suffix(".json"), key="milvus")
    if args.threads:
        import faiss
        faiss.omp_set_num_threads(args.threads)  # Milvus Lite searches with the same faiss, in this process
    from asymsearch.bench.milvus_index import bench_milvus, write_milvus_results
    rows = bench_milvus(sizes, location=args.milvus, dim=args.dim, queries=args.queries, nlist=args.nlist,
                        log=log_stderr)
    write_milvus_results(args.milvus_out, command, rows)
    print(args.milvus_out.read_text())
    return 0


def run_filter(args: argparse.Namespace, command: str) -> int:
    from asymsearch.bench.index import check_writable, log_stderr
    from asymsearch.bench.index_filter import bench_filters, write_filter_results
    from asymsearch.core.errors import UserError
    if args.filter_size < 1000 or args.filter_dim < 1:
        raise UserError(f"--filter-size must be at least 1000 and --filter-dim positive, got {args.filter_size}, "
                        f"{args.filter_dim}")
    check_writable(args.filter_out.with_suffix(".json"), key="filters")
    if args.threads:
        import faiss
        faiss.omp_set_num_threads(args.threads)
    factories = None
    if args.factories:  # with the bench's own search settings: nprobe 16 for IVF, efSearch 64 for HNSW
        names = [f.strip() for f in args.factories.split(";" if ";" in args.factories else ",") if f.strip()]
        factories = [(f, {"nprobe": 16} if "IVF" in f else {"efSearch": 64} if "HNSW" in f else {}) for f in names]
    rows = bench_filters(args.filter_size, args.filter_dim, queries=min(args.queries, 1000), factories=factories,
                         log=log_stderr)
    write_filter_results(args.filter_out, command, rows)
    print(args.filter_out.read_text())
    return 0
