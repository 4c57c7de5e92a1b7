"""`asymsearch index transform`: move an index into a new teacher's space without reading its images
(`asymsearch.index.transform`; Ramanujan et al. 2022, FCT)."""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from asymsearch.cli.options import CONFIG_HELP, Commands, existing_path


def register(commands: Commands) -> None:
    p = commands.add("transform", group="index",
                     help="map every stored vector into a new teacher's space with a map learned on (old, new) "
                          "pairs of sample images; a new version, no database image read",
                     description="Learn a map from the old teacher's vectors to the new teacher's on a sample of "
                                 "labelled images (--sample, e.g. the training half; never the database), or take "
                                 "one learned before (--map), and apply it to every vector the index stores. A "
                                 "versioned root gets a new version (CURRENT switches to it); a plain folder needs "
                                 "--out. The new manifest names the new teacher and records provenance "
                                 "'transformed', the map and the version it came from.")
    p.add_argument("--from", dest="source", required=True, type=existing_path("index"),
                   help="the index to transform (versioned root or plain folder)")
    p.add_argument("--to", dest="teacher", required=True, type=existing_path("new teacher ONNX model"),
                   help="the new teacher .onnx (with its .json)")
    p.add_argument("--sample", type=existing_path("sample image folder"),
                   help="labelled images (one folder per class) to learn the map from, embedded by both teachers")
    p.add_argument("--sample-classes", default="all", help=CONFIG_HELP["classes"] + " (default: %(default)s)")
    p.add_argument("--max-sample", type=int, default=0,
                   help="use at most this many sample images, every k-th (default: all)")
    p.add_argument("--old-teacher", type=existing_path("old teacher ONNX model"),
                   help="the teacher that embedded the index (default: the file its manifest names, sha256 checked)")
    p.add_argument("--map", dest="map_file", type=existing_path("vector map"),
                   help="a map learned before (the transform.npz of an earlier transform) instead of --sample")
    p.add_argument("--kind", choices=("linear", "mlp"), default="linear",
                   help="the map: ridge regression, or that plus a one-hidden-layer residual MLP "
                        "(default: %(default)s)")
    p.add_argument("--ridge", type=float, default=1e-2, help="ridge penalty of the linear part (default: %(default)s)")
    p.add_argument("--hidden", type=int, default=1024, help="mlp: hidden units (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=100, help="mlp: passes over the pairs (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="mlp: initialisation and order (default: %(default)s)")
    p.add_argument("--out", type=Path, default=None,
                   help="write a new plain index folder here (default for a versioned root: a new version of it)")
    p.add_argument("--keep", type=int, default=None, help="versioned: keep this many versions (default: all)")
    p.add_argument("--engine", choices=("local", "ray"), default="local",
                   help="apply the map in this process, or block by block on a Ray cluster with Ray Data "
                        "(default: %(default)s)")
    p.add_argument("--address", default=None, help="with --engine ray: the cluster address (default: a local Ray)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run_transform)


def run_transform(args: argparse.Namespace) -> int:
    from asymsearch.core.errors import UserError
    from asymsearch.index.transform import VectorMap, check_transform, fit_map, transform_index, transform_summary
    if (args.sample is None) == (args.map_file is None):
        raise UserError("give either --sample (images to learn the map from) or --map (a map learned before)")
    check_transform(args.source, args.teacher, args.out)  # refused here, before any image of the sample is read
    if args.engine == "ray":
        from asymsearch.index import ray_engine
        if ray_engine.ray is None:
            raise UserError("--engine ray needs Ray Data: pip install 'ray[data]' (the `distributed` extra)")
    elif args.address:
        raise UserError("--address is for --engine ray")
    fit_seconds = 0.0
    if args.map_file is not None:
        vector_map = VectorMap.load(args.map_file)
    else:
        vector_map, fit_seconds = _learn(args, fit_map)
    manifest, where = transform_index(args.source, args.teacher, vector_map, out=args.out, keep=args.keep,
                                     engine=args.engine, address=args.address)
    summary = {**transform_summary(manifest, where), "fit_seconds": round(fit_seconds, 3),
               "mean_cosine_on_pairs": vector_map.fit.get("mean_cosine_on_pairs")}
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"index {where}: {manifest.count} vectors moved from teacher {summary['from_teacher']} to "
              f"{manifest.teacher_id} by a {summary['map']} map in {summary['seconds']} s (map learned in "
              f"{summary['fit_seconds']} s); no database image read")
    return 0


def _learn(args: argparse.Namespace, fit_map):
    """(the map learned on --sample, seconds spent embedding the pairs and fitting)."""
    from asymsearch.core.data import list_image_folder, select_classes
    from asymsearch.core.errors import UserError
    from asymsearch.core.manifest import IndexManifest, sha256_file
    from asymsearch.index.transform import pairs_from_images
    from asymsearch.index.versions import resolve_index_folder

    start = time.perf_counter()
    old = IndexManifest.load(resolve_index_folder(args.source)[0] / "manifest.json")
    old_teacher = args.old_teacher
    if old_teacher is None:
        old_teacher = Path(old.teacher_model.get("path") or "")
        if not old_teacher.is_file():
            raise UserError(f"the index was embedded by teacher {old.teacher_id}, whose ONNX file {old_teacher} is "
                            f"not there; give it with --old-teacher")
        if old.teacher_model.get("sha256") and sha256_file(old_teacher) != old.teacher_model["sha256"]:
            raise UserError(f"{old_teacher} changed since it embedded the index (sha256); give the teacher that "
                            f"embedded it with --old-teacher")
    if args.max_sample < 0:
        raise UserError(f"--max-sample must be >= 0 (0: all), not {args.max_sample}")
    items = list_image_folder(args.sample, select_classes(args.sample, args.sample_classes))
    if args.max_sample and len(items) > args.max_sample:
        step = len(items) / args.max_sample
        items = [items[int(i * step)] for i in range(args.max_sample)]
    old_v, new_v, info = pairs_from_images(items, old_teacher, args.teacher)
    if info["old_teacher_id"] != old.teacher_id:
        raise UserError(f"{old_teacher} is teacher {info['old_teacher_id']}, but the index was embedded by teacher "
                        f"{old.teacher_id}")
    vector_map = fit_map(old_v, new_v, args.kind, ridge=args.ridge, hidden=args.hidden, epochs=args.epochs,
                         seed=args.seed, fit_info={**info, "sample": str(Path(args.sample).resolve()),
                                                   "sample_classes": args.sample_classes})
    return vector_map, time.perf_counter() - start
