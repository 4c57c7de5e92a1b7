"""Embed a labelled image folder with the teacher and write a faiss index folder.

The folder holds `index.faiss` (always a CPU index, wrapped in IDMap2: ids 0..N-1 in listing order at build time,
stable afterwards), `meta.sqlite` (see `asymsearch.index.metadata`), `manifest.json` (`IndexManifest`) and
`skipped.tsv` (the files that could not be read, with the reason). A plain folder is written in the work folder
`.<out>.work/` beside the output, fsynced (files, then the folder) and renamed into place; with `overwrite` it is
swapped with the old folder in one atomic exchange of the two names (`renameat2(RENAME_EXCHANGE)`), so the name
`out` always holds a complete index, the old one or the new one. A versioned root gets a new version published
through CURRENT (`asymsearch.index.versions`).

The whole build holds the writer lock of `out` (`versions.writer_lock`, `.<out>.work/lock`) from its first step:
a second build, add, remove or rollback of the same output is refused with the holder's pid, so two builders never
share the work folder. Embeddings are committed in shards to `.<out>.work/build` while they are produced
(`asymsearch.index.shards`); a build that is interrupted, even by kill -9, leaves them there and `resume=True`
embeds only the shards still missing (the finished index is identical to that of an uninterrupted build), while
a build without `resume` discards them, saying so. Whatever else a killed build left (a half-written folder, the
old folder of an interrupted swap, on-disk merge blocks, a staging version) is removed by the next writer, which
names what it removed.

`multiscale=True` embeds every database image at scales 1, 1/√2 and 1/2 and stores the re-normalised mean
(`asymsearch.core.multiscale`); the manifest records the scales (`build["scales"]`, [1.0] for a single-scale
build) and `index add` embeds new images the same way. `flip=True` adds each image's mirror to the mean
(`build["flip"]`), as `index add` does then too.
"""
from __future__ import annotations

import ctypes
import dataclasses
import errno
import json
import logging
import os
import re
import secrets
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

import faiss
import numpy as np

from asymsearch.core.config import CONFIG_FILE, save_config
from asymsearch.core.data import ImageItem, list_image_folder, select_classes
from asymsearch.core.errors import UserError
from asymsearch.core.manifest import IndexManifest, require_teacher
from asymsearch.core.multiscale import MULTISCALE_SCALES, SINGLE_SCALE, with_scales
from asymsearch.core.ort import OnnxEmbedder
from asymsearch.index import ondisk, versions
from asymsearch.index.config import DEFAULT_SHARD_SIZE, IndexBuildConfig
from asymsearch.index.faiss_index import (MAX_TRAIN_VECTORS, add_blocks, apply_search_params, faiss_reason,
                                          new_index, sample_rows, train_index)
from asymsearch.index.metadata import match_metadata, read_metadata_csv, write_metadata
from asymsearch.index.pipeline import EmbeddedImages, embed_into_shards, embed_items
from asymsearch.index.shards import ShardStore, listing_digest
from asymsearch.index.store import INDEX_FILE, MANIFEST_FILE, META_FILE, SKIPPED_FILE

__all__ = ["build_index", "IndexBuildConfig", "plan_build", "embed_database", "construct_index", "publish_index",
           "DEFAULT_SHARD_SIZE", "embed_items", "EmbeddedImages", "report_skipped", "new_index", "MAX_TRAIN_VECTORS",
           "write_index_folder", "work_dir", "faiss_reason"]

METRIC = "inner_product"
ENGINES = ("local", "ray")
log = logging.getLogger("asymsearch.index")


def report_skipped(skipped: Sequence[tuple[str, str]]) -> None:
    if skipped:
        print(f"skipped {len(skipped)} unreadable files:", file=sys.stderr)
        for _, reason in skipped:
            print(f"  {reason}", file=sys.stderr)


def work_dir(out: Path) -> Path:
    """Where the embedding shards of a build of `out` live until the index is in place."""
    return versions.work_root(out) / "build"


@dataclasses.dataclass
class BuildPlan:
    """What a build will do, checked before any image is decoded (`plan_build`)."""

    config: IndexBuildConfig  # with teacher, images and out resolved to absolute paths
    teacher: Path
    images: Path
    out: Path
    versioned: bool
    scales: tuple[float, ...]
    embedder: Any  # an OnnxEmbedder, or a MultiScaleEmbedder over it
    items: list[ImageItem]
    columns: dict  # path -> metadata row
    budget: Any  # an `asymsearch.index.auto.Budget` with --auto, else None
    work: dict  # the shard store's plan: a resumed build must match it
    auto_queries: Any = None  # --auto: the student queries to tune on (`index.auto.QueryPlan`), or None


