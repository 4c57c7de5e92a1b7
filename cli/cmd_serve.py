"""`asymsearch serve`: the gRPC query server."""
from __future__ import annotations

import argparse

from asymsearch.cli.options import Commands, existing_path


def register(commands: Commands) -> None:
    p = commands.add("serve", help="answer gRPC queries with the student against the index")
    p.add_argument("--index", required=True, type=existing_path("index folder"), help="index folder")
    p.add_argument("--student", required=True, type=existing_path("student ONNX model"),
                   help="student .onnx (with its .json)")
    p.add_argument("--host", default="0.0.0.0", help="address to bind (default: %(default)s)")
    p.add_argument("--port", type=int, default=50051, help="port (default: %(default)s)")
    p.add_argument("--workers", type=int, default=8, help="request threads (default: %(default)s)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from asymsearch.server.service import serve
    serve(args.index, args.student, host=args.host, port=args.port, max_workers=args.workers)
    return 0
