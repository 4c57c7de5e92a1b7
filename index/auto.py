"""Pick a faiss index for the data size and a memory / latency budget, as autofaiss does, and measure it.

Candidates, best quality first: exact `Flat`; `HNSW32`; `IVF{n},Flat`; `IVF{n},SQ8`; `IVF{n},PQ{m}` for shrinking
m. Those whose estimated memory exceeds the budget are left out. Each remaining candidate, in order, is built on
all vectors, and its search parameter (nprobe or efSearch) is swept from cheap to expensive; the first candidate
and setting that reaches the recall target within the latency target wins. The winner is returned built, ready to
save. When nothing meets both targets, the most accurate setting within the latency target is taken (or the
fastest, if none is within it), and the report says so.

Two kinds of queries are measured, and the report records the recall@10 of both for every setting:

- **student queries** (`Queries`): what the server will really search with, the student's embeddings of held-out
  query images (or query vectors given as a file), none of them in the database. When they are given, they decide:
  recall and latency are theirs. In an asymmetric system they come from another distribution than the database
  (the student only approximates the teacher), and ANN settings tuned on database vectors can miss badly on them:
  an HNSW32 whose efSearch 16 had recall@10 0.955 on database vectors had 0.603 on real student queries.
- **database vectors**: a fixed random sample of the database (up to `MAX_QUERIES`), each with its own id left out
  of both rankings, so a query never finds itself. When no student queries are given, these decide, and the
  report says so (`tuned_on`, `warning`).

Recall is recall@10 against exact inner-product search over all vectors (the final index holds them all); latency
is the median of single-query searches on this machine, run with the server's faiss thread count (`threads`,
`SERVING_SEARCH_THREADS`, the default of `serve --search-threads`), as is the exact search it is compared with
(`exact_ms_per_query`, `speedup_vs_exact`). Building and training use faiss's own threads.

Memory. The database is a `VectorSource`: an array, an .npy file read block by block, or a build's shards. It is
never copied whole: the exact reference is the `Flat` candidate itself (built once, block by block, its storage
reserved up front so it never grows by doubling), which also gives the exact neighbours of every tuning query and
the exact single-query time; it is freed before the next candidate is built, and each candidate is freed before
the one after it. So the peak is about one candidate index, plus the training sample of an IVF candidate and the
queries: at 1M x 1280 float32, HNSW32's 5.5 GB, where holding the vectors, an exact copy and the candidate took
about 16 GB. When `Flat` is over the memory budget the exact neighbours are computed block by block (faiss.knn
and a running top-k) and the exact time is measured on one block and scaled by n / block rows (exact search is
linear in n; the report says so under `exact_timing`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import re
import sys
import time
from typing import Any, Callable, Iterable, Iterator

import faiss
import numpy as np

from asymsearch.core.errors import UserError
from asymsearch.index.config import SERVING_SEARCH_THREADS
from asymsearch.index.faiss_index import add_blocks, apply_search_params, new_index, sample_rows, train_index

K = 10
BLOCK_ROWS = 65_536  # database rows per block when the vectors are streamed (320 MB at 1280 dimensions)
MAX_QUERIES = 500
TIMED_QUERIES = 200
IDMAP_BYTES = 48  # per vector: the id (8) and IDMap2's reverse map entry
DATABASE_WARNING = ("tuned with database vectors as queries: the student's queries come from another distribution "
                    "and may need a larger search setting for this recall; give held-out query images and the "
                    "student (--auto-queries DIR --student S.onnx) or query vectors (--auto-query-vectors F.npy)")


@dataclasses.dataclass(frozen=True)
class Budget:
    max_memory: int  # bytes the index may take in memory
    target_ms: float  # median single-query search latency
    target_recall: float = 0.95  # recall@10 against exact search


@dataclasses.dataclass(frozen=True)
class Queries:
    """The queries the server will search with (the student's embeddings of held-out images), not in the database."""

    vectors: np.ndarray  # (Q, dim) float32
    source: str  # where they came from, for the report


class VectorSource:
    """The database vectors, ids 0..n-1, as blocks of rows in order: `blocks()` yields (ids, vectors) and may be
    called again; `gather(positions)` reads the rows at sorted positions in one pass."""

    def __init__(self, n: int, dim: int, blocks: Callable[[], Iterable[np.ndarray]], what: str) -> None:
        self.n, self.dim, self.what = int(n), int(dim), what
        self._blocks = blocks

    @classmethod
    def of_array(cls, vectors: np.ndarray) -> "VectorSource":
        """An array in memory: one block, the array itself (no copy)."""
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.ndim != 2:
            raise UserError(f"database vectors must be a (count, dim) array, not shape {vectors.shape}")
        return cls(len(vectors), vectors.shape[1], lambda: iter((vectors,)), "an array")

    @classmethod
    def of_npy(cls, path: str | os.PathLike, block_rows: int = BLOCK_ROWS) -> "VectorSource":
        """A (count, dim) float32 .npy read with plain file reads, `block_rows` at a time (no memory map: none of
        its pages stays in this process)."""
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            shape, fortran, dtype = (np.lib.format.read_array_header_1_0(f) if version == (1, 0)
                                     else np.lib.format.read_array_header_2_0(f))
            offset = f.tell()
        if len(shape) != 2 or fortran or dtype != np.float32:
            raise UserError(f"{path}: database vectors must be a C-order float32 (count, dim) .npy, not {dtype} "
                            f"{shape}{' (Fortran order)' if fortran else ''}")
        n, dim = shape

        def blocks() -> Iterator[np.ndarray]:
            with open(path, "rb") as f:
                f.seek(offset)
                for start in range(0, n, block_rows):
                    rows = min(block_rows, n - start)
                    block = np.fromfile(f, dtype=np.float32, count=rows * dim)
                    if len(block) != rows * dim:
                        raise UserError(f"{path} ends early: {start + len(block) // dim} of {n} rows")
                    yield block.reshape(rows, dim)
        return cls(n, dim, blocks, str(path))

    @classmethod
    def of_shards(cls, store: Any) -> "VectorSource":
        """The kept vectors of a build's `ShardStore`, shard by shard."""
        n = sum(len(rows) for rows, _, _ in store.iter_shards())
        return cls(n, store.dim, lambda: (v for _, v, _ in store.iter_shards(mmap=False)), "the build's shards")

    def blocks(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        offset = 0
        for block in self._blocks():
            block = np.ascontiguousarray(block, dtype=np.float32)
            if block.ndim != 2 or block.shape[1] != self.dim:
                raise UserError(f"database vectors from {self.what}: a block of shape {block.shape}, not (rows, "
                                f"{self.dim})")
            yield np.arange(offset, offset + len(block), dtype=np.int64), block
            offset += len(block)
        if offset != self.n:
            raise UserError(f"database vectors from {self.what}: {offset} rows read, {self.n} expected")

    def gather(self, positions: np.ndarray) -> np.ndarray:
        positions = np.asarray(positions, np.int64)
        out = []
        for ids, block in self.blocks():
            lo, hi = np.searchsorted(positions, [ids[0], ids[-1] + 1]) if len(ids) else (0, 0)
            if hi > lo:
                out.append(block[positions[lo:hi] - ids[0]].copy())
        return np.concatenate(out) if out else np.zeros((0, self.dim), np.float32)


def _reserve(index: faiss.Index, n: int) -> None:
    """Reserve room for `n` vectors in the flat storage of `index` (an IDMap2 around Flat or HNSW...,Flat), so
    adding block by block never reallocates it by doubling (a copy of the old storage beside a twice larger one)."""
    inner = faiss.downcast_index(index.index if isinstance(index, faiss.IndexIDMap2) else index)
    storage = faiss.downcast_index(inner.storage) if isinstance(inner, faiss.IndexHNSW) else inner
    if isinstance(storage, faiss.IndexFlatCodes) and storage.ntotal == 0:
        storage.codes.resize(n * storage.code_size)  # capacity stays when the size goes back to 0
        storage.codes.resize(0)


def build_candidate(source: VectorSource, factory: str) -> faiss.Index:
    """The index `factory` over every vector of `source` (ids 0..n-1): trained on `sample_rows` as a build without
    --auto trains it (read only when the index needs training), storage reserved, then added block by block."""
    index = new_index(source.dim, factory)
    if not faiss.downcast_index(index.index).is_trained:
        index = train_index(index, source.gather(sample_rows(source.n)), factory)
    _reserve(index, source.n)
    add_blocks(index, source.blocks(), factory)
    return index


def streamed_neighbours(source: VectorSource, queries: np.ndarray, k: int) -> np.ndarray:
    """Exact top-`k` inner-product ids of `queries` over `source`, block by block with a running top-k."""
    heap = faiss.ResultHeap(len(queries), k, keep_max=True)
    for ids, block in source.blocks():
        d, i = faiss.knn(queries, block, min(k, len(block)), metric=faiss.METRIC_INNER_PRODUCT)
        if i.shape[1] < k:
            d = np.pad(d, ((0, 0), (0, k - i.shape[1])), constant_values=-np.inf)
            i = np.pad(i, ((0, 0), (0, k - i.shape[1])), constant_values=-1)
        heap.add_result(np.ascontiguousarray(d, np.float32), np.where(i >= 0, i + ids[0], -1).astype(np.int64))
    heap.finalize()
    return heap.I


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
        return [{"efSearch": e} for e in (16, 32, 64, 128, 256, 512, 1024)]
    if factory.startswith("IVF"):
        return [{"nprobe": p} for p in sorted({min(2 ** i, nlist) for i in range(0, 16)})]
    return [{}]


@contextlib.contextmanager
def omp_threads(n: int) -> Iterator[int]:
    """faiss's OpenMP threads set to `n` in this thread (0: faiss's default, all cores) for the block, as the
    server's search batcher sets them (`server.batching`); restored afterwards. Yields the count in effect."""
    before = faiss.omp_get_max_threads()
    if n > 0:
        faiss.omp_set_num_threads(n)
    try:
        yield faiss.omp_get_max_threads()
    finally:
        faiss.omp_set_num_threads(before)


def check_queries(queries: np.ndarray, dim: int, source: str) -> np.ndarray:
    """(Q, dim) finite float32 vectors, else `UserError` naming `source` and the rule."""
    q = np.asarray(queries)
    if q.ndim != 2 or q.shape[0] == 0:
        raise UserError(f"query vectors {source} must be a non-empty (count, {dim}) array, not shape {q.shape}")
    if q.shape[1] != dim:
        raise UserError(f"query vectors {source} have dimension {q.shape[1]}, the database {dim}: they must come "
                        f"from a student of the database's teacher")
    if not np.issubdtype(q.dtype, np.floating) or not np.isfinite(q).all():
        raise UserError(f"query vectors {source} must be finite floating-point numbers")
    return np.ascontiguousarray(q, dtype=np.float32)


def exact_neighbours(vectors: np.ndarray | VectorSource | None, queries: np.ndarray, query_ids: np.ndarray | None,
                     k: int, flat: faiss.Index | None = None) -> np.ndarray:
    """Exact top-`k` ids of `queries` over `vectors` (an array, or a `VectorSource` read block by block), or with
    `flat`, an exact index over them; with `query_ids` (database vectors as queries) each query's own id is left
    out."""
    kk = k + (query_ids is not None)
    if flat is not None:
        ids = flat.search(queries, kk)[1]
    elif isinstance(vectors, VectorSource):
        ids = streamed_neighbours(vectors, queries, kk)
    else:
        flat = faiss.IndexFlatIP(vectors.shape[1])
        flat.add(vectors)
        ids = flat.search(queries, kk)[1]
    return _drop_self(ids, query_ids, k)


def _drop_self(ids: np.ndarray, query_ids: np.ndarray | None, k: int) -> np.ndarray:
    out = np.full((len(ids), k), -1, np.int64)
    for i, row in enumerate(ids):
        row = row[(row >= 0) & ((row != query_ids[i]) if query_ids is not None else True)][:k]
        out[i, :len(row)] = row
    return out


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    k = truth.shape[1]
    return float(np.mean([len(set(a[a >= 0]) & set(b)) / k for a, b in zip(found, truth)]))


def search_recall(index: faiss.Index, queries: np.ndarray, query_ids: np.ndarray | None, truth: np.ndarray) -> float:
    """Recall@k of `index` on `queries` against `truth` (`query_ids`: database queries, their own ids left out)."""
    k = truth.shape[1]
    _, ids = index.search(queries, k + (query_ids is not None))
    return recall_at_k(_drop_self(ids, query_ids, k), truth)


def single_query_ms(index: faiss.Index, queries: np.ndarray, k: int) -> float:
    """Median ms of one single-query search (robust to a busy machine's outliers), over TIMED_QUERIES queries."""
    timed = queries[:TIMED_QUERIES]
    index.search(timed[:1], k)  # warm up
    times = []
    for q in timed:
        start = time.perf_counter()
        index.search(q[None], k)
        times.append(time.perf_counter() - start)
    return float(np.median(times)) * 1e3


def measure(index: faiss.Index, queries: np.ndarray, query_ids: np.ndarray | None,
            truth: np.ndarray) -> tuple[float, float]:
    """(recall@k against `truth`, median ms of one single-query search)."""
    return (search_recall(index, queries, query_ids, truth),
            single_query_ms(index, queries, truth.shape[1] + (query_ids is not None)))


def choose_index(vectors: np.ndarray | VectorSource, budget: Budget, *, queries: Queries | None = None,
                 threads: int = SERVING_SEARCH_THREADS, progress: bool = True, seed: int = 0) -> Choice:
    """The index for `vectors` (N, dim) (an array or a `VectorSource`), ids 0..N-1, within `budget`, tuned on
    `queries` when given (else on database vectors); searches timed with `threads` faiss threads. See the module
    docstring (also for memory)."""
    source = vectors if isinstance(vectors, VectorSource) else VectorSource.of_array(vectors)
    n, dim = source.n, source.dim
    if n < 2:
        raise UserError(f"--auto needs at least 2 vectors to measure recall, got {n}")
    if threads < 0:
        raise UserError(f"search threads must be 0 (faiss's default) or more, not {threads}")
    k = min(K, n - 1)
    rng = np.random.default_rng(seed)
    q = min(MAX_QUERIES, max(1, n // 10))
    held = np.sort(rng.choice(n, q, replace=False))
    db_queries = source.gather(held)
    student = None
    if queries is not None:
        sq = check_queries(queries.vectors, dim, queries.source)
        if len(sq) > MAX_QUERIES:  # a fixed sample, in order
            sq = sq[np.sort(np.random.default_rng(seed).choice(len(sq), MAX_QUERIES, replace=False))]
        student = sq
    deciding = student if student is not None else db_queries
    todo = candidates(n, dim)
    # the reference: exact search over ALL vectors (the final index holds them all), which is the Flat candidate
    exact, exact_seconds = None, None
    if todo[0][1] <= budget.max_memory:
        start = time.perf_counter()
        exact = build_candidate(source, "Flat")
        exact_seconds = round(time.perf_counter() - start, 3)
        db_truth = exact_neighbours(None, db_queries, held, k, exact)
        st_truth = exact_neighbours(None, student, None, k, exact) if student is not None else None
        with omp_threads(threads) as used:
            exact_ms = single_query_ms(exact, deciding, k)
        exact_timing = f"measured: single-query searches of an exact index over all {n} vectors"
    else:
        db_truth = exact_neighbours(source, db_queries, held, k)
        st_truth = exact_neighbours(source, student, None, k) if student is not None else None
        first = next(iter(source.blocks()))[1]
        flat = faiss.IndexFlatIP(dim)
        flat.add(first)
        with omp_threads(threads) as used:
            exact_ms = single_query_ms(flat, deciding, k) * n / len(first)
        exact_timing = (f"estimated: Flat is over the memory budget, so single-query exact search was timed over "
                        f"the first {len(first)} vectors and scaled by {n / len(first):.2f} (linear in n)")
        del flat, first
    if progress:
        print(f"auto: exact search {exact_ms:.3f} ms/query with {used} faiss thread(s); tuning on "
              f"{'%d student queries' % len(student) if student is not None else '%d database vectors' % q}",
              file=sys.stderr)
    tried: list[dict[str, Any]] = []
    best: tuple | None = None
    winner: tuple | None = None
    for factory, estimate in todo:
        entry: dict[str, Any] = {"factory": factory, "memory_bytes": int(estimate)}
        tried.append(entry)
        if estimate > budget.max_memory:
            entry["skipped"] = "over the memory budget"
            continue
        if factory == "Flat":  # the exact reference itself: recall 1 by definition, its time is the exact time
            index, entry["build_seconds"] = exact, exact_seconds
            measured = lambda: (1.0, exact_ms, 1.0 if student is not None else None)  # noqa: E731
        else:
            if exact is not None and (best is None or best[4] is not exact):
                exact = None  # freed before the next candidate is built (unless it is the best so far)
            start = time.perf_counter()
            index = build_candidate(source, factory)
            entry["build_seconds"] = round(time.perf_counter() - start, 3)

            def measured() -> tuple[float, float, float | None]:
                r_db, ms_db = measure(index, db_queries, held, db_truth)
                r_st, ms_st = measure(index, student, None, st_truth) if student is not None else (None, None)
                return r_db, (ms_st if student is not None else ms_db), r_st
        entry["settings"] = []
        for params in sweep(factory, nlist_for(n)):
            apply_search_params(index, params)
            with omp_threads(threads):
                r_db, ms, r_st = measured()
            recall = r_st if student is not None else r_db
            row = {"search_params": params, "recall@10": round(recall, 4), "ms": round(ms, 4),
                   "recall@10_database_queries": round(r_db, 4),
                   "speedup_vs_exact": round(exact_ms / ms, 2) if ms > 0 else None}
            if student is not None:
                row["recall@10_student_queries"] = round(r_st, 4)
            entry["settings"].append(row)
            if progress:
                both = f"student {r_st:.3f}, database {r_db:.3f}" if student is not None else f"database {r_db:.3f}"
                print(f"auto: {factory} {params or ''} recall@{k} {both}, {ms:.3f} ms/query "
                      f"({exact_ms / ms:.1f}x exact)", file=sys.stderr)
            result = (factory, params, recall, ms, index, r_db, r_st)
            if ms <= budget.target_ms and (best is None or recall > best[2]):
                best = result
            if recall >= budget.target_recall and ms <= budget.target_ms:
                winner = result
                break
            if ms > budget.target_ms:
                break  # a larger setting is only slower
        if winner is not None:
            break
        result = None
        if best is None or best[4] is not index:
            index = None  # not kept: freed before the next candidate is built
    exact = index = result = None
    met = winner is not None
    if winner is None:
        if best is None:
            raise UserError(f"no index fits the budget (memory {budget.max_memory} bytes, {budget.target_ms} ms per "
                            f"query) for {n} vectors of dimension {dim}; raise --max-memory or --target-ms")
        winner = best
    factory, params, recall, ms, index, r_db, r_st = winner
    apply_search_params(index, params)
    report = {"chosen": factory, "search_params": params, "recall@10": round(recall, 4), "ms_per_query": round(ms, 4),
              "targets_met": met, "tuned_on": "student queries" if student is not None else "database vectors",
              "recall@10_database_queries": round(r_db, 4),
              "recall@10_student_queries": round(r_st, 4) if student is not None else None,
              "queries": int(q), "k": k, "search_threads": int(used),
              "exact_ms_per_query": round(exact_ms, 4), "speedup_vs_exact": round(exact_ms / ms, 2) if ms else None,
              "exact_timing": exact_timing,
              "recall_reference": "exact inner-product search over all vectors; a database query's own id is left "
                                  "out of both rankings",
              "budget": dataclasses.asdict(budget), "candidates": tried}
    if student is not None:
        report["student_queries"] = {"count": int(len(student)), "given": int(len(queries.vectors)),
                                     "source": queries.source,
                                     "sample": "all, in order" if len(student) == len(queries.vectors) else
                                     f"{MAX_QUERIES} drawn with numpy default_rng({seed}).choice, sorted"}
    else:
        report["warning"] = DATABASE_WARNING
    return Choice(factory, dict(params), report, index)


@dataclasses.dataclass
class QueryPlan:
    """The --auto queries of a build, checked by `plan_queries` before any image is decoded; `load` embeds them."""

    source: str
    vectors: np.ndarray | None = None  # given query vectors
    embedder: Any = None  # the student (an OnnxEmbedder) and the query images it embeds
    items: list | None = None

    def load(self, *, batch_size: int = 64, workers: int | None = None, progress: bool = True) -> Queries:
        if self.vectors is not None:
            return Queries(self.vectors, self.source)
        from asymsearch.index.pipeline import embed_items
        done = embed_items(self.items, [self.embedder], batch_size=batch_size, workers=workers, progress=progress,
                           desc="embedding --auto queries")
        if not len(done.vectors[0]):
            raise UserError(f"none of the {len(self.items)} --auto query images could be read ({self.source})")
        return Queries(done.vectors[0], f"{self.source}: {len(done.vectors[0])} images"
                                        + (f", {len(done.skipped)} unreadable skipped" if done.skipped else ""))


def plan_queries(config: Any, teacher: Any) -> QueryPlan | None:
    """The student queries `config` (an `IndexBuildConfig`) gives --auto, checked against `teacher` (the
    database's embedder): query images with the student that embeds them (`auto_queries`, `student`), or query
    vectors (`auto_query_vectors`, a (count, dim) .npy); None when neither is given. `UserError` (one line) for a
    query option without --auto, a folder without images, vectors of another dimension, a student of another
    teacher."""
    given = [name for name in ("auto_queries", "student", "auto_query_vectors") if getattr(config, name)]
    flag = lambda name: "--" + name.replace("_", "-")  # noqa: E731
    if given and not config.auto:
        raise UserError(f"{flag(given[0])} only applies with --auto")
    if config.search_threads < 0:
        raise UserError(f"search threads must be 0 (faiss's default) or more, not {config.search_threads}")
    if not given:
        return None
    if config.auto_query_vectors and (config.auto_queries or config.student):
        raise UserError("give either --auto-query-vectors or --auto-queries with --student, not both")
    if config.auto_query_vectors:
        path = config.auto_query_vectors
        try:
            vectors = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise UserError(f"cannot read query vectors {path} as a .npy array ({e.__class__.__name__})") from None
        return QueryPlan(f"vectors {path}", vectors=check_queries(vectors, teacher.dim, path))
    if not (config.auto_queries and config.student):
        raise UserError("--auto-queries needs --student (the model that embeds the query images), and --student "
                        "needs --auto-queries")
    from pathlib import Path

    from asymsearch.core.data import list_images_flat
    from asymsearch.core.manifest import check_pairing
    from asymsearch.core.ort import OnnxEmbedder
    student_path = Path(config.student)
    if not student_path.is_file():
        raise UserError(f"student ONNX model not found: {student_path}")
    items = list_images_flat(config.auto_queries)  # UserError for a missing folder or one without images
    student = OnnxEmbedder(student_path)
    check_pairing(student, teacher, query_name=f"the --auto student {student_path}",
                  database_name=f"the teacher {teacher.path}")
    return QueryPlan(f"student {student_path} on {config.auto_queries}", embedder=student, items=items)
