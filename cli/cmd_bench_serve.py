"""`asymsearch bench serve`: the gRPC server under load from client processes, against the in-process limit."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from asymsearch.cli.options import Commands, existing_path
from asymsearch.core.errors import UserError


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"concurrency levels must be positive, got {text!r}")
    return values


def _sweep(text: str) -> tuple[tuple[int, float, int | None], ...]:
    """"B:D[:E],..." -> ((max batch, max delay ms, embed batch or None), ...)."""
    out = []
    try:
        for item in text.split(","):
            parts = item.split(":")
            if len(parts) not in (2, 3):
                raise ValueError
            out.append((int(parts[0]), float(parts[1]), int(parts[2]) if len(parts) == 3 else None))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected BATCH:DELAY_MS[:EMBED_BATCH],... e.g. 8:0,32:1:4, "
                                         f"got {text!r}") from None
    return tuple(out)


def register(commands: Commands) -> None:
    p = commands.add("serve", group="bench", help="server throughput and latency under load vs the in-process limit",
                     description="Start `asymsearch serve` and N client processes on 127.0.0.1; print the in-process "
                                 "limit (decode + batched student + search, no gRPC), the server's throughput and "
                                 "p50/p95/p99 at each concurrency for image and vector queries, a soak and an "
                                 "overload run. Writes JSON and a PNG. Without --index/--student everything is "
                                 "generated (synthetic images, random-weight CNNs, distractor vectors).")
    p.add_argument("--index", type=existing_path("index folder"), help="index folder or root (with --student)")
    p.add_argument("--student", type=existing_path("student ONNX model"), help="student .onnx (with --index)")
    p.add_argument("--images", type=existing_path("image folder"), help="query images (ROOT/<class>/<image>)")
    p.add_argument("--workdir", type=Path, default=Path("bench-serve-work"), help="generated artifacts go here")
    p.add_argument("--out", type=Path, default=Path("docs/results/bench_serve.json"), help="JSON report")
    p.add_argument("--plot", type=Path, default=None, help="PNG (default: the JSON path with .png)")
    p.add_argument("--concurrency", type=_ints, default=(1, 4, 16, 64), help="levels (default: 1,4,16,64)")
    p.add_argument("--seconds", type=float, default=5.0, help="seconds per level (default: %(default)s)")
    p.add_argument("--soak-seconds", type=float, default=60.0, help="soak length, 0 skips (default: %(default)s)")
    p.add_argument("--soak-concurrency", type=int, default=16, help="(default: %(default)s)")
    p.add_argument("--client-processes", type=int, default=8, help="load generator processes (default: %(default)s)")
    p.add_argument("-k", type=int, default=10, help="results per query (default: %(default)s)")
    p.add_argument("--distractors", type=int, default=100_000,
                   help="random vectors added to a generated index (default: %(default)s)")
    p.add_argument("--batch-max-size", type=int, default=32, help="server setting (default: %(default)s)")
    p.add_argument("--batch-max-delay-ms", type=float, default=1.0, help="server setting (default: %(default)s)")
    p.add_argument("--embed-max-batch", type=int, default=None, help="server setting (default: batch max size)")
    p.add_argument("--embed-threads", type=int, default=1, help="server setting (default: %(default)s)")
    p.add_argument("--search-threads", type=int, default=1, help="server setting (default: %(default)s)")
    p.add_argument("--decode-workers", type=int, default=2, help="server setting (default: %(default)s)")
    p.add_argument("--queue-size", type=int, default=256, help="server setting (default: %(default)s)")
    p.add_argument("--workers", type=int, default=64, help="server RPC threads (default: %(default)s)")
    p.add_argument("--overload-concurrency", type=int, default=128, help="(default: %(default)s)")
    p.add_argument("--overload-queue", type=int, default=16,
                   help="queue size of the overload run, 0 skips it (default: %(default)s)")
    p.add_argument("--sweep", type=_sweep, default=(), metavar="B:D[:E],...",
                   help="also try these max-batch:max-delay-ms[:embed-batch] settings (to choose the defaults)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from asymsearch.cli.bench_serve import BenchConfig, run_bench
    if args.client_processes < 1 or args.seconds <= 0:
        raise UserError("--client-processes and --seconds must be positive")
    cfg = BenchConfig(workdir=args.workdir, out_json=args.out, out_png=args.plot or args.out.with_suffix(".png"),
                      index=args.index, student=args.student, images=args.images, concurrency=args.concurrency,
                      seconds=args.seconds, soak_seconds=args.soak_seconds, soak_concurrency=args.soak_concurrency,
                      k=args.k, client_processes=args.client_processes, distractors=args.distractors,
                      batch_max_size=args.batch_max_size, batch_max_delay_ms=args.batch_max_delay_ms,
                      embed_max_batch=args.embed_max_batch, embed_threads=args.embed_threads,
                      search_threads=args.search_threads, decode_workers=args.decode_workers,
                      queue_size=args.queue_size, workers=args.workers,
                      overload_concurrency=args.overload_concurrency, overload_queue=args.overload_queue,
                      sweep=args.sweep, command="asymsearch " + " ".join(sys.argv[1:]))
    report = run_bench(cfg, log=lambda m: print(m, flush=True))
    print(f"wrote {cfg.out_json} and {cfg.out_png}")
    for name, t in report["targets"].items():
        print(f"target {name}: {'met' if t['met'] else 'NOT met'} ({ {k: v for k, v in t.items() if k != 'met'} })")
    return 0
