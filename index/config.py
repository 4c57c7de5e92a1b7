"""The configs of `index build` and `index add`: plain dataclasses, the schemas of `asymsearch.core.config`.

Importable without faiss or onnxruntime, so the command line builds its options (and their defaults) from them
cheaply. Every field is a key (`factory=HNSW32`, `search_params.efSearch=128`) and most have a flag.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, Optional

DEFAULT_SHARD_SIZE = 4096  # images per embedding shard: the most work an interruption can lose
# faiss threads per search in the server: `serve --search-threads` and `server.batching.BatchingConfig` default to
# this (idle OpenMP workers spin, see server.batching); `index build --auto` times its candidates with it
SERVING_SEARCH_THREADS = 1


@dataclasses.dataclass
class IndexBuildConfig:
    teacher: str  # the teacher's .onnx (with its .json)
    images: str  # ROOT/<class>/<image>
    out: str  # index folder, or a versioned root to publish a rebuilt version into
    factory: str = "Flat"  # faiss index factory string
    search_params: Dict[str, Any] = dataclasses.field(default_factory=dict)  # e.g. {nprobe: 16}
    auto: bool = False  # choose factory and search params for the data and the budget below
    max_memory: str = "4G"  # --auto: memory the index may take
    target_ms: float = 5.0  # --auto: mean single-query latency target, ms
    target_recall: float = 0.95  # --auto: recall@10 target against exact search
    auto_queries: Optional[str] = None  # --auto: held-out query images, embedded by `student`, to tune on
    student: Optional[str] = None  # --auto: the student .onnx that embeds auto_queries (of this teacher)
    auto_query_vectors: Optional[str] = None  # --auto: or the student's query vectors, a (count, dim) .npy
    search_threads: int = SERVING_SEARCH_THREADS  # --auto: faiss threads the searches are timed with
    classes: str = "all"  # core.data.select_classes
    metadata: Optional[str] = None  # CSV with a 'path' column
    batch_size: int = 64  # images per inference batch
    shard_size: int = DEFAULT_SHARD_SIZE
    workers: Optional[int] = None  # image decoding threads; None: CPU count, at most 8
    on_disk: bool = False  # IVF only: inverted lists in index.ivfdata on disk
    multiscale: bool = False  # embed at scales 1, 1/sqrt(2), 1/2 and average
    flip: bool = False  # also embed each image mirrored and average
    resume: bool = False  # continue an interrupted build from its shards
    versioned: bool = False  # write a versioned root (CURRENT + versions/)
    keep: Optional[int] = None  # versioned: versions kept (None: all)
    engine: str = "local"  # local | ray
    address: Optional[str] = None  # engine ray: the cluster address (None: a local Ray)
    overwrite: bool = False  # replace an existing index folder (a versioned root gets a new version)


@dataclasses.dataclass
class IndexAddConfig:
    index: str  # index root or plain index folder
    teacher: str  # the teacher that embedded the index
    images: str  # folder of new images (label: the parent folder's name)
    metadata: Optional[str] = None
    keep: Optional[int] = None
    batch_size: int = 64
    workers: Optional[int] = None
