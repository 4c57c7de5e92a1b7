"""`asymsearch web`: a web page (upload or drop an image, see the top-k) through an HTTP gateway to the server."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from asymsearch.cli.options import Commands
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
    p.add_argument("--timeout", type=float, default=10.0, help="deadline per gRPC call, seconds "
                                                               "(default: %(default)s)")
    p.add_argument("--retries", type=int, default=1,
                   help="retries of an unavailable server, with back-off (default: %(default)s)")
    token = p.add_mutually_exclusive_group()
    token.add_argument("--token", help="bearer token for the server (visible in the process list: prefer "
                                       "--token-file or $ASYMSEARCH_TOKEN)")
    token.add_argument("--token-file", type=Path, metavar="FILE", help="file holding the bearer token")
    p.add_argument("--tls", action="store_true", help="TLS to the server, verified with the system's roots")
    p.add_argument("--tls-ca", type=Path, metavar="PEM", help="TLS to the server, verified with this CA")
    p.add_argument("--tls-cert", type=Path, metavar="PEM", help="client certificate (with --tls-key)")
    p.add_argument("--tls-key", type=Path, metavar="PEM", help="client private key (with --tls-cert)")
    p.add_argument("--tls-server-name", metavar="NAME", help="check the server's certificate for this name")
    p.add_argument("--log-level", default="INFO", help="INFO logs every request (default: %(default)s)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import logging

    from asymsearch.cli.cmd_query import _strip_scheme, _token
    from asymsearch.clients.client import SearchClient, SearchError, TlsOptions, _split
    from asymsearch.clients.web import GatewayOptions, serve_web

    if args.k < 1:
        raise UserError(f"-k must be at least 1, got {args.k}")
    if args.timeout <= 0 or args.retries < 0 or args.max_upload_mb <= 0:
        raise UserError("--timeout and --max-upload-mb must be positive and --retries at least 0")
    if not 0 <= args.port <= 65535:
        raise UserError(f"--port must be 0..65535, got {args.port}")
    if bool(args.tls_cert) != bool(args.tls_key):
        raise UserError("a client certificate needs both --tls-cert and --tls-key")
    tls = None
    if args.tls or args.tls_ca or args.tls_cert:
        tls = TlsOptions(root_ca=args.tls_ca, cert=args.tls_cert, key=args.tls_key,
                         server_name=args.tls_server_name)
    level = getattr(logging, str(args.log_level).upper(), None)
    if not isinstance(level, int):
        raise UserError(f"unknown --log-level {args.log_level!r}")
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    addresses = [_strip_scheme(a) for a in _split(args.server)]
    options = GatewayOptions(default_k=args.k, max_upload_bytes=int(args.max_upload_mb * 2**20))
    with SearchClient(addresses, timeout=args.timeout, token=_token(args), tls=tls, retries=args.retries) as client:
        try:
            info = client.info()
        except SearchError as e:  # the page says so too, on every search; the gateway still starts
            print(f"asymsearch web: warning: {str(e).splitlines()[0] if str(e) else e}", file=sys.stderr)
        else:
            print(f"asymsearch web: {client.address} serves {info['count']} images "
                  f"(student {info['student_id']}, teacher {info['teacher_id']})", file=sys.stderr)
        serve_web(client, host=args.host, port=args.port, options=options)
    return 0