@dataclasses.dataclass
class BuiltIndex:
    """The faiss index made from the shards (`construct_index`) and what chose it."""

    index: faiss.Index
    factory: str
    search_params: dict
    auto_report: dict | None
    rows: list[int]  # listing positions of the readable images, in id order
    skipped: list[tuple[str, str]]
    probe: Any = None  # (paths, labels, vectors, ids) the probe set is chosen from (`asymsearch.index.probe`)


def build_index(config: IndexBuildConfig | str | os.PathLike, images: str | os.PathLike | None = None,
                out: str | os.PathLike | None = None, *, progress: bool = True, **fields: Any) -> IndexManifest:
    """Embed the images of `config.images` (ROOT/<class>/<image>) with `config.teacher` and write the index
    `config.out`: `plan_build` -> `embed_database` -> `construct_index` -> `publish_index`.

    `build_index(teacher, images, out, factory=..., ...)` is shorthand for an `IndexBuildConfig` of those fields
    (`auto` may also be an `asymsearch.index.auto.Budget`). `out` becomes a plain index folder, or with `versioned`
    (or when it already is a versioned root) a new version published through CURRENT, old versions pruned to
    `keep`. `auto` replaces `factory` and `search_params` by the choice `asymsearch.index.auto.choose_index` makes
    for the data. `engine="ray"` embeds on the Ray cluster at `address` (a local one when None). `on_disk` (IVF
    factories only) keeps the inverted lists in `index.ivfdata` on disk (`asymsearch.index.ondisk`). `multiscale`
    embeds each image at `MULTISCALE_SCALES` and keeps the re-normalised mean; `flip` adds each image's mirror.
    The merged config is saved in the index folder as `config.yaml` (`asymsearch.core.config`).
    """
    start = time.perf_counter()
    if not isinstance(config, IndexBuildConfig):
        config = config_from_fields(config, images, out, **fields)
    elif images is not None or out is not None or fields:
        raise TypeError("build_index(config) takes no other fields; change the config instead")
    if str(config.out).startswith(("milvus://", "milvus-lite://")):  # a new collection behind a Milvus alias
        from asymsearch.index.milvus import build_into_milvus  # the `milvus` extra; never imported otherwise
        return build_into_milvus(config, progress=progress)
    out = Path(config.out).resolve()
    with versions.writer_lock(out) as lock:  # from the first step: one writer of `out` and of its work folder
        versions.crash_point("build:locked")
        _clean_leftovers(out, lock)
        versions.clean_stale(out, lock)
        plan = plan_build(config, check_out=False)
        try:
            _check_out(out, config.overwrite, plan.versioned)
        except UserError:
            done = _published_by_killed_build(plan, lock)
            if done is not None:
                return done
            if not config.resume and work_dir(out).exists():
                _open_work(plan, False, lock).remove()  # stale shards of another build: discarded, saying so
            raise
        store = _open_work(plan, config.resume, lock)
        try:
            embed_database(plan, store, progress=progress)
            built = construct_index(plan, store, progress=progress)
            manifest = publish_index(plan, built, seconds=time.perf_counter() - start)
        except UserError:
            store.remove()  # the embeddings cannot produce this index: nothing to resume
            shutil.rmtree(lock.work / "ondisk", ignore_errors=True)
            raise
        versions.crash_point("build:done")
        store.remove()
        shutil.rmtree(lock.work / "ondisk", ignore_errors=True)
    return manifest


def _published_by_killed_build(plan: BuildPlan, lock: versions.WriterLock) -> IndexManifest | None:
    """The manifest of `plan.out` when a build with this very plan (its shards are still there) put it in place
    and was killed before removing them: the same command again has nothing to build. Else None."""
    folder = work_dir(plan.out)
    try:
        stale = json.loads((folder / "plan.json").read_text(encoding="utf-8"))
        manifest = IndexManifest.load(versions.resolve_index_folder(plan.out)[0] / MANIFEST_FILE)
    except (OSError, ValueError, UserError):
        return None
    config, b = plan.config, manifest.build
    same = ({k: v for k, v in stale.items() if k != "format"} == plan.work
            and manifest.teacher_model.get("sha256") == plan.work["teacher_sha256"]
            and (b.get("images"), b.get("classes"), b.get("scales"), bool(b.get("flip")), b.get("shard_size"),
                 b.get("batch_size")) == (str(plan.images), config.classes, list(plan.scales), config.flip,
                                          config.shard_size, config.batch_size)
            and (config.auto or (manifest.factory, manifest.search_params) == (config.factory,
                                                                                dict(config.search_params))))
    if not same:
        return None
    shutil.rmtree(folder, ignore_errors=True)
    shutil.rmtree(lock.work / "ondisk", ignore_errors=True)
    log.warning("index %s: nothing to build: it already holds this build, which %s put in place before it "
                "stopped; removed its leftover embedding shards", plan.out, lock.left_by())
    return manifest


