"""The embedding pipeline: images decoded and preprocessed by parallel workers, overlapped with batched inference.

Decoding runs in a thread pool (Pillow and numpy release the GIL while they work), one task per batch, at most
`prefetch` batches in flight: a bounded queue, so memory stays flat however large the folder. The caller's thread
runs onnxruntime on each batch as soon as it is ready, in listing order, while the workers decode the next ones.

Each image is decoded once, however many pixel preparations it needs: one per model, or one per scale of a
multi-scale embedder (`asymsearch.core.multiscale`); identical preparations are made once and shared.
"""
from __future__ import annotations

import dataclasses
import os
import sys
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
from tqdm import tqdm

from asymsearch.core.data import ImageItem
from asymsearch.core.errors import InvalidImage, UserError
from asymsearch.core.manifest import Preprocessing
from asymsearch.core.multiscale import embed_prepared, pixel_specs
from asymsearch.core.ort import OnnxEmbedder
from asymsearch.core.preprocess import decode_image, preprocess
from asymsearch.index.shards import ShardStore
from asymsearch.index.versions import crash_point


@dataclasses.dataclass
class DecodedBatch:
    tag: Any  # what the caller attached to the job, e.g. the shard number
    rows: list[int]  # listing positions of the readable images, in order
    arrays: list[np.ndarray]  # one (len(rows), 3, crop, crop) float32 array per preprocessing spec
    skipped: list[tuple[str, str]]  # (path, reason) of the unreadable ones
    size: int  # images in the job, readable or not


def default_workers() -> int:
    return max(1, min(8, os.cpu_count() or 1))


def load_batch(items: Sequence[ImageItem], rows: Sequence[int], specs: Sequence[Preprocessing],
               tag: Any = None) -> DecodedBatch:
    """Decode and preprocess the images of one batch; unreadable ones are skipped with their reason."""
    kept, skipped = [], []
    arrays: list[list[np.ndarray]] = [[] for _ in specs]
    for item, row in zip(items, rows):
        try:
            img = decode_image(item.path)
            prepared = [preprocess(img, spec) for spec in specs]
        except InvalidImage as e:
            skipped.append((item.path, str(e)))
            continue
        kept.append(row)
        for j, a in enumerate(prepared):
            arrays[j].append(a)
    stacked = [np.stack(a) if a else np.zeros((0, 3, s.crop, s.crop), np.float32) for a, s in zip(arrays, specs)]
    return DecodedBatch(tag, kept, stacked, skipped, len(rows))


def decoded_batches(jobs: Iterable[tuple[Any, Sequence[int]]], items: Sequence[ImageItem],
                    specs: Sequence[Preprocessing], *, workers: int | None = None,
                    prefetch: int | None = None) -> Iterator[DecodedBatch]:
    """Decode the jobs (tag, listing positions) in parallel; yield them in job order, at most `prefetch` ahead."""
    workers = workers or default_workers()
    prefetch = max(1, prefetch or 2 * workers)
    jobs = iter(jobs)
    window: deque[Future] = deque()
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="decode")

    def submit() -> bool:
        job = next(jobs, None)
        if job is None:
            return False
        tag, rows = job
        window.append(pool.submit(load_batch, [items[r] for r in rows], list(rows), specs, tag))
        return True

    try:
        while len(window) < prefetch and submit():
            pass
        while window:
            batch = window.popleft().result()
            submit()
            yield batch
    finally:  # finished, failed or abandoned: drop the decodes still queued instead of waiting for them
        pool.shutdown(wait=False, cancel_futures=True)


def batch_jobs(start: int, stop: int, batch_size: int, tag: Any = None) -> Iterator[tuple[Any, range]]:
    for b in range(start, stop, batch_size):
        yield tag, range(b, min(b + batch_size, stop))


def progress_bar(total: int, desc: str, enabled: bool, initial: int = 0) -> tqdm:
    """images/s and the time left, on stderr."""
    return tqdm(total=total, initial=initial, unit="img", desc=desc, disable=not enabled, file=sys.stderr,
                smoothing=0.1, dynamic_ncols=True)


