"""`asymsearch info ARTIFACT`: what an artifact is, its ids, and the config that made it.

A checkpoint (`NAME.pt`), an ONNX model (`NAME.onnx`, or its manifest `NAME.json`) or an index (a folder, or a
versioned root: its live version). The config is the one saved beside the artifact (`asymsearch.core.config`);
a checkpoint also carries its own inside.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from asymsearch.cli.options import Commands


def register(commands: Commands) -> None:
    p = commands.add("info", help="print an artifact's ids and the config that made it (checkpoint, ONNX, index)",
                     description="Describe a checkpoint (.pt), an ONNX model (.onnx or its .json manifest) or an "
                                 "index (folder or versioned root): its kind, its ids (model id, teacher id, index "
                                 "manifest id, ...) and the merged config saved beside it when it was made.")
    p.add_argument("artifact", type=Path, help="checkpoint, ONNX model / manifest, index folder or root")
    p.add_argument("--json", action="store_true", help="print exactly one JSON object")
    p.set_defaults(func=run)


def describe(path: Path) -> dict:
    """kind, ids and config of the artifact at `path` (`UserError` when it is none of the known kinds)."""
    from asymsearch.core.errors import UserError

    if not path.exists():
        raise UserError(f"artifact not found: {path}")
    if path.is_dir():
        return _index(path)
    if path.suffix in (".onnx", ".ort") or path.suffix == ".json":
        return _model(path)
    if path.suffix in (".pt", ".pth"):
        return _checkpoint(path)
    raise UserError(f"{path} is not a checkpoint (.pt), an ONNX model (.onnx / .json) or an index folder")


def _saved_config(path: Path):
    from asymsearch.core.config import config_path_for, load_config_file, to_plain
    file = config_path_for(path)
    if not file.is_file():
        return None, None
    return str(file), to_plain(load_config_file(file))


def _index(path: Path) -> dict:
    from asymsearch.core.errors import UserError
    from asymsearch.core.manifest import IndexManifest
    from asymsearch.index.store import manifest_id
    from asymsearch.index.versions import resolve_index_folder

    folder, version = resolve_index_folder(path)
    manifest_file = folder / "manifest.json"
    if not manifest_file.is_file():
        raise UserError(f"{path} is not an index folder (no manifest.json) nor a versioned index root")
    m = IndexManifest.load(manifest_file)
    config_file, config = _saved_config(folder)
    return {"kind": "index", "path": str(path), "folder": str(folder), "version": version,
            "ids": {"index_manifest_id": manifest_id(manifest_file.parent),
                    "teacher_id": m.teacher_id, "teacher_model_id": m.teacher_model.get("model_id"),
                    "teacher_sha256": m.teacher_model.get("sha256")},
            "count": m.count, "dim": m.dim, "factory": m.factory, "config_file": config_file, "config": config}


def _model(path: Path) -> dict:
    from asymsearch.core.manifest import ModelManifest, manifest_path_for

    mpath = path if path.suffix == ".json" else manifest_path_for(path)
    m = ModelManifest.load(mpath)
    onnx_path = mpath.with_suffix(".onnx")
    config_file, config = _saved_config(onnx_path)
    if config is None and m.parent_sha256:  # a variant: the config of the fp32 export it was made from
        for other in sorted(mpath.parent.glob("*.json")):
            try:
                parent = ModelManifest.load(other)
            except Exception:  # not a model manifest (a report, a config): not the parent
                continue
            if parent.sha256 == m.parent_sha256:
                config_file, config = _saved_config(other.with_suffix(".onnx"))
                break
    return {"kind": "model", "path": str(path), "manifest": str(mpath), "role": m.role, "variant": m.variant,
            "ids": {"model_id": m.model_id, "teacher_id": m.teacher_id, "sha256": m.sha256,
                    **({"parent_sha256": m.parent_sha256} if m.parent_sha256 else {})},
            "dim": m.dim, "input_size": m.input_size, "config_file": config_file, "config": config}


def _checkpoint(path: Path) -> dict:
    from asymsearch.training.checkpoint import load_checkpoint

    ckpt = load_checkpoint(path)
    config_file, config = _saved_config(path)
    return {"kind": "checkpoint", "path": str(path), "role": ckpt["role"],
            "ids": {"model_id": ckpt["model_id"], "teacher_id": ckpt["teacher_id"]},
            "arch": ckpt["arch"], "epochs_trained": len(ckpt.get("history", [])),
            "config_file": config_file, "config": config if config is not None else ckpt.get("config")}


def run(args: argparse.Namespace) -> int:
    from asymsearch.core.config import config_yaml

    info = describe(args.artifact)
    if args.json:
        print(json.dumps(info, default=str))
        return 0
    print(f"{info['kind']}: {info['path']}" + (f" ({info['role']}" + (f", {info['variant']}" if info.get(
        "variant") not in (None, "fp32") else "") + ")" if "role" in info else ""))
    if info.get("version"):
        print(f"version: {info['version']} ({info['folder']})")
    for key, value in info["ids"].items():
        if value is not None:
            print(f"{key}: {value}")
    if info["config"] is None:
        print("config: none saved (made before configs were saved beside artifacts)")
    else:
        print(f"config ({info['config_file'] or 'inside the checkpoint'}):")
        print("  " + config_yaml(info["config"]).rstrip().replace("\n", "\n  "))
    return 0
