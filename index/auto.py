"""Pick a faiss index for the data size and a memory / latency budget, as autofaiss does, and measure it.

Candidates, best quality first: exact `Flat`; `HNSW32`; `IVF{n},Flat`; `IVF{n},SQ8`; `IVF{n},PQ{m}` for shrinking
m. Those whose estimated memory exceeds the budget are left out. Each remaining candidate, in order, is built on
all vectors, and its search parameter (nprobe or efSearch) is swept from cheap to expensive; the first candidate
and setting that reaches the recall target within the latency target wins. Recall is recall@10 of held-out
queries (a fixed random sample of the database vectors, each with its own id left out of both rankings, so a
query never finds itself) against exact inner-product search over the same vectors; latency is the median of
single-query searches on this machine. The winner is returned built, ready to save. When nothing meets both
targets, the most accurate setting within the latency target is taken (or the fastest, if none is within it),
and the report says so.
"""
from __future__ import annotations

import dataclasses
import math
import re
import sys
import time
from typing import Any

import faiss
import numpy as np

from asymsearch.core.errors import UserError
from asymsearch.index.faiss_index import add_blocks, apply_search_params, new_index, sample_rows, train_index

K = 10
MAX_QUERIES = 500
TIMED_QUERIES = 200
IDMAP_BYTES = 48  # per vector: the id (8) and IDMap2's reverse map entry


@dataclasses.dataclass(frozen=True)
class Budget:
    max_memory: int  # bytes the index may take in memory
    target_ms: float  # median single-query search latency
    target_recall: float = 0.95  # recall@10 against exact search


@dataclasses.dataclass
class Choice:
    factory: str
    search_params: dict[str, float]
    report: dict[str, Any]
    index: faiss.Index | None = None  # the chosen index, holding every vector with ids 0..N-1


