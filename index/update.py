"""Changes to an existing index: add images, remove ids. Each change publishes a new version.

Both run under the root's writer lock, check everything before changing anything (a duplicate path, an unknown id,
a model of another teacher: a clear `UserError`, no change made), write the new version in a staging folder and
publish it with an atomic switch of CURRENT (`asymsearch.index.versions`). Killed at any instant, the previous
version stays live and intact. New images get ids from the manifest's `build.next_id`, which only grows, so an id
is never reused. `add` commits its embeddings in shards under `.<root>.work/add`; running the same add again after
an interruption embeds only what is missing. `add` embeds at the scales the index records (`build["scales"]`,
`asymsearch.core.multiscale`), so an index built with `--multiscale` stays multi-scale as it grows.

A plain index folder given to `add` or `remove` is first turned into a versioned root in place: its files become
version v000001 (hard links, no copy), CURRENT names it, then the plain files are removed.
"""
from __future__ import annotations

import json
import os
import shutil
import sqlite3
import time
from pathlib import Path
from typing import Sequence

import faiss
import numpy as np

from asymsearch.core.config import CONFIG_FILE
from asymsearch.core.data import list_images_flat
from asymsearch.core.errors import UserError
from asymsearch.core.manifest import IndexManifest, check_pairing, require_teacher
from asymsearch.core.multiscale import index_flip, index_scales, with_scales
from asymsearch.core.ort import OnnxEmbedder
from asymsearch.index import versions
from asymsearch.index.build import report_skipped, write_skipped
from asymsearch.index.faiss_index import add_blocks, apply_search_params, remove_ids as faiss_remove_ids
from asymsearch.index.metadata import existing_ids, existing_paths, insert_rows, match_metadata, read_metadata_csv
from asymsearch.index.pipeline import embed_into_shards
from asymsearch.index.shards import ShardStore, listing_digest
from asymsearch.index.store import INDEX_FILE, MANIFEST_FILE, META_FILE, SKIPPED_FILE

HISTORY_LIMIT = 100  # changes remembered in manifest.build["history"]


def add_images(root: str | os.PathLike, teacher: str | os.PathLike, images: str | os.PathLike, *,
               metadata: str | os.PathLike | None = None, keep: int | None = None, batch_size: int = 64,
               shard_size: int = 4096, workers: int | None = None, progress: bool = True) -> tuple[IndexManifest, str]:
    """Embed the images below `images` (label: the parent folder's name) with `teacher`, at the scales (and flip)
    the index was embedded at, and publish a version of `root` that also holds them. Returns the new manifest and
    version name."""
    root, images = Path(root).resolve(), Path(images).resolve()
    teacher_model = OnnxEmbedder(teacher)
    with versions.writer_lock(_existing_index(root)):
        versions.clean_stale(root)
        _refuse_on_disk(root)
        current = _current_folder(root)
        manifest = IndexManifest.load(current / MANIFEST_FILE)
        embedder = teacher_model
        require_teacher(embedder, str(teacher))
        check_pairing(embedder, manifest, query_name=str(teacher), database_name=f"the index {root}")
        scales, flip = index_scales(manifest), index_flip(manifest)
        embedder = with_scales(teacher_model, scales, flip)
        items = list_images_flat(images)
        dupes = existing_paths(current / META_FILE, [item.path for item in items])
        if dupes:
            raise UserError(f"{len(dupes)} of the images are already in the index {root}, e.g. {dupes[0]}; "
                            f"remove them first or leave them out")
        columns = read_metadata_csv(metadata, images) if metadata else {}
        match_metadata(columns, [item.path for item in items], str(metadata))

        plan = {"teacher_sha256": embedder.manifest.sha256, "dim": embedder.dim, "count": len(items),
                "listing_sha256": listing_digest(items), "shard_size": shard_size, "batch_size": batch_size,
                "base_version": current.name, **({"scales": list(scales)} if embedder is not teacher_model else {}),
                **({"flip": True} if flip else {})}
        store = ShardStore.open(_work(root), plan, resume=True)  # the same add again continues where it stopped
        embed_into_shards(items, embedder, store, batch_size=batch_size, workers=workers, progress=progress,
                          desc="embedding new images")
        rows, skipped = store.kept_rows()
        report_skipped(skipped)
        if len(rows) == 0:
            store.remove()
            raise UserError(f"none of the {len(items)} image files in {images} could be read; nothing added")

        next_id = int(manifest.build.get("next_id", manifest.count))
        new_ids = np.arange(next_id, next_id + len(rows), dtype=np.int64)
        index = faiss.read_index(str(current / INDEX_FILE))
        blocks, offset = [], 0
        for shard_rows, vectors, _ in store.iter_shards():
            blocks.append((new_ids[offset:offset + len(shard_rows)], vectors))
            offset += len(shard_rows)
        add_blocks(index, blocks, manifest.factory)
        change = {"op": "add", "images": str(images), "count": int(len(rows)), "first_id": next_id,
                  "scales": list(scales), **({"flip": True} if flip else {}), "skipped": [p for p, _ in skipped]}
        kept = [items[r] for r in rows]
        meta_rows = [(int(i), item.path, item.label, columns.get(item.path)) for i, item in zip(new_ids, kept)]
        name = _publish_change(root, current, index, manifest, change, next_id + len(rows), keep,
                               lambda con: insert_rows(con, meta_rows), skipped)
        store.remove()
        try:
            store.folder.parent.rmdir()
        except OSError:
            pass
        return IndexManifest.load(root / versions.VERSIONS_DIR / name / MANIFEST_FILE), name


