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
                                 "GET /thumb/ID) through an HTTP gateway (Starlette on uvicorn) to the gRPC server. "
                                 "It answers only requests whose Host is the bound address, localhost or 127.0.0.1 "
                                 "(or an --allow-host), refuses cross-site requests (an Origin other than the "
                                 "page's own or an --allow-origin), times out slow clients, caps connections and "
                                 "uploads, and stops within a second of SIGINT or SIGTERM. The gateway's --token "
                                 "is only ever sent to the server. See docs/clients.md.")
    p.add_argument("--server", default="localhost:50051", metavar="HOST:PORT",
                   help="the gRPC server; several, comma-separated, are used round robin (default: %(default)s)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address the page is served on (default: %(default)s, this machine only). Another address "
                        "opens the page, plain HTTP and without a login of its own, to whoever reaches it, and "
                        "lets them search with the gateway's --token; add the names they use with --allow-host")
    p.add_argument("--insecure", action="store_true",
                   help="allow --host to be an address other machines can reach (plain HTTP, no login)")
    p.add_argument("--port", type=int, default=8080, help="HTTP port; 0 picks a free one (default: %(default)s)")
    p.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                   help="also answer requests whose Host header is NAME (e.g. the machine's name when --host "
                        "0.0.0.0); repeatable. Other Hosts get 400 (DNS rebinding guard)")
    p.add_argument("--allow-origin", action="append", default=[], metavar="URL",
                   help="also accept requests from pages at this origin (scheme://host[:port]); repeatable. "
                        "Requests with another Origin than the page's own get 403")
    p.add_argument("-k", type=int, default=5, help="results per search unless the page asks otherwise "
                                                   "(default: %(default)s)")
    p.add_argument("--max-upload-mb", type=float, default=None, metavar="MIB",
                   help="largest image accepted, MiB; larger ones get HTTP 413 while they stream in (default: the "
                        "largest that fits in one message to the server: 16 MiB less 64 bytes at the server's default "
                        "message limit; more than fits is refused at start)")
    p.add_argument("--max-connections", type=int, default=32, metavar="N",
                   help="connections and requests at a time; beyond, HTTP 503 (default: %(default)s)")
    p.add_argument("--header-timeout", type=float, default=10.0, metavar="S",
                   help="seconds a connection has to send each request's headers before it is closed "
                        "(default: %(default)s)")
    p.add_argument("--body-timeout", type=float, default=60.0, metavar="S",
                   help="seconds an upload may take; slower ones get HTTP 408 (default: %(default)s)")
    add_connection_options(p, retries=1)
    p.add_argument("--log-level", default="INFO", help="INFO logs every request (default: %(default)s)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import logging

    from asymsearch.clients.client import SearchClient, SearchError
    from asymsearch.clients.web import GatewayOptions, max_image_bytes, serve_web
    from asymsearch.core.net import is_loopback

    if args.k < 1:
        raise UserError(f"-k must be at least 1, got {args.k}")
    if args.max_upload_mb is not None and args.max_upload_mb <= 0:
        raise UserError("--max-upload-mb must be positive")
    if not 0 <= args.port <= 65535:
        raise UserError(f"--port must be 0..65535, got {args.port}")
    if args.max_connections < 1:
        raise UserError(f"--max-connections must be at least 1, got {args.max_connections}")
    if not args.header_timeout > 0 or not args.body_timeout > 0:
        raise UserError("--header-timeout and --body-timeout must be positive")
    for origin in args.allow_origin:
        if "://" not in origin or origin.rstrip("/").count("/") != 2:
            raise UserError(f"--allow-origin takes scheme://host[:port], got {origin!r}")
    if not is_loopback(args.host) and not args.insecure:
        raise UserError(f"serving the page on {args.host} (reachable from other machines) over plain HTTP needs "
                        f"--insecure: anyone who reaches it searches with this gateway's credentials; or keep the "
                        f"default 127.0.0.1 behind a TLS proxy")
    kw = connection_kwargs(args)
    level = getattr(logging, str(args.log_level).upper(), None)
    if not isinstance(level, int):
        raise UserError(f"unknown --log-level {args.log_level!r}")
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    addresses = server_addresses([args.server])
    with SearchClient(addresses, **kw) as client:
        server_max_message = 0
        try:
            info = client.info()
        except SearchError as e:  # the page says so too, on every search; the gateway still starts
            print(f"asymsearch web: warning: {str(e).splitlines()[0] if str(e) else e}", file=sys.stderr)
        else:
            server_max_message = int(info.get("max_message_bytes") or 0)
            print(f"asymsearch web: {client.address} serves {info['count']} images "
                  f"(student {info['student_id']}, teacher {info['teacher_id']})", file=sys.stderr)
        fits = max_image_bytes(server_max_message)
        max_upload = fits if args.max_upload_mb is None else int(args.max_upload_mb * 2**20)
        if max_upload > fits:
            raise UserError(f"--max-upload-mb {args.max_upload_mb:g} is more than one message to the server "
                            f"holds: at most {fits} bytes ({fits / 2**20:.2f} MiB)")
        if not is_loopback(args.host):
            print(f"asymsearch web: warning: serving on {args.host}, reachable from other machines, over plain "
                  f"HTTP and without a login: anyone who reaches it searches with this gateway's credentials",
                  file=sys.stderr)
        options = GatewayOptions(default_k=args.k, max_upload_bytes=max_upload,
                                 max_connections=args.max_connections, header_timeout=args.header_timeout,
                                 body_timeout=args.body_timeout, allow_hosts=tuple(args.allow_host),
                                 allow_origins=tuple(args.allow_origin))
        serve_web(client, host=args.host, port=args.port, options=options)
    return 0
