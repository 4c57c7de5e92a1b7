"""`asymsearch web`: a web page (upload or drop an image, see the top-k) through an HTTP gateway to the server."""
from __future__ import annotations

import argparse
import sys

from asymsearch.cli.options import Commands, add_connection_options, connection_kwargs, server_addresses
from asymsearch.core.errors import UserError


def register(commands: Commands) -> None:
    p = commands.add("web", help="serve a web page for searching a running server",
                     description="Serve a small web page (upload or drop an image; see the top-k thumbnails with "
                                 "scores, labels and latency) and its JSON API (POST /api/search, GET /api/info, "
                                 "GET /thumb/ID) through an HTTP gateway to the gRPC server. See docs/clients.md.")
    p.add_argument("--server", default="localhost:50051", metavar="HOST:PORT",
                   help="the gRPC server; several, comma-separated, are used round robin (default: %(default)s)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address the page is served on (default: %(default)s; 0.0.0.0 opens it to the network)")
    p.add_argument("--port", type=int, default=8080, help="HTTP port; 0 picks a free one (default: %(default)s)")
    p.add_argument("-k", type=int, default=5, help="results per search unless the page asks otherwise "
                                                   "(default: %(default)s)")
    p.add_argument("--max-upload-mb", type=float, default=16.0,
                   help="largest image accepted, MiB; larger ones get HTTP 413 (default: %(default)s)")
    add_connection_options(p, retries=1)
    p.add_argument("--log-level", default="INFO", help="INFO logs every request (default: %(default)s)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import logging

    from asymsearch.clients.client import SearchClient, SearchError
    from asymsearch.clients.web import GatewayOptions, serve_web

    if args.k < 1:
        raise UserError(f"-k must be at least 1, got {args.k}")
    if args.max_upload_mb <= 0:
        raise UserError("--max-upload-mb must be positive")
    if not 0 <= args.port <= 65535:
        raise UserError(f"--port must be 0..65535, got {args.port}")
    kw = connection_kwargs(args)
    level = getattr(logging, str(args.log_level).upper(), None)
    if not isinstance(level, int):
        raise UserError(f"unknown --log-level {args.log_level!r}")
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    addresses = server_addresses([args.server])
    options = GatewayOptions(default_k=args.k, max_upload_bytes=int(args.max_upload_mb * 2**20))
    with SearchClient(addresses, **kw) as client:
        try:
            info = client.info()
        except SearchError as e:  # the page says so too, on every search; the gateway still starts
            print(f"asymsearch web: warning: {str(e).splitlines()[0] if str(e) else e}", file=sys.stderr)
        else:
            print(f"asymsearch web: {client.address} serves {info['count']} images "
                  f"(student {info['student_id']}, teacher {info['teacher_id']})", file=sys.stderr)
        serve_web(client, host=args.host, port=args.port, options=options)
    return 0
