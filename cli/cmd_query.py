"""`asymsearch query`: send images to a running server."""
from __future__ import annotations

import argparse
import dataclasses
import json

from asymsearch.cli.options import Commands, existing_path
from asymsearch.core.errors import UserError


def register(commands: Commands) -> None:
    p = commands.add("query", help="send images to a running server and print the ranked results")
    p.add_argument("images", nargs="+", type=existing_path("image"), metavar="IMAGE")
    p.add_argument("--server", default="localhost:50051", help="HOST:PORT (default: %(default)s)")
    p.add_argument("-k", type=int, default=5, help="results per query (default: %(default)s)")
    p.add_argument("--on-device", type=existing_path("student ONNX model"), metavar="S.onnx",
                   help="embed locally with this student and send only the vector")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds per request (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="one JSON object per query on stdout")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
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
    for r in results:
        if args.json:
            print(json.dumps(r))
            continue
        print(r["query"])
        for rank, h in enumerate(r["hits"], start=1):
            print(f"  {rank:>3}  {h['score']:.4f}  {h['label']:<24}  {h['path']}")
    return 0