def parse_size(text: str) -> int:
    """'4G', '512M', '1.5g', '1000000' -> bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?\s*", str(text).lower())
    if not m:
        raise UserError(f"cannot read memory size {text!r}; write e.g. 4G, 512M or a number of bytes")
    return int(float(m.group(1)) * 1024 ** "_kmgt".index(m.group(2) or "_"))


def nlist_for(n: int) -> int:
    """About 4 sqrt(n) lists (a power of two), at least 39 training vectors per list."""
    if n < 39 * 2:
        return 1
    return int(max(1, min(2 ** round(math.log2(4 * math.sqrt(n))), n // 39)))


def candidates(n: int, dim: int) -> list[tuple[str, int]]:
    """(factory, estimated bytes), best quality first."""
    nlist = nlist_for(n)
    out = [("Flat", n * (4 * dim + IDMAP_BYTES)),
           ("HNSW32", n * (4 * dim + 32 * 2 * 4 + 40 + IDMAP_BYTES)),
           (f"IVF{nlist},Flat", n * (4 * dim + 8 + IDMAP_BYTES) + nlist * dim * 4),
           (f"IVF{nlist},SQ8", n * (dim + 8 + IDMAP_BYTES) + nlist * dim * 4)]
    for m in (dim // 2, dim // 4, dim // 8, dim // 16, dim // 32):
        if m >= 1 and dim % m == 0 and n >= 256 * 39:  # 8-bit PQ needs 256 centroids per sub-quantizer
            out.append((f"IVF{nlist},PQ{m}", n * (m + 8 + IDMAP_BYTES) + nlist * dim * 4 + 256 * dim * 4))
    return out


def sweep(factory: str, nlist: int) -> list[dict[str, float]]:
    if factory.startswith("HNSW"):
        return [{"efSearch": e} for e in (16, 32, 64, 128, 256, 512)]
    if factory.startswith("IVF"):
        return [{"nprobe": p} for p in sorted({min(2 ** i, nlist) for i in range(0, 16)})]
    return [{}]


def exact_neighbours(vectors: np.ndarray, queries: np.ndarray, query_ids: np.ndarray, k: int) -> np.ndarray:
    flat = faiss.IndexFlatIP(vectors.shape[1])
    flat.add(vectors)
    _, ids = flat.search(queries, k + 1)
    return _drop_self(ids, query_ids, k)


def _drop_self(ids: np.ndarray, query_ids: np.ndarray, k: int) -> np.ndarray:
    out = np.full((len(ids), k), -1, np.int64)
    for i, row in enumerate(ids):
        row = row[(row != query_ids[i]) & (row >= 0)][:k]
        out[i, :len(row)] = row
    return out


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    k = truth.shape[1]
    return float(np.mean([len(set(a[a >= 0]) & set(b)) / k for a, b in zip(found, truth)]))


def measure(index: faiss.Index, queries: np.ndarray, query_ids: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """(recall@k against `truth`, median ms of one single-query search: robust to a busy machine's outliers)."""
    k = truth.shape[1]
    _, ids = index.search(queries, k + 1)
    recall = recall_at_k(_drop_self(ids, query_ids, k), truth)
    timed = queries[:TIMED_QUERIES]
    index.search(timed[:1], k + 1)  # warm up
    times = []
    for q in timed:
        start = time.perf_counter()
        index.search(q[None], k + 1)
        times.append(time.perf_counter() - start)
    return recall, float(np.median(times)) * 1e3


def choose_index(vectors: np.ndarray, budget: Budget, *, progress: bool = True, seed: int = 0) -> Choice:
    """The index for `vectors` (N, dim), ids 0..N-1, within `budget`; see the module docstring."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    n, dim = vectors.shape
    if n < 2:
        raise UserError(f"--auto needs at least 2 vectors to measure recall, got {n}")
    k = min(K, n - 1)
    rng = np.random.default_rng(seed)
    q = min(MAX_QUERIES, max(1, n // 10))
    held = np.sort(rng.choice(n, q, replace=False))
    queries = vectors[held]
    truth = exact_neighbours(vectors, queries, held, k)  # over ALL vectors: the final index holds them all
    tried: list[dict[str, Any]] = []
    best: tuple | None = None
    winner: tuple | None = None
    for factory, estimate in candidates(n, dim):
        entry: dict[str, Any] = {"factory": factory, "memory_bytes": int(estimate)}
        tried.append(entry)
        if estimate > budget.max_memory:
            entry["skipped"] = "over the memory budget"
            continue
        start = time.perf_counter()
        index = new_index(dim, factory)
        index = train_index(index, vectors[sample_rows(n)], factory)  # as the build without --auto trains it
        add_blocks(index, [(np.arange(n, dtype=np.int64), vectors)], factory)
        entry["build_seconds"] = round(time.perf_counter() - start, 3)
        entry["settings"] = []
        for params in sweep(factory, nlist_for(n)):
            apply_search_params(index, params)
            recall, ms = measure(index, queries, held, truth)
            entry["settings"].append({"search_params": params, "recall@10": round(recall, 4), "ms": round(ms, 4)})
            if progress:
                print(f"auto: {factory} {params or ''} recall@{k} {recall:.3f} {ms:.3f} ms/query", file=sys.stderr)
            if ms <= budget.target_ms and (best is None or recall > best[2]):
                best = (factory, params, recall, ms, index)
            if recall >= budget.target_recall and ms <= budget.target_ms:
                winner = (factory, params, recall, ms, index)
                break
            if ms > budget.target_ms:
                break  # a larger setting is only slower
        if winner is not None:
            break
    met = winner is not None
    if winner is None:
        if best is None:
            raise UserError(f"no index fits the budget (memory {budget.max_memory} bytes, {budget.target_ms} ms per "
                            f"query) for {n} vectors of dimension {dim}; raise --max-memory or --target-ms")
        winner = best
    factory, params, recall, ms, index = winner
    apply_search_params(index, params)
    report = {"chosen": factory, "search_params": params, "recall@10": round(recall, 4), "ms_per_query": round(ms, 4),
              "targets_met": met, "queries": int(q), "k": k,
              "recall_reference": "exact inner-product search over all vectors; each query is a database vector "
                                  "whose own id is left out of both rankings",
              "budget": dataclasses.asdict(budget), "candidates": tried}
    return Choice(factory, dict(params), report, index)
