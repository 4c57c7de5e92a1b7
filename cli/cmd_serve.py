"""`asymsearch serve`: the gRPC query server."""
from __future__ import annotations

import argparse

from asymsearch.cli.cmd_index import index_location
from asymsearch.cli.options import Commands, bind_config, existing_path
from asymsearch.core.errors import UserError
from asymsearch.server import defaults


def register(commands: Commands) -> None:
    p = commands.add("serve", help="answer gRPC queries with the student against the index",
                     description="Serve the index (a folder, or a versioned root whose CURRENT names the live "
                                 "version) over gRPC: Search (image, vector, batch, stream, Info), health, "
                                 "reflection, optional Admin and Prometheus metrics. See docs/server.md.")
    p.add_argument("--index", required=True, type=index_location("index folder"),
                   help="index folder or root, or a Milvus location (milvus://HOST:PORT/NAME, "
                        "milvus-lite:///path/file.db[/NAME]; --follow-current follows its alias)")
    p.add_argument("--student", required=True, action="append", type=student_spec, metavar="[TIER=]MODEL.onnx",
                   help="a student .onnx (with its .json) as a query tier: NAME=MODEL.onnx, repeatable (e.g. "
                        "--student server=lite0.onnx --student mobile=lite0.int8.onnx); the first is the default "
                        "tier of queries that name none; a bare path is the single tier 'default'")
    p.add_argument("--min-ratio", type=float, default=None,
                   help="quality gate: refuse a tier (at start, or Admin LoadStudent) whose asymmetric Recall@1 on "
                        "the index's probe set is below this fraction of the teacher's (default: 0.95 when the "
                        "index has a probe set; an index without one serves ungated, and an explicit --min-ratio "
                        "then refuses to start)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default: %(default)s, this machine only; another address without TLS "
                        "needs --insecure)")
    p.add_argument("--port", type=int, default=50051, help="port (default: %(default)s)")
    p.add_argument("--workers", type=int, default=None,
                   help="ignored: RPCs are coroutines on grpc.aio and hold no thread (kept for old scripts)")
    g = p.add_argument_group("batching and executors (defaults sized from this machine)")
    g.add_argument("--batch-max-size", type=int, default=32,
                   help="most queries per faiss batch (default: %(default)s)")
    g.add_argument("--embed-max-batch", type=int, default=defaults.EMBED_BATCH,
                   help="most images per student call (default: %(default)s)")
    g.add_argument("--embed-workers", type=int, default=defaults.EMBED_WORKERS,
                   help="student calls running at once, one per core up to 4 (default here: %(default)s)")
    g.add_argument("--embed-threads", type=int, default=1,
                   help="onnxruntime threads of each student call; 0: all cores (default: %(default)s)")
    g.add_argument("--search-threads", type=int, default=1,
                   help="faiss OpenMP threads; 0: faiss's default (default: %(default)s)")
    g.add_argument("--batch-max-delay-ms", type=float, default=1.0,
                   help="longest wait for a batch to fill, ms (default: %(default)s)")
    g.add_argument("--decode-workers", type=int, default=defaults.DECODE_WORKERS,
                   help="image decoding threads: the cores the embed workers leave, at least 1 (default here: "
                        "%(default)s)")
    a = p.add_argument_group("admission and limits (every refusal names the limit it hit)")
    a.add_argument("--queue-size", type=int, default=defaults.MAX_QUEUE,
                   help="most queries in progress; more get RESOURCE_EXHAUSTED (default: %(default)s)")
    a.add_argument("--memory-budget-mb", type=float, default=round(defaults.MEMORY_BUDGET_BYTES / 2**20),
                   help="memory the queries in progress may occupy (their bytes and decoded images, from the "
                        "header before decoding); more get RESOURCE_EXHAUSTED (default: a quarter of RAM, "
                        "%(default)s here)")
    a.add_argument("--max-pixels", type=int, default=None,
                   help="largest query image, in pixels (default: 40,000,000)")
    a.add_argument("--max-k", type=int, default=1000, help="largest k a query may ask (default: %(default)s)")
    a.add_argument("--default-k", type=int, default=10, help="k of a query that asks 0 (default: %(default)s)")
    a.add_argument("--max-message-mb", type=float, default=16.0,
                   help="largest request or reply, MiB (default: %(default)s)")
    a.add_argument("--max-batch-queries", type=int, default=None,
                   help=f"most queries in one BatchSearch call, at most --queue-size (default: "
                        f"{defaults.MAX_BATCH_QUERIES}, or --queue-size if smaller)")
    a.add_argument("--max-streams", type=int, default=defaults.MAX_STREAMS,
                   help="SearchStream calls open at once, all clients together (default: %(default)s)")
    a.add_argument("--max-concurrent-streams", type=int, default=defaults.MAX_CONCURRENT_STREAMS,
                   help="RPCs in progress on one connection (HTTP/2 streams; a client beyond it waits) "
                        "(default: %(default)s)")
    a.add_argument("--max-calls-per-peer", type=int, default=defaults.MAX_CALLS_PER_PEER,
                   help="Search calls in progress from one client address, streams included "
                        "(default: %(default)s)")
    a.add_argument("--stream-idle-s", type=float, default=defaults.STREAM_IDLE_S,
                   help="close a stream with no query in progress for this long (default: %(default)s)")
    a.add_argument("--keepalive-s", type=float, default=60.0,
                   help="ping a silent connection after this long; close it when no answer comes within "
                        "20 s (default: %(default)s)")
    a.add_argument("--min-ping-interval-s", type=float, default=10.0,
                   help="disconnect clients that ping more often than this (default: %(default)s)")
    a.add_argument("--max-connection-idle-s", type=float, default=300.0,
                   help="close a connection with no RPC for this long (default: %(default)s)")
    s = p.add_argument_group("security")
    s.add_argument("--tls-cert", type=existing_path("TLS certificate"), help="server certificate (PEM)")
    s.add_argument("--tls-key", type=existing_path("TLS private key"), help="server private key (PEM)")
    s.add_argument("--tls-client-ca", type=existing_path("client CA certificate"),
                   help="require client certificates signed by this CA (PEM)")
    s.add_argument("--token-file", type=existing_path("token file"),
                   help="bearer tokens, one per line after its scope: 'search TOKEN' or 'admin TOKEN' (admin "
                        "includes search; a token alone is an admin token); read again on SIGHUP")
    s.add_argument("--search-requires-token", action="store_true",
                   help="Search needs a search- or admin-scope token too (default: Search is open)")
    s.add_argument("--admin", action="store_true",
                   help="enable the Admin service (needs an admin token, and TLS unless bound to loopback)")
    s.add_argument("--admin-root", action="append", default=[], type=existing_path("admin root folder"),
                   metavar="DIR", help="a folder whose images a path-based AddImages may add (repeatable; "
                   "default: none, images are sent over the wire with `asymsearch index push`)")
    s.add_argument("--insecure", action="store_true",
                   help="allow plaintext on an address other machines can reach (without it, such a --host "
                        "needs --tls-cert and --tls-key)")
    s.add_argument("--expose-paths", action="store_true",
                   help="Search replies carry the server paths of the hits (default: ids, labels and metadata "
                        "only)")
    s.add_argument("--teacher", type=existing_path("teacher ONNX model"),
                   help="teacher .onnx, for the Admin service's AddImages")
    s.add_argument("--keep", type=int, default=None, help="index versions kept by Admin updates (default: all)")
    o = p.add_argument_group("operations")
    o.add_argument("--metrics-port", type=int, default=None,
                   help="serve Prometheus /metrics on this port (0: any free port; default: off)")
    o.add_argument("--metrics-host", default="127.0.0.1", help="address for /metrics (default: %(default)s)")
    o.add_argument("--follow-current", action="store_true",
                   help="reload when the index root's CURRENT names a new version (hot swap)")
    o.add_argument("--poll-s", type=float, default=1.0, help="how often to look at CURRENT (default: %(default)s)")
    o.add_argument("--drain-s", type=float, default=5.0,
                   help="seconds in-flight requests get on SIGTERM (default: %(default)s)")
    o.add_argument("--drain-announce-s", type=float, default=0.0,
                   help="on SIGTERM, seconds health says NOT_SERVING before new requests are refused "
                        "(default: %(default)s)")
    o.add_argument("--log-format", choices=("text", "json"), default="text", help="log lines (default: %(default)s)")
    o.add_argument("--log-level", default="INFO", help="DEBUG logs every RPC (default: %(default)s)")
    p.set_defaults(func=run)
    bind_config(p)  # --config FILE.yaml and KEY=VALUE over the same keys as the flags