def _open_work(plan: BuildPlan, resume: bool, lock: versions.WriterLock) -> ShardStore:
    """The shard store of this build; the shards of an interrupted one are reused with `resume`, else discarded.
    Either way one line says so."""
    folder = work_dir(plan.out)
    left = len(list(folder.glob("shard-*.json"))) if folder.is_dir() else 0
    store = ShardStore.open(folder, plan.work, resume=resume)
    if folder.is_dir() and left and resume:
        log.warning("index %s: resuming the build that %s left: %d of %d embedding shards already done",
                    plan.out, lock.left_by(), left, store.num_shards)
    elif left:
        log.warning("index %s: discarded %d embedding shard(s) that %s left (pass --resume to reuse them)",
                    plan.out, left, lock.left_by())
    return store


def _clean_leftovers(out: Path, lock: versions.WriterLock) -> None:
    """Remove what a killed build of `out` left besides its shards: folders being written or replaced
    (`.<out>.work/tmp-*`) and on-disk merge blocks; from older releases, `.<out>.tmp-*` and `.<out>.old-*` (an
    old folder moved aside by an interrupted overwrite is put back when `out` is missing). Call under the lock."""
    removed = []
    for p in sorted(lock.work.glob("tmp-*")):
        shutil.rmtree(p, ignore_errors=True)
        removed.append(f"{lock.work.name}/{p.name}")
    if (lock.work / "ondisk").exists():
        shutil.rmtree(lock.work / "ondisk", ignore_errors=True)
        removed.append(f"{lock.work.name}/ondisk")
    legacy = re.compile(rf"^\.{re.escape(out.name)}\.(tmp|old)-[0-9a-f]{{8}}$")
    for p in sorted(out.parent.glob(f".{out.name}.*-*")):
        if not legacy.match(p.name) or not p.is_dir():
            continue
        if p.name.split(".")[-1].startswith("old") and (p / out.name).is_dir() and not out.exists():
            os.rename(p / out.name, out)
            log.warning("index %s: put back the index folder an interrupted overwrite had moved to %s", out, p)
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p.name)
    if removed:
        log.warning("index %s: removed what the build of %s left: %s", out, lock.left_by(), ", ".join(removed))


def config_from_fields(teacher: str | os.PathLike, images: str | os.PathLike | None,
                       out: str | os.PathLike | None, **fields: Any) -> IndexBuildConfig:
    """An `IndexBuildConfig` from keyword fields; `auto` may be a `Budget` (its figures become the auto keys)."""
    auto = fields.pop("auto", False)
    if auto is not None and not isinstance(auto, bool):  # a Budget
        fields.update(auto=True, max_memory=str(auto.max_memory), target_ms=float(auto.target_ms),
                      target_recall=float(auto.target_recall))
    else:
        fields["auto"] = bool(auto)
    if fields.get("search_params") is None:
        fields["search_params"] = {}
    fields["search_params"] = dict(fields["search_params"])
    paths = {k: os.fspath(v) for k, v in (("teacher", teacher), ("images", images), ("out", out)) if v is not None}
    if fields.get("metadata") is not None:
        fields["metadata"] = os.fspath(fields["metadata"])
    return IndexBuildConfig(**paths, **fields)


