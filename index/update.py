"""Changes to an existing index: add images, remove ids, roll back. Each change publishes a new version.

All of them hold the writer lock of the root (`versions.writer_lock`, `.<root>.work/lock`) from their first step,
clean what a killed writer left (`versions.clean_stale`, which names what it removed), check everything before
changing anything (a duplicate path, an unknown id, a model of another teacher: a clear `UserError`, no change
made), write the new version in a staging folder and publish it with an atomic switch of CURRENT
(`asymsearch.index.versions`). Killed at any instant, the previous version stays live and intact, or the new one
is live and complete. New images get ids from the manifest's `build.next_id`, which only grows, so an id is never
reused. `add` embeds at the scales the index records (`build["scales"]`, `asymsearch.core.multiscale`), so an
index built with `--multiscale` stays multi-scale as it grows.

Running the same command again after a kill finishes the job, whatever the instant: `add` commits its embeddings
in shards under `.<root>.work/add` and the same add resumes from them (the work of a different add, or of an add
whose base version is no longer live, is discarded, saying so); an add whose images are all in the live version
because the killed run had published them reports "nothing to add" (`UpdateResult.changed` False), as does a
remove of ids that the live version's own change removed.

A plain index folder given to `add` or `remove` is first turned into a versioned root in place: its files become
version v000001 (hard links, no copy), CURRENT names it, then the plain files are removed.
"""
from __future__ import annotations

import json
import logging
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
log = logging.getLogger("asymsearch.index")


class UpdateResult(tuple):
    """`(manifest, version)` of the live version after a change, as a 2-tuple, with `changed`: False when there
    was nothing to do (the change was already published, e.g. by a run killed after its publish)."""

    def __new__(cls, manifest: IndexManifest, version: str, changed: bool = True) -> "UpdateResult":
        self = super().__new__(cls, (manifest, version))
        self.changed = changed
        return self

    @property
    def manifest(self) -> IndexManifest:
        return self[0]

    @property
    def version(self) -> str:
        return self[1]


def add_images(root: str | os.PathLike, teacher: str | os.PathLike, images: str | os.PathLike, *,
               metadata: str | os.PathLike | None = None, keep: int | None = None, batch_size: int = 64,
               shard_size: int = 4096, workers: int | None = None, progress: bool = True) -> UpdateResult:
    """Embed the images below `images` (label: the parent folder's name) with `teacher`, at the scales (and flip)
    the index was embedded at, and publish a version of `root` that also holds them. Returns the new manifest and
    version name (`UpdateResult`; `changed` is False when the live version already holds exactly this add).
    A Milvus location (`milvus://...`, `milvus-lite://...`) gets the rows inserted into its live collection."""
    if str(root).startswith(("milvus://", "milvus-lite://")):
        from asymsearch.index import milvus
        manifest, collection, changed = milvus.add_images(str(root), teacher, images, metadata=metadata,
                                                          batch_size=batch_size, shard_size=shard_size,
                                                          workers=workers, progress=progress)
        return UpdateResult(manifest, collection, changed)
    root, images = Path(root).resolve(), Path(images).resolve()
    teacher_model = OnnxEmbedder(teacher)
    with versions.writer_lock(_existing_index(root)) as lock:
        versions.crash_point("add:locked")
        versions.clean_stale(root, lock)
        _refuse_on_disk(root)
        current = _current_folder(root)
        manifest = IndexManifest.load(current / MANIFEST_FILE)
        embedder = teacher_model
        require_teacher(embedder, str(teacher))
        check_pairing(embedder, manifest, query_name=str(teacher), database_name=f"the index {root}")
        scales, flip = index_scales(manifest), index_flip(manifest)
        embedder = with_scales(teacher_model, scales, flip)
        items = list_images_flat(images)
        plan = {"images": str(images), "teacher_sha256": embedder.manifest.sha256, "dim": embedder.dim,
                "count": len(items), "listing_sha256": listing_digest(items), "shard_size": shard_size,
                "batch_size": batch_size, "base_version": current.name,
                **({"scales": list(scales)} if embedder is not teacher_model else {}),
                **({"flip": True} if flip else {})}
        work = _work(root)
        resumable = _check_add_work(root, work, plan, lock)
        dupes = existing_paths(current / META_FILE, [item.path for item in items])
        if dupes:
            change = _published_add(manifest, images, items, dupes)
            if change is not None:
                shutil.rmtree(work, ignore_errors=True)
                log.warning("index %s: nothing to add: the %d images of %s are already published in %s (CURRENT)",
                            root, change["count"], images, current.name)
                return UpdateResult(manifest, current.name, changed=False)
            raise UserError(f"{len(dupes)} of the images are already in the index {root}, e.g. {dupes[0]}; "
                            f"remove them first or leave them out")
        columns = read_metadata_csv(metadata, images) if metadata else {}
        match_metadata(columns, [item.path for item in items], str(metadata))

        store = ShardStore.open(work, plan, resume=True)  # the same add again continues where it stopped
        if resumable:
            log.warning("index %s: resuming the add of %s that %s left: %d of %d embedding shards already done",
                        root, images, lock.left_by(), resumable, store.num_shards)
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
        versions.crash_point("add:after-publish")
        store.remove()
        return UpdateResult(IndexManifest.load(root / versions.VERSIONS_DIR / name / MANIFEST_FILE), name)


