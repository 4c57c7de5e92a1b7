"""`asymsearch index push FOLDER --server HOST:PORT`: send images over the wire to a server's Admin service, which
embeds them with its teacher and publishes a new index version (the server never opens a path of ours)."""
from __future__ import annotations

import argparse
import sys

from asymsearch.cli.options import Commands, add_connection_options, connection_kwargs, existing_path


def register(commands: Commands) -> None:
    p = commands.add("push", group="index",
                     help="send an image folder to a running server (Admin.UploadImages) to be added to its index",
                     description="Every image below FOLDER (label: the name of its parent folder) is sent over the "
                                 "wire to the server, which embeds them with its teacher (`serve --admin --teacher "
                                 "T.onnx`), publishes a new index version and serves it. Needs an admin-scope "
                                 "token (--token-file); the server needs TLS unless it listens on loopback.")
    p.add_argument("folder", type=existing_path("image folder"), metavar="FOLDER")
    p.add_argument("--server", required=True, metavar="HOST:PORT", help="the server's address")
    p.add_argument("--metadata", type=existing_path("metadata CSV"), metavar="CSV",
                   help="user metadata: a CSV with a `path` column (relative to FOLDER) and any other columns")
    add_connection_options(p, retries=0)
    p.set_defaults(func=run, timeout=600.0)  # an upload takes longer than a query


def run(args: argparse.Namespace) -> int:
    from asymsearch.clients.client import SearchClient, SearchError
    from asymsearch.core.errors import UserError

    kw = connection_kwargs(args)
    with SearchClient(args.server, **kw) as client:
        try:
            reply = client.push_folder(args.folder, args.metadata, timeout=args.timeout)
        except SearchError as e:
            raise UserError(str(e)) from None
    print(f"asymsearch: {reply['message'] or 'pushed'}; the server now serves version {reply['index_version']} "
          f"({reply['count']} items)", file=sys.stderr)
    return 0