def plan_build(config: IndexBuildConfig, *, check_out: bool = True) -> BuildPlan:
    """Check everything that can be checked without decoding an image: options, output folder (unless
    `check_out` is False), the teacher's role, factory and search parameters, the listing and the metadata."""
    teacher, images, out = (Path(p).resolve() for p in (config.teacher, config.images, config.out))
    config = dataclasses.replace(config, teacher=str(teacher), images=str(images), out=str(out),
                                 metadata=str(Path(config.metadata).resolve()) if config.metadata else None)
    factory, search_params = config.factory, dict(config.search_params)
    if config.engine not in ENGINES:
        raise UserError(f"unknown engine {config.engine!r}; use one of {', '.join(ENGINES)}")
    if config.shard_size < 1 or config.batch_size < 1:
        raise UserError(f"shard size and batch size must be at least 1 (got {config.shard_size}, "
                        f"{config.batch_size})")
    if config.auto and search_params:
        raise UserError("search parameters are chosen by --auto; leave out --search-param")
    if config.on_disk and config.auto:
        raise UserError("--on-disk and --auto do not combine: give an IVF --factory with --on-disk")
    if (config.multiscale or config.flip) and config.engine == "ray":
        raise UserError(f"--{'multiscale' if config.multiscale else 'flip'} is not available with --engine ray "
                        f"yet; embed with --engine local")
    for path, what in ((teacher, "teacher ONNX model"), (images, "image folder")):
        if not path.exists():
            raise UserError(f"{what} not found: {path}")
    budget = None
    if config.auto:
        from asymsearch.index.auto import Budget, parse_size
        budget = Budget(max_memory=parse_size(config.max_memory), target_ms=config.target_ms,
                        target_recall=config.target_recall)
    elif config.auto_queries or config.student or config.auto_query_vectors:
        raise UserError("--auto-queries, --student and --auto-query-vectors only apply with --auto")
    versioned = config.versioned or versions.is_versioned_root(out)
    if check_out:
        _check_out(out, config.overwrite, versioned)
    scales = MULTISCALE_SCALES if config.multiscale else SINGLE_SCALE
    teacher_model = OnnxEmbedder(teacher)
    require_teacher(teacher_model, str(teacher))
    embedder = with_scales(teacher_model, scales, config.flip)
    auto_queries = None
    if budget is not None:
        from asymsearch.index.auto import plan_queries
        auto_queries = plan_queries(config, teacher_model)  # checked before any database image is decoded
    if budget is None:  # a bad factory or search parameter fails before any image is decoded
        apply_search_params(new_index(embedder.dim, factory), search_params, f" (factory {factory!r})")
    if config.on_disk:
        ondisk.check_factory(embedder.dim, factory)
    items = list_image_folder(images, select_classes(images, config.classes))
    columns = read_metadata_csv(config.metadata, images) if config.metadata else {}
    match_metadata(columns, [item.path for item in items], str(config.metadata))
    work = {"teacher_sha256": embedder.manifest.sha256, "dim": embedder.dim, "count": len(items),
            "listing_sha256": listing_digest(items), "shard_size": config.shard_size,
            "batch_size": config.batch_size, **({"scales": list(scales)} if config.multiscale else {}),
            **({"flip": True} if config.flip else {})}
    return BuildPlan(config, teacher, images, out, versioned, tuple(scales), embedder, items, columns, budget, work,
                     auto_queries)


def embed_database(plan: BuildPlan, store: ShardStore, *, progress: bool = True) -> None:
    """Embed every shard of `store` not committed yet, here or on Ray; the collapse guard judges the first shard
    committed (`check_shard`) before the others are embedded."""
    config = plan.config
    checked: list[int] = []

    def guard(shard: int) -> None:
        if not checked:
            checked.append(shard)
            check_shard(plan, store, shard)
    if config.engine == "ray":
        from asymsearch.index.ray_engine import embed_with_ray  # the `distributed` extra; never imported otherwise
        embed_with_ray(plan.items, plan.teacher, store, batch_size=config.batch_size, address=config.address,
                       progress=progress)
        if store.num_shards:
            guard(0)
    else:
        embed_into_shards(plan.items, plan.embedder, store, batch_size=config.batch_size, workers=config.workers,
                          progress=progress, desc="embedding database", on_shard=guard)


GUARD_IMAGES = 256


