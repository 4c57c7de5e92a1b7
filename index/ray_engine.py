"""Embedding on a Ray cluster with Ray Data: `asymsearch index build --engine ray --address ...`.

The `distributed` extra (`pip install 'asymsearch[distributed]'`, i.e. `ray[data]`); nothing else imports this
module, so the single-machine path never needs Ray.

Each unfinished shard of the build's `ShardStore` becomes one row of a Ray dataset; `map_batches` sends the rows to
a pool of actors, each holding one onnxruntime session of the teacher (one actor per GPU when the cluster has
GPUs, else one per `cpus_per_actor` CPUs). An actor decodes the shard's images (the paths must be readable on every
node: shared storage) with the same pipeline as a local build, embeds them at the same batch boundaries and
returns the vectors; the driver commits each shard as it arrives. The merge into one index is the local code:
train once on a sample of the shards, then add shard by shard (`asymsearch.index.build.index_from_shards`). An
interrupted Ray build resumes like a local one, from the shards already committed.

`asymsearch index transform --engine ray` (`map_blocks_with_ray`): the stored vectors, read back from faiss on the
driver block by block, go to a pool of actors that each hold the vector map and apply it to whole blocks; the
driver adds the mapped blocks in their original order to the new index, a window of blocks at a time.
"""
from __future__ import annotations

import io
import json
import os
from pathlib import Path
from itertools import islice
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from asymsearch.core.data import ImageItem
from asymsearch.core.errors import UserError
from asymsearch.index.shards import ShardStore

try:
    import ray
except ImportError:  # pragma: no cover - depends on the installation
    ray = None


class ShardEmbedder:
    """A Ray Data actor: one teacher session, embeds whole shards."""

    def __init__(self, teacher: str, batch_size: int, threads: int) -> None:
        from asymsearch.core.ort import OnnxEmbedder
        self.embedder = OnnxEmbedder(teacher, intra_op_threads=threads)
        self.batch_size = batch_size
        self.threads = threads

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        from asymsearch.index.pipeline import batch_jobs, decoded_batches
        out: dict[str, list] = {"shard": [], "rows": [], "vectors": [], "skipped": []}
        for shard, start, paths, labels in zip(batch["shard"], batch["start"], batch["paths"], batch["labels"]):
            items = [ImageItem(str(p), str(label)) for p, label in zip(json.loads(paths), json.loads(labels))]
            rows, blocks, skipped = [], [], []
            jobs = batch_jobs(0, len(items), self.batch_size)
            for b in decoded_batches(jobs, items, [self.embedder.manifest.preprocessing], workers=self.threads):
                rows.extend(int(start) + r for r in b.rows)
                blocks.append(self.embedder.embed_arrays(b.arrays[0]))
                skipped.extend(b.skipped)
            vectors = np.concatenate(blocks) if blocks else np.zeros((0, self.embedder.dim), np.float32)
            buf = io.BytesIO()
            np.save(buf, vectors.astype(np.float32))
            out["shard"].append(int(shard))
            out["rows"].append(json.dumps(rows))
            out["vectors"].append(buf.getvalue())
            out["skipped"].append(json.dumps(skipped))
        return out