def shared_specs(embedders: Sequence[Any]) -> tuple[list[Preprocessing], list[list[int]]]:
    """The distinct pixel preparations the embedders need, and for each embedder the positions of its own."""
    specs: list[Preprocessing] = []
    positions = []
    for embedder in embedders:
        mine = []
        for spec in pixel_specs(embedder):
            if spec not in specs:
                specs.append(spec)
            mine.append(specs.index(spec))
        positions.append(mine)
    return specs, positions


def embed_into_shards(items: Sequence[ImageItem], embedder: Any, store: ShardStore, *, batch_size: int,
                      workers: int | None = None, progress: bool = True, desc: str = "embedding",
                      on_shard: Callable[[int], None] | None = None) -> None:
    """Embed every shard of `store` that is not finished yet; each shard is committed as soon as it is complete.

    `embedder`: an `OnnxEmbedder` or a `MultiScaleEmbedder` (each image decoded once, prepared at every scale)."""
    if batch_size < 1:
        raise UserError(f"batch size must be at least 1, not {batch_size}")
    missing = store.missing()
    jobs = (job for shard in missing for job in batch_jobs(*store.shard_range(shard), batch_size, tag=shard))
    pending: dict[int, list] = {}
    with progress_bar(store.count, desc, progress, initial=store.count - sum(
            b - a for a, b in map(store.shard_range, missing))) as bar:
        for batch in decoded_batches(jobs, items, pixel_specs(embedder), workers=workers):
            vectors = embed_prepared(embedder, batch.arrays)
            if not np.isfinite(vectors).all():
                raise UserError(f"the teacher {embedder.path} produced non-finite embeddings; check the exported "
                                f"model")
            acc = pending.setdefault(batch.tag, [[], [], [], 0])
            acc[0].extend(batch.rows)
            acc[1].append(vectors)
            acc[2].extend(batch.skipped)
            acc[3] += batch.size
            start, stop = store.shard_range(batch.tag)
            if acc[3] == stop - start:
                store.write(batch.tag, acc[0], np.concatenate(acc[1]), acc[2])
                del pending[batch.tag]
                if on_shard is not None:
                    on_shard(batch.tag)
                crash_point("embed:after-shard")
            bar.update(batch.size)


@dataclasses.dataclass
class EmbeddedImages:
    """The readable images in listing order, one (N, dim) array per embedder, and what was skipped."""

    items: list[ImageItem]
    vectors: list[np.ndarray]
    skipped: list[tuple[str, str]]  # (path, reason)


def embed_items(items: Sequence[ImageItem], embedders: Sequence[OnnxEmbedder], *, batch_size: int = 64,
                progress: bool = True, desc: str = "embedding", workers: int | None = None) -> EmbeddedImages:
    """Decode every image once and embed it with each embedder (each with its own preprocessing, or its scales
    for a `MultiScaleEmbedder`), in memory.

    Unreadable files are skipped and returned with their reason; they get no vector.
    """
    if batch_size < 1:
        raise UserError(f"batch size must be at least 1, not {batch_size}")
    specs, positions = shared_specs(embedders)
    kept: list[ImageItem] = []
    blocks: list[list[np.ndarray]] = [[] for _ in embedders]
    skipped: list[tuple[str, str]] = []
    with progress_bar(len(items), desc, progress) as bar:
        for batch in decoded_batches(batch_jobs(0, len(items), batch_size), items, specs, workers=workers):
            kept.extend(items[r] for r in batch.rows)
            skipped.extend(batch.skipped)
            if batch.rows:
                for j, (embedder, mine) in enumerate(zip(embedders, positions)):
                    blocks[j].append(embed_prepared(embedder, [batch.arrays[p] for p in mine]))
            bar.update(batch.size)
    vectors = [np.concatenate(b) if b else np.zeros((0, e.dim), np.float32) for b, e in zip(blocks, embedders)]
    return EmbeddedImages(kept, vectors, skipped)