def check_shard(plan: BuildPlan, store: ShardStore, shard: int) -> None:
    """The collapse guard (`core.spread`) on up to GUARD_IMAGES vectors spread through one committed shard: they
    must not be one vector or nearly parallel ones (`DegenerateEmbeddings`, one line: such an index would answer
    every query by chance); the build stops there, before the other shards are embedded."""
    from asymsearch.core.spread import check_spread
    vectors = store.read(shard)[1]
    check_spread(vectors[::max(1, len(vectors) // GUARD_IMAGES)], f"index build with {plan.teacher.name}")


def construct_index(plan: BuildPlan, store: ShardStore, *, progress: bool = True) -> BuiltIndex:
    """The faiss index of the committed shards: chosen by --auto, on disk, or the configured factory."""
    config = plan.config
    rows, skipped = store.kept_rows()
    report_skipped(skipped)
    if len(rows) == 0:
        raise UserError(f"none of the {len(plan.items)} image files in {plan.images} could be read")
    factory, search_params, auto_report = config.factory, dict(config.search_params), None
    dim = plan.embedder.dim
    if plan.budget is not None:
        from asymsearch.index.auto import VectorSource, choose_index
        queries = plan.auto_queries.load(batch_size=config.batch_size, workers=config.workers,
                                         progress=progress) if plan.auto_queries else None
        choice = choose_index(VectorSource.of_shards(store), plan.budget, queries=queries,  # streamed, never whole
                              threads=config.search_threads, progress=progress)
        factory, search_params, auto_report, index = choice.factory, choice.search_params, choice.report, choice.index
    elif config.on_disk:
        index = ondisk.build_on_disk(_id_blocks(store), _gather(store, sample_rows(_kept_count(store))),
                                     dim, factory, store.folder.parent / "ondisk")
    else:
        index = index_from_shards(store, dim, factory)
    apply_search_params(index, search_params, f" (factory {factory!r})")
    return BuiltIndex(index, factory, dict(search_params), auto_report, list(rows), list(skipped),
                      probe=_probe_candidates(plan, store, list(rows)))


def _probe_candidates(plan: BuildPlan, store: ShardStore, rows: list[int]) -> tuple:
    """The images the probe set is drawn from, with their index vectors read back from the shards (the probe
    set keeps exactly what the index holds for them) and their ids."""
    from asymsearch.index.probe import select_probe
    labels = [plan.items[r].label for r in rows]
    positions, _ = select_probe(labels)
    vectors = _gather(store, np.asarray(positions, dtype=np.int64)) if positions else np.zeros((0, store.dim))
    return ([plan.items[rows[p]].path for p in positions], [labels[p] for p in positions], vectors, positions)


def publish_index(plan: BuildPlan, built: BuiltIndex, *, seconds: float = 0.0) -> IndexManifest:
    """Write the index folder (manifest, metadata, skipped files, config.yaml) and put it in place: renamed into
    place (or atomically swapped with the folder it replaces), or published as a new version of a versioned root.
    Call while holding `versions.writer_lock(plan.out)`, as `build_index` does."""
    config, embedder = plan.config, plan.embedder
    kept = [plan.items[r] for r in built.rows]
    manifest = IndexManifest(
        teacher_id=embedder.teacher_id, dim=embedder.dim, metric=METRIC, factory=built.factory,
        count=int(built.index.ntotal),
        teacher_model={"path": str(plan.teacher), "sha256": embedder.manifest.sha256,
                       "model_id": embedder.manifest.model_id},
        build={"images": str(plan.images), "classes": config.classes, "batch_size": config.batch_size,
               "shard_size": config.shard_size, "engine": config.engine, "scales": list(plan.scales),
               "skipped": [path for path, _ in built.skipped], "next_id": len(kept),
               **({"flip": True} if config.flip else {}),
               **({"on_disk": True} if config.on_disk else {}),
               **({"auto": built.auto_report} if built.auto_report else {}),
               **({"metadata": config.metadata} if config.metadata else {}),
               "seconds": round(seconds, 3)},
        search_params=built.search_params)
    meta_rows = ((i, item.path, item.label, plan.columns.get(item.path)) for i, item in enumerate(kept))
    out = plan.out
    if plan.versioned:
        staged = versions.staging_dir(out)
        try:
            write_index_folder(staged, built.index, meta_rows, manifest, built.skipped, config, built.probe)
            versions.crash_point("build:before-publish")
            versions.publish(out, staged, keep=config.keep)
        except BaseException:
            shutil.rmtree(staged, ignore_errors=True)
            raise
    else:
        tmp = _fresh_dir(versions.work_root(out), "tmp-")
        try:
            write_index_folder(tmp, built.index, meta_rows, manifest, built.skipped, config, built.probe)
            versions.crash_point("build:before-publish")
            versions.fsync_tree(tmp)  # every file, then the folder, before the name can point at it
            _move_into_place(tmp, out, config.overwrite)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)  # a failed folder, or after a swap the old index
    return manifest


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
                       skipped: Sequence[tuple[str, str]], config: Any = None, probe: Any = None) -> None:
    """Write the files of one complete index folder into the (new, empty) `folder`, with the config that made it
    as `config.yaml` when given, and the probe set (`asymsearch.index.probe`) of `probe` = (paths, labels,
    vectors, ids) when given."""
    ondisk.write_index(index, folder / INDEX_FILE)  # faiss.write_index, moving an on-disk index's lists beside it
    write_metadata(folder / META_FILE, meta_rows)
    write_skipped(folder / SKIPPED_FILE, skipped)
    if config is not None:
        save_config(config, folder / CONFIG_FILE)
    if probe is not None:
        from asymsearch.index.probe import write_probe
        paths, labels, vectors, ids = probe
        write_probe(folder, paths, labels, vectors, teacher_id=manifest.teacher_id, ids=ids, chosen=True)
    manifest.save(folder / MANIFEST_FILE)


def write_skipped(path: Path, skipped: Sequence[tuple[str, str]]) -> None:
    """The report of unreadable files: one `path<TAB>reason` line each, after a header line."""
    with open(path, "w", encoding="utf-8", errors="surrogateescape") as f:
        f.write("path\treason\n")
        for p, reason in skipped:
            f.write(f"{p}\t{' '.join(reason.split())}\n")


def _check_out(out: Path, overwrite: bool, versioned: bool) -> None:
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):  # nothing, or an empty folder to fill
        return
    if versioned and versions.is_versioned_root(out):
        if not overwrite:
            raise UserError(f"{out} already holds a versioned index; pass overwrite to publish a rebuilt version "
                            f"(or use `index add` / `index remove` to change it)")
        return
    if not overwrite:
        raise UserError(f"{out} already exists; choose another output folder or pass overwrite to replace it")
    # overwrite replaces an index folder, never an unrelated file or folder that happens to have this name
    if not out.is_dir() or not (out / MANIFEST_FILE).is_file():
        raise UserError(f"{out} exists and is not an index folder (no {MANIFEST_FILE}); refusing to replace it")
    if versioned:
        raise UserError(f"{out} is a plain index folder; build the versioned index elsewhere, or run `index add` "
                        f"on it, which turns it into a versioned root in place")
    _exchange_function()  # refused here, before anything is embedded, where the system cannot swap atomically


