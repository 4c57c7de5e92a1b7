"""Embed a labelled image folder with the teacher and write a faiss index folder.

The folder holds `index.faiss` (always a CPU index, wrapped in IDMap2: ids 0..N-1 in listing order at build time,
stable afterwards), `meta.sqlite` (see `asymsearch.index.metadata`), `manifest.json` (`IndexManifest`) and
`skipped.tsv` (the files that could not be read, with the reason). It is written in a hidden temporary folder and
renamed into place at the end (a plain folder), or published as a new version of a versioned root (see
`asymsearch.index.versions`), so a reader never sees half an index.

Embeddings are committed in shards to the work folder `.<out>.work` beside the output while they are produced
(`asymsearch.index.shards`); a build that is interrupted, even by kill -9, leaves them there and `resume=True`
embeds only the shards still missing. The finished index is identical to that of an uninterrupted build.

`multiscale=True` embeds every database image at scales 1, 1/√2 and 1/2 and stores the re-normalised mean
(`asymsearch.core.multiscale`); the manifest records the scales (`build["scales"]`, [1.0] for a single-scale
build) and `index add` embeds new images the same way. `flip=True` adds each image's mirror to the mean
(`build["flip"]`), as `index add` does then too.
"""
from __future__ import annotations

import os
import secrets
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import faiss
import numpy as np

from asymsearch.core.data import list_image_folder, select_classes
from asymsearch.core.errors import UserError
from asymsearch.core.manifest import IndexManifest
from asymsearch.core.multiscale import MULTISCALE_SCALES, SINGLE_SCALE, with_scales
from asymsearch.core.ort import OnnxEmbedder
from asymsearch.index import ondisk, versions
from asymsearch.index.faiss_index import (MAX_TRAIN_VECTORS, add_blocks, apply_search_params, faiss_reason,
                                          new_index, sample_rows, train_index)
from asymsearch.index.metadata import match_metadata, read_metadata_csv, write_metadata
from asymsearch.index.pipeline import EmbeddedImages, embed_into_shards, embed_items
from asymsearch.index.shards import ShardStore, listing_digest
from asymsearch.index.store import INDEX_FILE, MANIFEST_FILE, META_FILE, SKIPPED_FILE

__all__ = ["build_index", "embed_items", "EmbeddedImages", "report_skipped", "new_index", "MAX_TRAIN_VECTORS",
           "write_index_folder", "work_dir", "faiss_reason"]

METRIC = "inner_product"
DEFAULT_SHARD_SIZE = 4096  # images per embedding shard: the most work an interruption can lose
ENGINES = ("local", "ray")


def report_skipped(skipped: Sequence[tuple[str, str]]) -> None:
    if skipped:
        print(f"skipped {len(skipped)} unreadable files:", file=sys.stderr)
        for _, reason in skipped:
            print(f"  {reason}", file=sys.stderr)


def work_dir(out: Path) -> Path:
    """Where the embedding shards of a build of `out` live until the index is in place."""
    return out.parent / f".{out.name}.work" / "build"