def _check_add_work(root: Path, work: Path, plan: dict, lock: versions.WriterLock) -> int:
    """The shards an interrupted add left in `work`: kept when they are this add's (same images, teacher, sizes
    and base version; returns how many), else discarded with a line naming whose and which they were."""
    if not work.exists():
        return 0
    try:
        old = json.loads((work / "plan.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        old = None
    done = len(list(work.glob("shard-*.json")))
    if isinstance(old, dict) and {k: v for k, v in old.items() if k != "format"} == plan:
        return done
    if not isinstance(old, dict):
        why = "it had not started embedding"
    elif old.get("base_version") != plan["base_version"]:
        why = (f"it was adding to {old.get('base_version')}, and {plan['base_version']} is live now (the killed "
               f"run may have published it)")
    else:
        why = f"it was adding other images ({old.get('images', 'unknown folder')}) or with other settings"
    shutil.rmtree(work, ignore_errors=True)
    log.warning("index %s: discarded the unfinished add that %s left (%d embedding shard(s)): %s", root,
                lock.left_by(), done, why)
    return 0


def _published_add(manifest: IndexManifest, images: Path, items, present: list[str]) -> dict | None:
    """The change of the live version's history that added exactly these images (all of them there, or skipped
    by it as unreadable), or None."""
    adds = [c for c in manifest.build.get("history", []) if c.get("op") == "add" and c.get("images") == str(images)]
    if not adds:
        return None
    held = set(present) | set(adds[-1].get("skipped", []))
    return adds[-1] if all(item.path in held for item in items) else None


def remove_ids(root: str | os.PathLike, ids: Sequence[int], *, keep: int | None = None) -> UpdateResult:
    """Publish a version of `root` without `ids`. Every id must be in the index, else nothing changes (unless the
    live version is the one that removed exactly these ids: then nothing to do, `changed` False). A Milvus
    location has them deleted from its live collection."""
    if str(root).startswith(("milvus://", "milvus-lite://")):
        from asymsearch.index import milvus
        manifest, collection, changed = milvus.remove_rows(str(root), ids)
        return UpdateResult(manifest, collection, changed)
    root = Path(root).resolve()
    wanted = sorted({int(i) for i in ids})
    if not wanted:
        raise UserError("no ids given to remove")
    with versions.writer_lock(_existing_index(root)) as lock:
        versions.crash_point("remove:locked")
        versions.clean_stale(root, lock)
        _refuse_on_disk(root)
        current = _current_folder(root)
        manifest = IndexManifest.load(current / MANIFEST_FILE)
        unknown = sorted(set(wanted) - existing_ids(current / META_FILE, wanted))
        last = (manifest.build.get("history") or [{}])[-1]
        if (len(unknown) == len(wanted) and last.get("op") == "remove" and last.get("count") == len(wanted)
                and last.get("ids") == wanted[:1000]):
            log.warning("index %s: nothing to remove: id(s) %s were already removed in %s (CURRENT)", root,
                        ", ".join(map(str, wanted[:10])) + (" ..." if len(wanted) > 10 else ""), current.name)
            return UpdateResult(manifest, current.name, changed=False)
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
        return UpdateResult(IndexManifest.load(root / versions.VERSIONS_DIR / name / MANIFEST_FILE), name)


def rollback(root: str | os.PathLike, version: str) -> tuple[UpdateResult, str]:
    """Point CURRENT of `root` at the existing version `version` ("v000002" or "2") in one atomic switch, after
    checking that its folder is a complete, consistent index. Versions newer than it stay (clean_stale and prune
    never delete them), and a later change still gets a name never used before. Returns the result and the name
    CURRENT held before. A Milvus location gets its alias pointed at that version's collection."""
    if str(root).startswith(("milvus://", "milvus-lite://")):
        from asymsearch.index import milvus
        manifest, collection, before = milvus.rollback(str(root), version)
        return UpdateResult(manifest, collection, collection != before), before or ""
    root = Path(root).resolve()
    if not versions.is_versioned_root(root):
        raise UserError(f"{root} is not a versioned index root (no {versions.CURRENT_FILE}); nothing to roll back")
    text = str(version).strip()
    name = versions.version_name(int(text)) if text.isdigit() else text
    with versions.writer_lock(root) as lock:
        versions.crash_point("rollback:locked")
        versions.clean_stale(root, lock)
        before = versions.read_current(root)
        available = versions.list_versions(root)
        if name not in available:
            raise UserError(f"{root} has no version {text!r}; its versions are {', '.join(available)} "
                            f"(CURRENT: {before})")
        folder = root / versions.VERSIONS_DIR / name
        manifest = _check_version(folder)
        if name == before:
            log.warning("index %s: CURRENT already names %s; nothing to do", root, name)
            return UpdateResult(manifest, name, changed=False), before
        versions.write_current(root, name)
        return UpdateResult(manifest, name), before


def _check_version(folder: Path) -> IndexManifest:
    """The manifest of `folder` once its files are there and agree: faiss vectors = metadata rows = count."""
    for f in versions.INDEX_FILES:
        if not (folder / f).is_file():
            raise UserError(f"version {folder.name} is incomplete ({f} is missing); refusing to switch to it")
    manifest = IndexManifest.load(folder / MANIFEST_FILE)
    try:
        ntotal = faiss.read_index(str(folder / INDEX_FILE), faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY).ntotal
    except RuntimeError:
        ntotal = faiss.read_index(str(folder / INDEX_FILE), faiss.IO_FLAG_ONDISK_SAME_DIR).ntotal
    con = sqlite3.connect(f"file:{folder / META_FILE}?mode=ro", uri=True)
    try:
        rows = con.execute("SELECT COUNT(*) FROM items").fetchone()[0]
    finally:
        con.close()
    if not ntotal == rows == manifest.count:
        raise UserError(f"version {folder.name} is inconsistent ({ntotal} vectors, {rows} metadata rows, manifest "
                        f"count {manifest.count}); refusing to switch to it")
    return manifest


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
    return versions.work_root(root) / "add"