def _actor_pool(ray, actors: int | None, cpus_per_actor: int) -> tuple[int, dict[str, int]]:
    """(how many embedding actors, the resources of each): one per GPU when the cluster has GPUs, else as many as
    the cluster's CPUs hold at `cpus_per_actor` each; `actors` overrides the count."""
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    if gpus:  # untested here: no GPU on the development machine
        return actors or gpus, {"num_gpus": 1, "num_cpus": cpus_per_actor}
    return actors or max(1, int(resources.get("CPU", 1)) // cpus_per_actor), {"num_cpus": cpus_per_actor}

def embed_with_ray(items: Sequence[ImageItem], teacher: str | os.PathLike, store: ShardStore, *, batch_size: int,
                   address: str | None = None, progress: bool = True, cpus_per_actor: int = 1,
                   actors: int | None = None) -> None:
    """Embed the unfinished shards of `store` on the Ray cluster at `address` (None: the running Ray instance of
    this process, or a new local one) and commit them to `store`."""
    if ray is None:
        raise UserError("--engine ray needs Ray Data: pip install 'ray[data]' (the `distributed` extra)")
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    missing = store.missing()
    if not missing:
        return
    rows = []
    for shard in missing:
        start, stop = store.shard_range(shard)
        rows.append({"shard": shard, "start": start,
                     "paths": json.dumps([items[i].path for i in range(start, stop)]),
                     "labels": json.dumps([items[i].label for i in range(start, stop)])})
    pool, per_actor = _actor_pool(ray, actors, cpus_per_actor)
    ds = ray.data.from_items(rows, override_num_blocks=len(rows)).map_batches(
        ShardEmbedder, fn_constructor_kwargs={"teacher": str(Path(teacher).resolve()), "batch_size": batch_size,
                                              "threads": cpus_per_actor},
        batch_size=1, concurrency=min(pool, len(rows)), **per_actor)
    from asymsearch.index.pipeline import progress_bar
    done = store.count - sum(b - a for a, b in map(store.shard_range, missing))
    with progress_bar(store.count, "embedding database on Ray", progress, initial=done) as bar:
        for row in ds.iter_rows():
            shard = int(row["shard"])
            vectors = np.load(io.BytesIO(row["vectors"]))
            skipped: list[Any] = [tuple(s) for s in json.loads(row["skipped"])]
            if not np.isfinite(vectors).all():
                raise UserError(f"the teacher {teacher} produced non-finite embeddings; check the exported model")
            store.write(shard, json.loads(row["rows"]), vectors, skipped)
            start, stop = store.shard_range(shard)
            bar.update(stop - start)


class BlockMapper:
    """A Ray Data actor: one vector map (`index.transform.VectorMap`), applied to whole blocks of stored vectors."""

    def __init__(self, vector_map: Any) -> None:
        self.map = vector_map

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        out: dict[str, list] = {"block": [], "vectors": []}
        for block, data in zip(batch["block"], batch["vectors"]):
            buf = io.BytesIO()
            np.save(buf, self.map(np.load(io.BytesIO(data))))
            out["block"].append(int(block))
            out["vectors"].append(buf.getvalue())
        return out


def map_blocks_with_ray(blocks: Iterable[tuple[np.ndarray, np.ndarray]], vector_map: Any, *,
                        address: str | None = None, window: int = 8, cpus_per_actor: int = 1,
                        actors: int | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(ids, mapped vectors) for each (ids, vectors) block of `blocks`, in their order, the map applied by Ray Data
    actors on the cluster at `address` (None: this process's Ray, or a new local one). `window` blocks are in
    flight at a time, so the driver holds at most that many beside the index it reads."""
    if ray is None:
        raise UserError("--engine ray needs Ray Data: pip install 'ray[data]' (the `distributed` extra)")
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    pool, per_actor = _actor_pool(ray, actors, cpus_per_actor)
    it = iter(blocks)
    while chunk := list(islice(it, max(1, window))):
        rows = []
        for i, (_, vectors) in enumerate(chunk):
            buf = io.BytesIO()
            np.save(buf, np.ascontiguousarray(vectors, dtype=np.float32))
            rows.append({"block": i, "vectors": buf.getvalue()})
        ds = ray.data.from_items(rows, override_num_blocks=len(rows)).map_batches(
            BlockMapper, fn_constructor_kwargs={"vector_map": vector_map}, batch_size=1,
            concurrency=min(pool, len(rows)), **per_actor)
        del rows
        done: dict[int, np.ndarray] = {}
        following = 0
        for row in ds.iter_rows():
            mapped = np.load(io.BytesIO(row["vectors"]))
            if not np.isfinite(mapped).all():
                raise UserError("the vector map produced non-finite vectors; check the map")
            done[int(row["block"])] = mapped
            while following in done:  # the blocks leave in their order, whatever order the actors finish in
                yield chunk[following][0], done.pop(following)
                following += 1
        if following != len(chunk):
            raise RuntimeError(f"Ray returned {following} of {len(chunk)} mapped blocks")


class MilvusShardWriter(ShardEmbedder):
    """A Ray Data actor for a Milvus build: embeds whole shards like `ShardEmbedder` and inserts the rows into the
    collection itself, so only counts and skipped files travel back to the driver."""

    def __init__(self, teacher: str, batch_size: int, threads: int, uri: str, collection: str) -> None:
        super().__init__(teacher, batch_size, threads)
        from pymilvus import MilvusClient
        self.client = MilvusClient(uri=uri, timeout=60)
        self.collection = collection

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        embedded = super().__call__(batch)
        out: dict[str, list] = {"shard": [], "count": [], "skipped": []}
        for i, shard in enumerate(embedded["shard"]):
            rows = json.loads(embedded["rows"][i])
            vectors = np.load(io.BytesIO(embedded["vectors"][i]))
            if not np.isfinite(vectors).all():
                raise UserError("the teacher produced non-finite embeddings; check the exported model")
            start = int(batch["start"][i])
            paths, labels = json.loads(batch["paths"][i]), json.loads(batch["labels"][i])
            extras = json.loads(batch["extras"][i])
            from asymsearch.index.milvus import row_of
            records = [row_of(r, v, paths[r - start], labels[r - start], extras[r - start])
                       for r, v in zip(rows, vectors)]
            for lo in range(0, len(records), 4096):
                self.client.insert(self.collection, records[lo:lo + 4096])
            out["shard"].append(int(shard))
            out["count"].append(len(records))
            out["skipped"].append(embedded["skipped"][i])
        return out


def embed_into_milvus(items: Sequence[ImageItem], teacher: str | os.PathLike, location: Any, collection: str,
                      columns: dict, *, batch_size: int, shard_size: int, address: str | None = None,
                      progress: bool = True, cpus_per_actor: int = 1, actors: int | None = None) -> list:
    """Embed `items` on the Ray cluster at `address` in shards of `shard_size`, each actor inserting its rows
    (id = listing position) straight into `collection` at `location` (an `asymsearch.index.milvus.MilvusLocation`);
    the driver gathers no vector. A Milvus Lite file is served by this process, so its workers must run on this
    machine (a local Ray). Returns the skipped (path, reason) pairs."""
    if ray is None:
        raise UserError("--engine ray needs Ray Data: pip install 'ray[data]' (the `distributed` extra)")
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    uri = location.uri
    if location.lite:  # the driver's in-process Milvus Lite server, reachable over 127.0.0.1
        from milvus_lite.server_manager import server_manager_instance
        uri = server_manager_instance.start_and_get_uri(location.uri)
    rows = []
    for shard, start in enumerate(range(0, len(items), shard_size)):
        chunk = items[start:start + shard_size]
        rows.append({"shard": shard, "start": start, "paths": json.dumps([it.path for it in chunk]),
                     "labels": json.dumps([it.label for it in chunk]),
                     "extras": json.dumps([columns.get(it.path) for it in chunk])})
    pool, per_actor = _actor_pool(ray, actors, cpus_per_actor)
    ds = ray.data.from_items(rows, override_num_blocks=len(rows)).map_batches(
        MilvusShardWriter, fn_constructor_kwargs={"teacher": str(Path(teacher).resolve()), "batch_size": batch_size,
                                                  "threads": cpus_per_actor, "uri": uri, "collection": collection},
        batch_size=1, concurrency=min(pool, len(rows)), **per_actor)
    from asymsearch.index.pipeline import progress_bar
    skipped: list = []
    with progress_bar(len(items), "embedding database into Milvus on Ray", progress) as bar:
        for row in ds.iter_rows():
            skipped.extend(tuple(s) for s in json.loads(row["skipped"]))
            shard = int(row["shard"])
            bar.update(min(len(items), (shard + 1) * shard_size) - shard * shard_size)
    return skipped