def build_index(teacher: str | os.PathLike, images: str | os.PathLike, out: str | os.PathLike, *,
                factory: str = "Flat", classes: str = "all", batch_size: int = 64, overwrite: bool = False,
                progress: bool = True, resume: bool = False, versioned: bool = False, keep: int | None = None,
                metadata: str | os.PathLike | None = None, search_params: Mapping[str, float] | None = None,
                auto: Any = None, shard_size: int = DEFAULT_SHARD_SIZE, workers: int | None = None,
                engine: str = "local", address: str | None = None, on_disk: bool = False,
                multiscale: bool = False, flip: bool = False) -> IndexManifest:
    """Embed the images of `images` (ROOT/<class>/<image>) with `teacher` and write the index `out`.

    `out` becomes a plain index folder, or with `versioned` (or when it already is a versioned root) a new
    version published through CURRENT, old versions pruned to `keep`. `auto` (an `asymsearch.index.auto.Budget`)
    replaces `factory` and `search_params` by the choice `asymsearch.index.auto.choose_index` makes for the data.
    `engine="ray"` embeds on the Ray cluster at `address` (a local one when None) instead of this process.
    `on_disk` (IVF factories only) keeps the inverted lists in `index.ivfdata` on disk (`asymsearch.index.ondisk`).
    `multiscale` embeds each image at `MULTISCALE_SCALES` and keeps the re-normalised mean (the teacher needs
    dynamic height/width, as every `asymsearch export` has); `flip` adds each image's left-right mirror to the mean.
    """
    start = time.perf_counter()
    teacher, images, out = Path(teacher).resolve(), Path(images).resolve(), Path(out).resolve()
    if engine not in ENGINES:
        raise UserError(f"unknown engine {engine!r}; use one of {', '.join(ENGINES)}")
    if shard_size < 1 or batch_size < 1:
        raise UserError(f"shard size and batch size must be at least 1 (got {shard_size}, {batch_size})")
    if auto is not None and search_params:
        raise UserError("search parameters are chosen by --auto; leave out --search-param")
    versioned = versioned or versions.is_versioned_root(out)
    if (multiscale or flip) and engine == "ray":
        raise UserError(f"--{'multiscale' if multiscale else 'flip'} is not available with --engine ray yet; "
                        f"embed with --engine local")
    _check_out(out, overwrite, versioned)
    scales = MULTISCALE_SCALES if multiscale else SINGLE_SCALE
    teacher_model = OnnxEmbedder(teacher)
    if teacher_model.manifest.role != "teacher":
        raise UserError(f"{teacher} is a {teacher_model.manifest.role}, not a teacher: the database must be "
                        f"embedded by the teacher (its manifest role must be 'teacher')")
    embedder = with_scales(teacher_model, scales, flip)
    if auto is None:  # a bad factory or search parameter fails before any image is decoded
        apply_search_params(new_index(embedder.dim, factory), dict(search_params or {}), f" (factory {factory!r})")
    if on_disk:
        if auto is not None:
            raise UserError("--on-disk and --auto do not combine: give an IVF --factory with --on-disk")
        ondisk.check_factory(embedder.dim, factory)
    items = list_image_folder(images, select_classes(images, classes))
    columns = read_metadata_csv(metadata, images) if metadata else {}
    match_metadata(columns, [item.path for item in items], str(metadata))

    plan = {"teacher_sha256": embedder.manifest.sha256, "dim": embedder.dim, "count": len(items),
            "listing_sha256": listing_digest(items), "shard_size": shard_size, "batch_size": batch_size,
            **({"scales": list(scales)} if multiscale else {}), **({"flip": True} if flip else {})}
    store = ShardStore.open(work_dir(out), plan, resume=resume)
    try:
        if engine == "ray":
            from asymsearch.index.ray_engine import embed_with_ray  # the `distributed` extra; never imported otherwise
            embed_with_ray(items, teacher, store, batch_size=batch_size, address=address, progress=progress)
        else:
            embed_into_shards(items, embedder, store, batch_size=batch_size, workers=workers, progress=progress,
                              desc="embedding database")
        rows, skipped = store.kept_rows()
        report_skipped(skipped)
        if len(rows) == 0:
            raise UserError(f"none of the {len(items)} image files in {images} could be read")
        auto_report = None
        if auto is not None:
            from asymsearch.index.auto import choose_index
            choice = choose_index(store.all_vectors(), auto, progress=progress)
            factory, search_params, auto_report = choice.factory, choice.search_params, choice.report
            index = choice.index
        elif on_disk:
            index = ondisk.build_on_disk(_id_blocks(store), _gather(store, sample_rows(_kept_count(store))),
                                         embedder.dim, factory, store.folder.parent / "ondisk")
        else:
            index = index_from_shards(store, embedder.dim, factory)
        apply_search_params(index, dict(search_params or {}), f" (factory {factory!r})")
        kept = [items[r] for r in rows]
        manifest = IndexManifest(
            teacher_id=embedder.teacher_id, dim=embedder.dim, metric=METRIC, factory=factory,
            count=int(index.ntotal),
            teacher_model={"path": str(teacher), "sha256": embedder.manifest.sha256,
                           "model_id": embedder.manifest.model_id},
            build={"images": str(images), "classes": classes, "batch_size": batch_size, "shard_size": shard_size,
                   "engine": engine, "scales": list(scales), "skipped": [path for path, _ in skipped],
                   "next_id": len(kept),
                   **({"flip": True} if flip else {}),
                   **({"on_disk": True} if on_disk else {}),
                   **({"auto": auto_report} if auto_report else {}),
                   **({"metadata": str(Path(metadata).resolve())} if metadata else {}),
                   "seconds": round(time.perf_counter() - start, 3)},
            search_params=dict(search_params or {}))
        meta_rows = ((i, item.path, item.label, columns.get(item.path)) for i, item in enumerate(kept))
        if versioned:
            with versions.writer_lock(out):
                versions.clean_stale(out)
                staged = versions.staging_dir(out)
                write_index_folder(staged, index, meta_rows, manifest, skipped)
                versions.crash_point("build:before-publish")
                versions.publish(out, staged, keep=keep)
        else:
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp = _fresh_dir(out.parent, f".{out.name}.tmp-")
            try:
                write_index_folder(tmp, index, meta_rows, manifest, skipped)
                versions.crash_point("build:before-publish")
                _move_into_place(tmp, out, overwrite)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
    except UserError:
        store.remove()  # the embeddings cannot produce this index: nothing to resume
        shutil.rmtree(store.folder.parent / "ondisk", ignore_errors=True)
        _remove_if_empty(store.folder.parent)
        raise
    store.remove()
    _remove_if_empty(store.folder.parent)
    return manifest