def _move_into_place(tmp: Path, out: Path, overwrite: bool) -> None:
    """Give the complete, fsynced folder `tmp` the name `out`. Onto nothing (or an empty folder) it is one rename;
    over an existing index it is one atomic exchange of the two names, after which `tmp` holds the old index.
    At no instant does `out` name a missing or incomplete folder."""
    _check_out(out, overwrite, False)  # again: something may have appeared there while the build ran
    if not out.exists() or not any(out.iterdir()):
        os.rename(tmp, out)
    else:
        exchange(tmp, out)
    versions._fsync_dir(out.parent)
    versions.crash_point("build:after-swap")


_AT_FDCWD = -100
_RENAME_EXCHANGE = 2  # linux/fs.h; macOS's RENAME_SWAP for renamex_np has the same value


def _exchange_function():
    """(libc function, argument builder) for an atomic exchange of two paths; `UserError` where there is none."""
    libc = ctypes.CDLL(None, use_errno=True)
    if sys.platform.startswith("linux") and hasattr(libc, "renameat2"):
        fn = libc.renameat2
        fn.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint)
        return fn, lambda a, b: (_AT_FDCWD, a, _AT_FDCWD, b, _RENAME_EXCHANGE)
    if sys.platform == "darwin" and hasattr(libc, "renamex_np"):
        fn = libc.renamex_np
        fn.argtypes = (ctypes.c_char_p, ctypes.c_char_p, ctypes.c_uint)
        return fn, lambda a, b: (a, b, _RENAME_EXCHANGE)
    raise UserError("overwrite of a plain index folder needs an atomic exchange of two names (renameat2 on "
                    "Linux, renamex_np on macOS), which this system lacks; build into a new folder, or use a "
                    "versioned root (--versioned)")


def exchange(a: Path, b: Path) -> None:
    """Swap the names `a` and `b` (two folders on one filesystem) in one atomic step."""
    fn, args = _exchange_function()
    if fn(*args(os.fsencode(a), os.fsencode(b))) != 0:
        err = ctypes.get_errno()
        if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise UserError(f"the filesystem of {b} cannot swap two folders atomically "
                            f"({os.strerror(err)}); build into a new folder, or use a versioned root (--versioned)")
        raise OSError(err, os.strerror(err), str(b))


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

