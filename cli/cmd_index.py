"""`asymsearch index ...`: build the database index, change it (add, remove, rollback), describe it (info)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from asymsearch.cli.options import CONFIG_HELP, Commands, bind_config, existing_path
from asymsearch.index.config import IndexAddConfig, IndexBuildConfig  # plain dataclasses, no faiss


def register(commands: Commands) -> None:
    p = commands.add("build", group="index", help="embed an image folder with the teacher and build a faiss index")
    p.add_argument("--teacher", required=True, type=existing_path("teacher ONNX model"),
                   help="teacher .onnx (with its .json)")
    p.add_argument("--images", required=True, type=existing_path("image folder"),
                   help="image folder, one subfolder per class")
    p.add_argument("--out", required=True, type=index_location(None),
                   help="index folder to create (or a versioned index root to publish a rebuilt version into), or "
                        "a Milvus location: milvus://HOST:PORT/NAME or milvus-lite:///path/file.db[/NAME] "
                        "(a new collection behind the alias NAME; docs/milvus.md)")
    p.add_argument("--factory", default="Flat",
                   help="faiss index factory string, e.g. Flat, HNSW32, IVF1024,Flat, IVF1024,PQ32, "
                        "OPQ32,IVF1024,PQ32, SQfp16 (default: %(default)s)")
    p.add_argument("--search-param", action="append", default=[], metavar="NAME=VALUE", type=search_param,
                   help="faiss search parameter stored in the manifest, e.g. nprobe=16 or efSearch=128 (repeatable)")
    p.add_argument("--auto", action="store_true",
                   help="choose the index for the data size and the budget below, and record its measured "
                        "recall@10 against exact search")
    p.add_argument("--max-memory", default="4G", help="with --auto: memory the index may take (default: %(default)s)")
    p.add_argument("--target-ms", type=float, default=5.0,
                   help="with --auto: mean single-query latency target in ms (default: %(default)s)")
    p.add_argument("--target-recall", type=float, default=0.95,
                   help="with --auto: recall@10 target against exact search (default: %(default)s)")
    p.add_argument("--auto-queries", type=existing_path("query image folder"), metavar="IMAGE_DIR",
                   help="with --auto: held-out query images (searched recursively, none of them in --images), "
                        "embedded by --student: the candidates' recall is measured on what the server will really "
                        "search with. Without these or --auto-query-vectors, --auto tunes on database vectors, "
                        "which the student's queries do not resemble, and says so")
    p.add_argument("--student", type=existing_path("student ONNX model"),
                   help="with --auto-queries: the student .onnx (of this teacher) that embeds them")
    p.add_argument("--auto-query-vectors", type=existing_path("query vectors"), metavar="FILE.npy",
                   help="with --auto: the student's query vectors instead, a (count, dim) float array in .npy")
    p.add_argument("--search-threads", type=int,
                   help="with --auto: faiss threads the candidates are timed with; keep it equal to "
                        "`serve --search-threads` (default: %(default)s)")
    p.add_argument("--classes", default="all", help=CONFIG_HELP["classes"] + " (default: %(default)s)")
    p.add_argument("--metadata", type=existing_path("metadata CSV"),
                   help="CSV with a 'path' column (relative to --images or absolute) and any columns to store")
    p.add_argument("--batch-size", type=int, default=64, help="images per inference batch (default: %(default)s)")
    p.add_argument("--shard-size", type=int, default=4096,
                   help="images per embedding shard, the most an interruption loses (default: %(default)s)")
    p.add_argument("--workers", type=int, default=None, help="image decoding threads (default: CPU count, max 8)")
    p.add_argument("--on-disk", action="store_true",
                   help="IVF factories only: train once, add shard by shard and merge the inverted lists into "
                        "index.ivfdata on disk (memory-mapped when searched), for indexes larger than RAM")
    p.add_argument("--multiscale", action="store_true",
                   help="embed each image at scales 1, 1/sqrt(2), 1/2 of the teacher's size, average and "
                        "re-normalise; recorded in the manifest, and `index add` follows it")
    p.add_argument("--flip", action="store_true",
                   help="also embed each image mirrored left-right and average (twice the teacher's work, offline; "
                        "recorded in the manifest, and `index add` follows it)")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted build of --out from the embedding shards it left (without it, "
                        "they are discarded, with a message)")
    p.add_argument("--versioned", action="store_true",
                   help="write a versioned root (CURRENT + versions/) that `index add` / `remove` update")
    p.add_argument("--keep", type=int, default=None, help="versioned: keep this many versions (default: all)")
    p.add_argument("--engine", choices=("local", "ray"), default="local",
                   help="embed here, or on a Ray cluster (needs the `distributed` extra) (default: %(default)s)")
    p.add_argument("--address", default=None, help="with --engine ray: the cluster address (default: a local Ray)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing index folder, in one atomic swap (a versioned root gets a new version "
                        "instead)")
    p.set_defaults(func=run_build)
    bind_config(p, IndexBuildConfig, keys={"search_param": "search_params"}, converters={"search_param": dict})

    p = commands.add("add", group="index", help="embed more images with the teacher and publish a new index version")
    p.add_argument("--index", required=True, type=index_location("index"),
                   help="index root or plain index folder, or a Milvus location (milvus://..., milvus-lite://...)")
    p.add_argument("--teacher", required=True, type=existing_path("teacher ONNX model"),
                   help="the teacher that embedded the index (its teacher id must match)")
    p.add_argument("--images", required=True, type=existing_path("image folder"),
                   help="folder of new images (searched recursively; label = parent folder's name)")
    p.add_argument("--metadata", type=existing_path("metadata CSV"),
                   help="CSV with a 'path' column (relative to --images or absolute) and any columns to store")
    p.add_argument("--keep", type=int, default=None, help="keep this many versions (default: all)")
    p.add_argument("--batch-size", type=int, default=64, help="images per inference batch (default: %(default)s)")
    p.add_argument("--workers", type=int, default=None, help="image decoding threads (default: CPU count, max 8)")
    p.set_defaults(func=run_add)
    bind_config(p, IndexAddConfig)

    p = commands.add("remove", group="index", help="remove images by id and publish a new index version")
    p.add_argument("--index", required=True, type=index_location("index"),
                   help="index root or plain index folder, or a Milvus location (milvus://..., milvus-lite://...)")
    p.add_argument("--ids", required=True, nargs="+", type=id_list, help="ids to remove (space or comma separated)")
    p.add_argument("--keep", type=int, default=None, help="keep this many versions (default: all)")
    p.set_defaults(func=run_remove)

    p = commands.add("rollback", group="index",
                     help="make an existing version of a versioned root the live one (an atomic switch of CURRENT)")
    p.add_argument("root", type=index_location("index root"),
                   help="versioned index root (with CURRENT), or a Milvus location (its alias is switched)")
    p.add_argument("version", help="version to serve, e.g. v000002 (or 2); `index info` lists them")
    p.set_defaults(func=run_rollback)

    p = commands.add("info", group="index", help="describe an index: live version, size, factory, versions")
    p.add_argument("--index", required=True, type=index_location("index"),
                   help="index root or plain index folder, or a Milvus location (milvus://..., milvus-lite://...)")
    p.set_defaults(func=run_info)


def index_location(kind: str | None):
    """An argparse type: a Milvus location (milvus://..., milvus-lite://...) kept as text and checked for its form;
    anything else a path, which must exist when `kind` names what it is."""
    def check(value: str):
        if value.startswith(("milvus://", "milvus-lite://")):
            from asymsearch.core.errors import UserError
            from asymsearch.index.milvus import parse_location
            try:
                parse_location(value)
            except UserError as e:
                raise argparse.ArgumentTypeError(str(e)) from None
            return value
        return existing_path(kind)(value) if kind else Path(value)
    return check


def search_param(text: str) -> tuple[str, float]:
    name, sep, value = text.partition("=")
    try:
        if not sep or not name:
            raise ValueError
        number = float(value)
        return name.strip(), int(number) if number.is_integer() else number
    except ValueError:
        raise argparse.ArgumentTypeError(f"search parameter must read NAME=NUMBER, e.g. nprobe=16, not {text!r}")


def id_list(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"ids must be integers, not {text!r}")


def scales_note(scales, flip: bool = False) -> str:
    """', multi-scale (1, 0.707, 0.5)' for a multi-scale index, ', flip-averaged' with flip, '' for neither."""
    note = f", multi-scale ({', '.join(f'{s:.3g}' for s in scales)})" if list(scales) != [1.0] else ""
    return note + (", flip-averaged" if flip else "")


def run_build(args: argparse.Namespace) -> int:
    from asymsearch.index.build import build_index
    m = build_index(args.config_object)  # IndexBuildConfig: defaults < --config < KEY=VALUE < flags
    params = "".join(f" {k}={v}" for k, v in m.search_params.items())
    print(f"index {args.out}: {m.count} images, {m.factory}{params}, dim {m.dim}, teacher id {m.teacher_id}"
          f"{scales_note(m.build['scales'], m.build.get('flip', False))}")
    if "auto" in m.build:
        a = m.build["auto"]
        student = a.get("recall@10_student_queries")
        print(f"auto: recall@10 {student if student is not None else a['recall@10']} on "
              f"{'student queries' if student is not None else 'database vectors'} vs exact search "
              f"(database vectors: {a.get('recall@10_database_queries', a['recall@10'])}), {a['ms_per_query']} "
              f"ms/query with {a.get('search_threads', '?')} faiss thread(s), targets "
              f"{'met' if a['targets_met'] else 'NOT met'}")
        if a.get("warning"):
            print(f"warning: {a['warning']}", file=sys.stderr)
    if m.build["skipped"]:
        print(f"{len(m.build['skipped'])} unreadable files skipped; see skipped.tsv in the index folder")
    return 0


def run_add(args: argparse.Namespace) -> int:
    from asymsearch.index.update import add_images
    result = add_images(args.index, args.teacher, args.images, metadata=args.metadata, keep=args.keep,
                        batch_size=args.batch_size, workers=args.workers)
    m, version = result
    if not result.changed:
        print(f"index {args.index}: nothing to add, {args.images} is already published in {version}; "
              f"{m.count} in all")
        return 0
    change = m.build["history"][-1]
    print(f"index {args.index}: version {version}, added {change['count']} images "
          f"(ids {change['first_id']}..{change['first_id'] + change['count'] - 1}), {m.count} in all"
          f"{scales_note(change['scales'], change.get('flip', False))}")
    if change["skipped"]:
        print(f"{len(change['skipped'])} unreadable files skipped; see skipped.tsv in {version}")
    return 0


def run_remove(args: argparse.Namespace) -> int:
    from asymsearch.index.update import remove_ids
    ids = [i for group in args.ids for i in group]
    result = remove_ids(args.index, ids, keep=args.keep)
    m, version = result
    if not result.changed:
        print(f"index {args.index}: nothing to remove, already removed in {version}; {m.count} left")
        return 0
    print(f"index {args.index}: version {version}, removed {len(set(ids))} images, {m.count} left")
    return 0


def run_rollback(args: argparse.Namespace) -> int:
    from asymsearch.index.update import rollback
    if isinstance(args.root, str):  # a Milvus location: the alias is switched
        result, before = rollback(args.root, args.version)
        print(f"index {args.root}: alias now names {result.version} (was {before}), {result.manifest.count} images")
        return 0
    from asymsearch.index.versions import list_versions, version_number
    result, before = rollback(args.root, args.version)
    m, version = result
    newer = [n for n in list_versions(args.root) if version_number(n) > version_number(version)]
    kept = f"; kept newer: {', '.join(newer)}" if newer else ""
    if not result.changed:
        print(f"index {args.root}: CURRENT already names {version} ({m.count} images){kept}")
        return 0
    print(f"index {args.root}: CURRENT now names {version} (was {before}), {m.count} images{kept}")
    return 0


def run_info(args: argparse.Namespace) -> int:
    if isinstance(args.index, str):  # a Milvus location
        from asymsearch.index.milvus import describe
        print(json.dumps(describe(args.index), indent=2))
        return 0
    from asymsearch.core.manifest import IndexManifest
    from asymsearch.index.versions import list_versions, resolve_index_folder
    folder, version = resolve_index_folder(args.index)
    m = IndexManifest.load(folder / "manifest.json")
    info = {"folder": str(folder), "version": version, "versions": list_versions(args.index) if version else [],
            "count": m.count, "dim": m.dim, "factory": m.factory, "search_params": m.search_params,
            "teacher_id": m.teacher_id, "scales": m.build.get("scales", [1.0]), "flip": m.build.get("flip", False),
            "next_id": m.build.get("next_id"),
            "auto": m.build.get("auto"),
            "history": m.build.get("history", [])[-5:]}
    print(json.dumps(info, indent=2))
    return 0