def _remove_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:
        pass


def index_from_shards(store: ShardStore, dim: int, factory: str) -> faiss.Index:
    """Train on a fixed sample of the shards' vectors, then add shard by shard with ids 0..N-1 in listing order."""
    index = new_index(dim, factory)
    if not faiss.downcast_index(index.index).is_trained:
        index = train_index(index, _gather(store, sample_rows(_kept_count(store))), factory)
    add_blocks(index, _id_blocks(store), factory)
    return index


def _kept_count(store: ShardStore) -> int:
    return sum(len(rows) for rows, _, _ in store.iter_shards())


def _id_blocks(store: ShardStore) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    offset = 0
    for rows, vectors, _ in store.iter_shards():
        yield np.arange(offset, offset + len(rows), dtype=np.int64), vectors
        offset += len(rows)


def _gather(store: ShardStore, positions: np.ndarray) -> np.ndarray:
    """The vectors at sorted `positions` among all kept vectors, read shard by shard."""
    out, offset = [], 0
    for rows, vectors, _ in store.iter_shards():
        lo, hi = np.searchsorted(positions, [offset, offset + len(rows)])
        if hi > lo:
            out.append(np.asarray(vectors[positions[lo:hi] - offset]))
        offset += len(rows)
    return np.concatenate(out) if out else np.zeros((0, store.dim), np.float32)


def write_index_folder(folder: Path, index: faiss.Index, meta_rows, manifest: IndexManifest,
                       skipped: Sequence[tuple[str, str]]) -> None:
    """Write the files of one complete index folder into the (new, empty) `folder`."""
    ondisk.write_index(index, folder / INDEX_FILE)  # faiss.write_index, moving an on-disk index's lists beside it
    write_metadata(folder / META_FILE, meta_rows)
    write_skipped(folder / SKIPPED_FILE, skipped)
    manifest.save(folder / MANIFEST_FILE)


def write_skipped(path: Path, skipped: Sequence[tuple[str, str]]) -> None:
    """The report of unreadable files: one `path<TAB>reason` line each, after a header line."""
    with open(path, "w", encoding="utf-8", errors="surrogateescape") as f:
        f.write("path\treason\n")
        for p, reason in skipped:
            f.write(f"{p}\t{' '.join(reason.split())}\n")


def _check_out(out: Path, overwrite: bool, versioned: bool) -> None:
    if not out.exists():
        return
    if versioned and versions.is_versioned_root(out):
        if not overwrite:
            raise UserError(f"{out} already holds a versioned index; pass overwrite to publish a rebuilt version "
                            f"(or use `index add` / `index remove` to change it)")
        return
    if not overwrite:
        raise UserError(f"{out} already exists; choose another output folder or pass overwrite to replace it")
    # overwrite replaces an index folder, never an unrelated file or folder that happens to have this name
    if not out.is_dir() or (any(out.iterdir()) and not (out / MANIFEST_FILE).is_file()):
        raise UserError(f"{out} exists and is not an index folder (no {MANIFEST_FILE}); refusing to replace it")
    if versioned:
        raise UserError(f"{out} is a plain index folder; build the versioned index elsewhere, or run `index add` "
                        f"on it, which turns it into a versioned root in place")


def _move_into_place(tmp: Path, out: Path, overwrite: bool) -> None:
    _check_out(out, overwrite, False)  # again: something may have appeared there while the build ran
    if not out.exists():
        os.rename(tmp, out)
        return
    aside = _fresh_dir(out.parent, f".{out.name}.old-")
    os.rename(out, aside / out.name)
    try:
        os.rename(tmp, out)
    except BaseException:
        os.rename(aside / out.name, out)  # put the old index back
        aside.rmdir()
        raise
    shutil.rmtree(aside, ignore_errors=True)


def _fresh_dir(parent: Path, prefix: str) -> Path:
    """A new hidden folder `parent/<prefix><random>`, with the permissions of an ordinary mkdir (umask honoured,
    unlike `tempfile.mkdtemp`'s 0700, so the finished index is as readable as any folder the user makes)."""
    while True:
        path = parent / f"{prefix}{secrets.token_hex(4)}"
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue

