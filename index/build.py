"""Embed a labelled image folder with the teacher and write a faiss index folder.

The folder holds `index.faiss` (always a CPU index), `meta.sqlite` (`items(id, path, label)`, ids 0..N-1 in
listing order) and `manifest.json` (`IndexManifest`). It is built in a hidden temporary sibling and renamed into
place at the end, so an interrupted build leaves nothing behind and a reader never sees half an index.
"""
from __future__ import annotations

import dataclasses
import os
import secrets
import shutil
import sqlite3
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import faiss
import numpy as np
from tqdm import tqdm

from asymsearch.core.data import ImageItem, list_image_folder, select_classes
from asymsearch.core.errors import InvalidImage, UserError
from asymsearch.core.manifest import IndexManifest
from asymsearch.core.ort import OnnxEmbedder
from asymsearch.core.preprocess import decode_image, preprocess
from asymsearch.index.store import INDEX_FILE, MANIFEST_FILE, META_FILE

METRIC = "inner_product"
MAX_TRAIN_VECTORS = 200_000  # training sample cap; faiss subsamples k-means further on its own


@dataclasses.dataclass
class EmbeddedImages:
    """The readable images in listing order, one (N, dim) array per embedder, and what was skipped."""

    items: list[ImageItem]
    vectors: list[np.ndarray]
    skipped: list[tuple[str, str]]  # (path, reason)


def embed_items(items: Sequence[ImageItem], embedders: Sequence[OnnxEmbedder], *, batch_size: int = 64,
                progress: bool = True, desc: str = "embedding", workers: int | None = None) -> EmbeddedImages:
    """Decode every image once and embed it with each embedder (each with its own preprocessing).

    Decoding and preprocessing run in a small thread pool one batch ahead of the models. Unreadable files are
    skipped and returned with their reason; they get no vector.
    """
    if batch_size < 1:
        raise UserError(f"batch size must be at least 1, not {batch_size}")
    specs = [e.manifest.preprocessing for e in embedders]
    workers = workers or min(4, os.cpu_count() or 1)

    def load(item: ImageItem) -> list[np.ndarray] | InvalidImage:
        try:
            img = decode_image(item.path)
        except InvalidImage as e:
            return e
        return [preprocess(img, spec) for spec in specs]

    kept: list[ImageItem] = []
    blocks: list[list[np.ndarray]] = [[] for _ in embedders]
    skipped: list[tuple[str, str]] = []

    def consume(batch: list[ImageItem], futures: list[Future]) -> None:
        arrays = []
        for item, fut in zip(batch, futures):
            res = fut.result()
            if isinstance(res, InvalidImage):
                skipped.append((item.path, str(res)))
            else:
                kept.append(item)
                arrays.append(res)
        if arrays:
            for j, embedder in enumerate(embedders):
                blocks[j].append(embedder.embed_arrays(np.stack([a[j] for a in arrays])))
        bar.update(len(batch))

    batches = [list(items[i:i + batch_size]) for i in range(0, len(items), batch_size)]
    with tqdm(total=len(items), unit="img", desc=desc, disable=not progress, file=sys.stderr) as bar, \
            ThreadPoolExecutor(max_workers=workers) as pool:
        pending: tuple[list[ImageItem], list[Future]] | None = None
        try:
            for batch in batches:
                futures = [pool.submit(load, item) for item in batch]
                if pending is not None:
                    consume(*pending)
                pending = (batch, futures)
            if pending is not None:
                consume(*pending)
        except BaseException:  # interrupted: drop the decodes still queued instead of waiting for them
            pool.shutdown(wait=False, cancel_futures=True)
            raise

    vectors = [np.concatenate(b) if b else np.zeros((0, e.dim), np.float32) for b, e in zip(blocks, embedders)]
    return EmbeddedImages(kept, vectors, skipped)


def report_skipped(skipped: Sequence[tuple[str, str]]) -> None:
    if skipped:
        print(f"skipped {len(skipped)} unreadable files:", file=sys.stderr)
        for _, reason in skipped:
            print(f"  {reason}", file=sys.stderr)


def build_index(teacher: str | os.PathLike, images: str | os.PathLike, out: str | os.PathLike, *,
                factory: str = "Flat", classes: str = "all", batch_size: int = 64, overwrite: bool = False,
                progress: bool = True) -> IndexManifest:
    """Embed the images of `images` (ROOT/<class>/<image>) with `teacher` and write the index folder `out`."""
    start = time.perf_counter()
    teacher, images, out = Path(teacher).resolve(), Path(images).resolve(), Path(out).resolve()
    _check_out(out, overwrite)
    embedder = OnnxEmbedder(teacher)
    if embedder.manifest.role != "teacher":
        raise UserError(f"{teacher} is a {embedder.manifest.role}, not a teacher: the database must be embedded "
                        f"by the teacher (its manifest role must be 'teacher')")
    index = new_index(embedder.dim, factory)  # a bad factory fails before any image is decoded
    items = list_image_folder(images, select_classes(images, classes))

    embedded = embed_items(items, [embedder], batch_size=batch_size, progress=progress, desc="embedding database")
    report_skipped(embedded.skipped)
    if not embedded.items:
        raise UserError(f"none of the {len(items)} image files in {images} could be read")
    vectors = embedded.vectors[0]
    if not np.isfinite(vectors).all():
        raise UserError(f"the teacher {teacher} produced non-finite embeddings; check the exported model")
    index = fill_index(index, vectors, factory)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = _fresh_dir(out.parent, f".{out.name}.tmp-")
    try:
        faiss.write_index(index, str(tmp / INDEX_FILE))
        write_metadata(tmp / META_FILE, embedded.items)
        manifest = IndexManifest(
            teacher_id=embedder.teacher_id, dim=embedder.dim, metric=METRIC, factory=factory,
            count=int(index.ntotal),
            teacher_model={"path": str(teacher), "sha256": embedder.manifest.sha256,
                           "model_id": embedder.manifest.model_id},
            build={"images": str(images), "classes": classes, "batch_size": batch_size,
                   "skipped": [path for path, _ in embedded.skipped],
                   "seconds": round(time.perf_counter() - start, 3)},
            search_params={})
        manifest.save(tmp / MANIFEST_FILE)
        _move_into_place(tmp, out, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def new_index(dim: int, factory: str) -> faiss.Index:
    """An empty inner-product faiss index from a factory string; `UserError` naming a string faiss rejects."""
    try:
        return faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:
        raise UserError(f"invalid faiss index factory {factory!r} for dimension {dim} "
                        f"(e.g. 'Flat', 'IVF1024,Flat', 'IVF1024,PQ32', 'HNSW32'): {_faiss_reason(e)}") from None


def fill_index(index: faiss.Index, vectors: np.ndarray, factory: str) -> faiss.Index:
    """Train (when needed) and add `vectors` with ids 0..N-1; on GPUs when faiss has them. Returns a CPU index."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if faiss.get_num_gpus() > 0:
        try:
            gpu_index = faiss.index_cpu_to_all_gpus(index)
        except RuntimeError as e:  # e.g. HNSW has no GPU implementation
            print(f"faiss cannot build {factory!r} on GPU ({_faiss_reason(e)}); building on CPU", file=sys.stderr)
        else:
            _train_and_add(gpu_index, vectors, factory)
            return faiss.index_gpu_to_cpu(gpu_index)
    _train_and_add(index, vectors, factory)
    return index


def _train_and_add(index: faiss.Index, vectors: np.ndarray, factory: str) -> None:
    n = len(vectors)
    if not index.is_trained:
        sample = vectors
        if n > MAX_TRAIN_VECTORS:
            rows = np.random.default_rng(0).choice(n, MAX_TRAIN_VECTORS, replace=False)
            sample = vectors[np.sort(rows)]
        try:
            index.train(sample)
        except RuntimeError as e:
            reason = _faiss_reason(e)
            if "training points" in reason or "nx >=" in reason:
                raise UserError(f"too few vectors to train faiss index {factory!r}: {n} readable images "
                                f"({reason}); index more images or choose a smaller factory such as 'Flat'") from None
            raise UserError(f"faiss could not train index {factory!r} on {n} vectors: {reason}") from None
    try:
        index.add(vectors)
    except RuntimeError as e:
        raise UserError(f"faiss could not add vectors to index {factory!r}: {_faiss_reason(e)}") from None


def write_metadata(path: Path, items: Sequence[ImageItem]) -> None:
    con = sqlite3.connect(path)
    try:
        with con:
            con.execute("CREATE TABLE items(id INTEGER PRIMARY KEY, path TEXT NOT NULL, label TEXT NOT NULL)")
            con.executemany("INSERT INTO items(id, path, label) VALUES (?, ?, ?)",
                            ((i, item.path, item.label) for i, item in enumerate(items)))
    finally:
        con.close()


def _check_out(out: Path, overwrite: bool) -> None:
    if not out.exists():
        return
    if not overwrite:
        raise UserError(f"{out} already exists; choose another output folder or pass overwrite to replace it")
    # overwrite replaces an index folder, never an unrelated file or folder that happens to have this name
    if not out.is_dir() or (any(out.iterdir()) and not (out / MANIFEST_FILE).is_file()):
        raise UserError(f"{out} exists and is not an index folder (no {MANIFEST_FILE}); refusing to replace it")


def _move_into_place(tmp: Path, out: Path, overwrite: bool) -> None:
    _check_out(out, overwrite)  # again: something may have appeared there while the build ran
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


def _faiss_reason(e: Exception) -> str:
    """faiss errors read 'Error in <signature> at <file>:<line>: <reason>'; keep the reason."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else repr(e)
    if "failed: " in text:  # FAISS_THROW_IF_NOT_MSG: keep the message after the failed condition
        return text.split("failed: ", 1)[1]
    marker = text.find(": ", text.find(" at "))
    return text[marker + 2:] if " at " in text and marker != -1 else text