def student_spec(value: str) -> tuple[str, str]:
    """An argparse type: `NAME=MODEL.onnx` or a bare path -> (tier, path), the path checked to exist."""
    from asymsearch.server.tiers import parse_student_specs

    try:
        ((name, path),) = parse_student_specs([value])
    except UserError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if not path.exists():
        raise argparse.ArgumentTypeError(f"student ONNX model not found: {path}")
    return name, str(path)


def _student_pairs(value) -> list[tuple[str, str]]:
    """The tiers of --student flags ((tier, path) each), of `student=...` from a config file or KEY=VALUE (a spec
    or a list of specs) or of both."""
    specs = list(value) if isinstance(value, (list, tuple)) and not (
        len(value) == 2 and isinstance(value, tuple) and isinstance(value[0], str)) else [value]
    out = []
    for spec in specs:
        if isinstance(spec, tuple):
            out.append(spec)
            continue
        try:
            out.append(student_spec(str(spec)))
        except argparse.ArgumentTypeError as e:
            raise UserError(str(e)) from None
    return out


def run(args: argparse.Namespace) -> int:
    from asymsearch.index.probe import DEFAULT_MIN_RATIO
    from asymsearch.server.admin import TeacherUpdater
    from asymsearch.server.tiers import GatePolicy, check_tier_name
    from asymsearch.server.batching import BatchingConfig
    from asymsearch.server.logs import configure_logging
    from asymsearch.server.service import ServeOptions, serve

    try:
        batching = BatchingConfig(max_batch=args.batch_max_size, max_delay_ms=args.batch_max_delay_ms,
                                  max_queue=args.queue_size, decode_workers=args.decode_workers,
                                  max_embed_batch=args.embed_max_batch, search_threads=args.search_threads,
                                  embed_workers=args.embed_workers,
                                  memory_budget_bytes=int(args.memory_budget_mb * 2**20))
    except ValueError as e:
        raise UserError(str(e)) from None
    options = ServeOptions(
        host=args.host, port=args.port,
        max_message_bytes=int(args.max_message_mb * 1024 * 1024), batching=batching,
        max_batch_queries=args.max_batch_queries, tls_cert=args.tls_cert, tls_key=args.tls_key,
        tls_client_ca=args.tls_client_ca, token_file=args.token_file,
        search_requires_token=args.search_requires_token, insecure=args.insecure, expose_paths=args.expose_paths,
        admin_roots=tuple(str(r) for r in args.admin_root),
        admin=args.admin, metrics_port=args.metrics_port, metrics_host=args.metrics_host,
        follow_current=args.follow_current, poll_s=args.poll_s, drain_s=args.drain_s,
        drain_announce_s=args.drain_announce_s, embed_threads=args.embed_threads,
        max_streams=args.max_streams, max_concurrent_streams=args.max_concurrent_streams,
        max_calls_per_peer=args.max_calls_per_peer, stream_idle_s=args.stream_idle_s,
        keepalive_time_s=args.keepalive_s, min_ping_interval_s=args.min_ping_interval_s,
        max_connection_idle_s=args.max_connection_idle_s)
    configure_logging(args.log_format, args.log_level)
    pairs = _student_pairs(args.student)
    names = [name for name, _ in pairs]
    if len(set(names)) != len(names):
        raise UserError(f"tier {next(n for n in names if names.count(n) > 1)!r} is given twice (--student "
                        f"NAME=MODEL.onnx names each tier once; a bare path is the tier 'default')")
    for name in names:
        check_tier_name(name)
    gate = GatePolicy(DEFAULT_MIN_RATIO if args.min_ratio is None else args.min_ratio,
                      required=args.min_ratio is not None)
    engine_kw = {"max_k": args.max_k, "default_k": args.default_k, "gate": gate}
    if args.max_pixels is not None:
        engine_kw["max_pixels"] = args.max_pixels
    updater = TeacherUpdater(args.teacher, keep=args.keep) if args.admin else None
    serve(args.index, pairs, host=args.host, port=args.port, options=options, updater=updater, **engine_kw)
    return 0
