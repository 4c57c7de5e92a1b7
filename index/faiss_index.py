"""faiss indexes described by a factory string, with stable ids, trained on a sample, GPU when faiss has one.

Every index is stored wrapped in `IndexIDMap2`, so ids are the database's own stable ids (never positions) and
survive additions and removals. The saved index is always a CPU index. Search parameters (`nprobe`, `efSearch`)
live in the manifest and are applied with `faiss.ParameterSpace` when the index is opened.
"""
from __future__ import annotations

import sys
from typing import Iterable, Mapping

import faiss
import numpy as np

from asymsearch.core.errors import UserError

MAX_TRAIN_VECTORS = 200_000  # training sample cap; faiss subsamples k-means further on its own
FACTORY_EXAMPLES = "e.g. 'Flat', 'IVF1024,Flat', 'IVF1024,PQ32', 'OPQ32,IVF1024,PQ32', 'HNSW32', 'SQfp16'"


def new_index(dim: int, factory: str) -> faiss.Index:
    """An empty inner-product index from a factory string, wrapped for stable ids; `UserError` naming a string
    faiss rejects."""
    try:
        inner = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:
        raise UserError(f"invalid faiss index factory {factory!r} for dimension {dim} ({FACTORY_EXAMPLES}): "
                        f"{faiss_reason(e)}") from None
    if isinstance(inner, faiss.IndexIDMap) or "IDMap" in factory:
        raise UserError(f"factory {factory!r}: leave out IDMap, every index is wrapped in IDMap2 for stable ids")
    return faiss.IndexIDMap2(inner)


def train_index(index: faiss.IndexIDMap2, sample: np.ndarray, factory: str) -> faiss.IndexIDMap2:
    """The wrapped index trained on `sample` (on all GPUs when faiss has them; the result is a CPU index)."""
    inner = faiss.downcast_index(index.index)
    if inner.is_trained:
        return index
    sample = np.ascontiguousarray(sample, dtype=np.float32)
    trained = None
    if faiss.get_num_gpus() > 0:  # untested here: no GPU on the development machine
        try:
            gpu = faiss.index_cpu_to_all_gpus(inner)
        except RuntimeError as e:  # e.g. HNSW or OPQ pre-transforms without a GPU implementation
            print(f"faiss cannot train {factory!r} on GPU ({faiss_reason(e)}); training on CPU", file=sys.stderr)
        else:
            _train(gpu, sample, factory)
            trained = faiss.index_gpu_to_cpu(gpu)
    if trained is None:
        _train(inner, sample, factory)
        return index
    return faiss.IndexIDMap2(trained)


def _train(index: faiss.Index, sample: np.ndarray, factory: str) -> None:
    try:
        index.train(sample)
    except RuntimeError as e:
        reason = faiss_reason(e)
        if "training points" in reason or "nx >=" in reason:
            raise UserError(f"too few vectors to train faiss index {factory!r}: {len(sample)} readable images "
                            f"({reason}); index more images or choose a smaller factory such as 'Flat'") from None
        raise UserError(f"faiss could not train index {factory!r} on {len(sample)} vectors: {reason}") from None


def sample_rows(total: int, cap: int = MAX_TRAIN_VECTORS, seed: int = 0) -> np.ndarray:
    """Sorted positions of the training sample among `total` vectors: all of them up to `cap`, else a fixed draw."""
    if total <= cap:
        return np.arange(total)
    return np.sort(np.random.default_rng(seed).choice(total, cap, replace=False))


def add_blocks(index: faiss.IndexIDMap2, blocks: Iterable[tuple[np.ndarray, np.ndarray]], factory: str) -> None:
    """Add (ids, vectors) blocks one at a time: the full set of raw vectors never has to be in memory at once."""
    for ids, vectors in blocks:
        if len(ids) == 0:
            continue
        try:
            index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32),
                               np.ascontiguousarray(ids, dtype=np.int64))
        except RuntimeError as e:
            raise UserError(f"faiss could not add vectors to index {factory!r}: {faiss_reason(e)}") from None


def apply_search_params(index: faiss.Index, params: Mapping[str, float], where: str = "") -> None:
    for name, value in params.items():
        try:
            faiss.ParameterSpace().set_index_parameter(index, name, float(value))
        except RuntimeError as e:
            raise UserError(f"search parameter {name}={value}{where} does not apply to this index: "
                            f"{faiss_reason(e)}") from None


def remove_ids(index: faiss.IndexIDMap2, ids: np.ndarray, factory: str) -> faiss.IndexIDMap2:
    """`index` without `ids`. Where faiss cannot remove in place (HNSW), the graph is rebuilt from the vectors it
    stores, with the same ids."""
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    try:
        removed = index.remove_ids(faiss.IDSelectorBatch(ids))
    except RuntimeError as e:
        if "not implemented" not in str(e):
            raise UserError(f"faiss could not remove ids from {factory!r}: {faiss_reason(e)}") from None
    else:
        if removed != len(ids):
            raise UserError(f"faiss removed {removed} of {len(ids)} ids from {factory!r}; the index is inconsistent "
                            f"with its metadata")
        return index
    all_ids = faiss.vector_to_array(index.id_map).astype(np.int64)
    vectors = index.index.reconstruct_n(0, index.ntotal)
    keep = ~np.isin(all_ids, ids)
    fresh = new_index(index.d, factory)
    fresh = train_index(fresh, vectors[keep][sample_rows(int(keep.sum()))], factory)
    add_blocks(fresh, [(all_ids[keep], vectors[keep])], factory)
    return fresh


def stored_ids(index: faiss.Index) -> np.ndarray:
    return faiss.vector_to_array(faiss.downcast_index(index).id_map).astype(np.int64)


def to_gpus(index: faiss.Index) -> faiss.Index:
    """The index on all GPUs (sharded across them) when faiss has GPUs and the type has a GPU version; else as is."""
    if faiss.get_num_gpus() == 0:
        return index
    try:  # untested here: no GPU on the development machine
        options = faiss.GpuMultipleClonerOptions()
        options.shard = True
        return faiss.index_cpu_to_all_gpus(index, co=options)
    except RuntimeError as e:
        print(f"searching on CPU: faiss has no GPU version of this index ({faiss_reason(e)})", file=sys.stderr)
        return index


def index_memory_bytes(index: faiss.Index) -> int:
    """Bytes the serialised index takes (what it holds in memory, to within its small headers)."""
    return int(faiss.serialize_index(index).nbytes)


def faiss_reason(e: Exception) -> str:
    """faiss errors read 'Error in <signature> at <file>:<line>: <reason>'; keep the reason."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else repr(e)
    if "failed: " in text:  # FAISS_THROW_IF_NOT_MSG: keep the message after the failed condition
        return text.split("failed: ", 1)[1]
    marker = text.find(": ", text.find(" at "))
    return text[marker + 2:] if " at " in text and marker != -1 else text