def remove_ids(root: str | os.PathLike, ids: Sequence[int], *, keep: int | None = None) -> tuple[IndexManifest, str]:
    """Publish a version of `root` without `ids`. Every id must be in the index, else nothing changes."""
    root = Path(root).resolve()
    wanted = sorted({int(i) for i in ids})
    if not wanted:
        raise UserError("no ids given to remove")
    with versions.writer_lock(_existing_index(root)):
        versions.clean_stale(root)
        _refuse_on_disk(root)
        current = _current_folder(root)
        manifest = IndexManifest.load(current / MANIFEST_FILE)
        unknown = sorted(set(wanted) - existing_ids(current / META_FILE, wanted))
        if unknown:
            raise UserError(f"{len(unknown)} id(s) are not in the index {root}: "
                            f"{', '.join(map(str, unknown[:10]))}{' ...' if len(unknown) > 10 else ''}; nothing removed")
        if len(wanted) == manifest.count:
            raise UserError(f"removing all {manifest.count} images would leave the index empty; build a new one")
        index = faiss.read_index(str(current / INDEX_FILE))
        index = faiss_remove_ids(index, np.asarray(wanted, np.int64), manifest.factory)
        apply_search_params(index, manifest.search_params)
        change = {"op": "remove", "count": len(wanted), "ids": wanted[:1000]}

        def delete(con: sqlite3.Connection) -> None:
            con.execute("DELETE FROM items WHERE id IN (SELECT value FROM json_each(?))",
                        (json.dumps(wanted),))

        next_id = int(manifest.build.get("next_id", manifest.count))
        name = _publish_change(root, current, index, manifest, change, next_id, keep, delete, [])
        return IndexManifest.load(root / versions.VERSIONS_DIR / name / MANIFEST_FILE), name


def _publish_change(root: Path, current: Path, index: faiss.Index, manifest: IndexManifest, change: dict,
                    next_id: int, keep: int | None, edit_metadata, skipped) -> str:
    staged = versions.staging_dir(root)
    try:
        faiss.write_index(index, str(staged / INDEX_FILE))
        shutil.copyfile(current / META_FILE, staged / META_FILE)
        if (current / CONFIG_FILE).is_file():  # the config of the build this version descends from
            shutil.copyfile(current / CONFIG_FILE, staged / CONFIG_FILE)
        con = sqlite3.connect(staged / META_FILE)
        try:
            with con:
                edit_metadata(con)
            rows = con.execute("SELECT COUNT(*) FROM items").fetchone()[0]
        finally:
            con.close()
        if rows != index.ntotal:
            raise UserError(f"internal error: the new version would hold {index.ntotal} vectors but {rows} "
                            f"metadata rows; nothing published")
        write_skipped(staged / SKIPPED_FILE, skipped)
        history = list(manifest.build.get("history", []))[-(HISTORY_LIMIT - 1):]
        change.update(base_version=current.name, time=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        build = {**manifest.build, "next_id": int(next_id), "history": history + [change]}
        new = IndexManifest(**{**manifest.to_dict(), "count": int(index.ntotal), "build": build})
        new.save(staged / MANIFEST_FILE)
        versions.crash_point(f"{change['op']}:before-publish")
        return versions.publish(root, staged, keep=keep)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise


def _refuse_on_disk(root: Path) -> None:
    manifest = IndexManifest.load(versions.resolve_index_folder(root)[0] / MANIFEST_FILE)
    if manifest.build.get("on_disk"):
        raise UserError(f"{root} is an on-disk IVF index (built with --on-disk); `index add` / `index remove` do not "
                        f"change those yet: rebuild it with `index build --on-disk`")


def _existing_index(root: Path) -> Path:
    if not root.is_dir():
        raise UserError(f"index folder not found: {root}")
    if not versions.is_versioned_root(root) and not (root / MANIFEST_FILE).is_file():
        raise UserError(f"{root} is not an index (no {versions.CURRENT_FILE} and no {MANIFEST_FILE})")
    return root


def _current_folder(root: Path) -> Path:
    """The live version folder of `root`, turning a plain index folder into a versioned root first."""
    if not versions.is_versioned_root(root):
        ensure_versioned(root)
    return versions.resolve_index_folder(root)[0]


def ensure_versioned(root: Path) -> str:
    """Turn the plain index folder `root` into a versioned root whose first version holds its files. Safe to kill:
    until CURRENT exists the plain files are the index; after, the version is, and the plain files are leftovers."""
    staged = versions.staging_dir(root)
    for f in (INDEX_FILE, META_FILE, MANIFEST_FILE, SKIPPED_FILE, CONFIG_FILE):
        if (root / f).is_file():
            try:
                os.link(root / f, staged / f)
            except OSError:
                shutil.copy2(root / f, staged / f)
    name = versions.publish(root, staged)
    for f in (MANIFEST_FILE, INDEX_FILE, META_FILE, SKIPPED_FILE, CONFIG_FILE):
        (root / f).unlink(missing_ok=True)
    return name


def _work(root: Path) -> Path:
    return root.parent / f".{root.name}.work" / "add"
