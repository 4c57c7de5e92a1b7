"""The in-process limit of `asymsearch bench serve`: the server's work with nothing around it.

The same steps the server runs for a query, called directly in this process: decode and prepare the image
(`core.preprocess`), embed it with the real student (`core.ort.OnnxEmbedder`), search the index and look up the
hits (`index.store.SearchIndex`) — with no gRPC, no queue, no admission and no client in the same CPU budget.
`threads` workers (default: as many as the server's decode and embed workers, `default_threads`) each take `batch` queries at a time: the student embeds them
`embed_batch` at a time (default 1: with EfficientNet-Lite on a CPU a larger batch costs as much or more per image)
and faiss searches the whole batch in one call (a batched Flat search is cheaper per query), so the limit has the
cheapest batching and the parallelism a server could at best have. It runs for a set time and
reports queries per second and this process's CPU time per query, and the thread CPU time of each stage (decode,
embed, search) per query, as the server exports it.

A limit is an upper bound: a server that beats it by more than noise means the limit does not do what the server
does (`asymsearch.bench.serve.check_ratio` refuses such a ratio).
"""
from __future__ import annotations

import itertools
import os
import threading
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from asymsearch.core.errors import UserError
from asymsearch.core.manifest import check_pairing
from asymsearch.core.ort import OnnxEmbedder
from asymsearch.core.preprocess import decode_image, preprocess
from asymsearch.bench.server import STAGES
from asymsearch.index.store import SearchIndex


def default_threads() -> int:
    """As many worker threads as the server runs compute threads (its decode plus embed workers, from the same
    machine-sized defaults): on a machine shared with other jobs the scheduler shares the cores by runnable
    thread, so a limit with fewer threads than the server gets less of the machine than the server does (measured:
    a 2-thread limit got one of two cores at load 4 and the server beat it by 1.17x in q/s)."""
    from asymsearch.server.defaults import DECODE_WORKERS, EMBED_WORKERS
    return DECODE_WORKERS + EMBED_WORKERS


class InProcessLimit:
    def __init__(self, index: str | os.PathLike, student: str | os.PathLike, *, threads: int | None = None,
                 batch: int = 8, embed_batch: int = 1, k: int = 10) -> None:
        threads = threads or default_threads()
        if min(threads, batch, embed_batch, k) < 1:
            raise UserError(f"the limit needs threads, batch, embed batch and k of at least 1 (got {threads}, "
                            f"{batch}, {embed_batch}, {k})")
        self.threads, self.batch, self.embed_batch, self.k = threads, batch, embed_batch, k
        self.student = OnnxEmbedder(student, intra_op_threads=1, inter_op_threads=1)
        self.index = SearchIndex.open(Path(index), gpu=False)
        check_pairing(self.student, self.index.manifest, query_name=str(student), database_name=str(index))
        self.spec = self.student.manifest.preprocessing
        # thread CPU seconds per stage over a run (the server exports the same: asymsearch_stage_cpu_seconds)
        self._stage_cpu = dict.fromkeys(STAGES, 0.0)
        self._stage_lock = threading.Lock()
        try:
            import faiss
            faiss.omp_set_num_threads(1)  # the parallelism is the workers'; OpenMP on top would oversubscribe
        except ImportError:  # pragma: no cover - faiss is a dependency
            pass

    # the server's steps ------------------------------------------------------------------------------------------

    def _count(self, stage: str, since: float) -> float:
        """Add this thread's CPU time since `since` to `stage`; returns the thread's CPU time now."""
        now = time.thread_time()
        with self._stage_lock:
            self._stage_cpu[stage] += now - since
        return now

    def _search(self, vectors: np.ndarray) -> np.ndarray:
        cpu = time.thread_time()
        vectors = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
        _, ids = self.index.search(vectors.astype(np.float32), self.k)
        self.index.lookup_records(sorted({int(i) for i in ids.ravel() if i >= 0}))
        self._count("search", cpu)
        return ids

    def image_batch(self, data: Sequence[bytes]) -> np.ndarray:
        """Encoded images -> the ids of their k best hits (Q, k), as the server finds them."""
        cpu = time.thread_time()
        pixels = np.stack([preprocess(decode_image(d, min_side=self.spec.resize), self.spec) for d in data])
        cpu = self._count("decode", cpu)
        e = self.embed_batch
        vectors = np.concatenate([self.student.embed_arrays(pixels[i:i + e]) for i in range(0, len(pixels), e)])
        self._count("embed", cpu)
        return self._search(vectors)

    def vector_batch(self, vectors: Sequence[np.ndarray]) -> np.ndarray:
        return self._search(np.stack(vectors))

    # a timed run ------------------------------------------------------------------------------------------------

    def run(self, kind: str, payloads: Sequence[Any], seconds: float) -> dict[str, float]:
        """`threads` workers, each taking the next `batch` payloads (cycling through them) until `seconds` have
        passed. Returns queries, seconds, q/s and CPU ms per query of this process."""
        if kind not in ("image", "vector"):
            raise ValueError(f"kind must be image or vector, not {kind!r}")
        step = self.image_batch if kind == "image" else self.vector_batch
        if kind == "image":
            payloads = [Path(p).read_bytes() if not isinstance(p, bytes) else p for p in payloads]
        else:
            payloads = [np.asarray(v, np.float32) for v in payloads]
        step(payloads[:self.batch])  # warm: the first call of a session allocates
        counter, lock, done = itertools.count(), threading.Lock(), [0]
        errors: list[BaseException] = []

        def worker(end: float) -> None:
            mine = 0
            try:
                while time.perf_counter() < end:
                    with lock:
                        start = next(counter) * self.batch
                    mine += len(step([payloads[(start + i) % len(payloads)] for i in range(self.batch)]))
            except BaseException as e:  # noqa: BLE001 - re-raised on the calling thread below
                errors.append(e)
            with lock:
                done[0] += mine

        self._stage_cpu = dict.fromkeys(STAGES, 0.0)
        cpu0, wall0 = time.process_time(), time.perf_counter()
        workers = [threading.Thread(target=worker, args=(wall0 + seconds,)) for _ in range(self.threads)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
        if errors:
            raise errors[0]
        n = max(1, done[0])
        return {"queries": done[0], "seconds": wall, "qps": done[0] / wall, "cpu_ms_per_query": cpu * 1e3 / n,
                "stage_cpu_ms_per_query": {k: v * 1e3 / n for k, v in self._stage_cpu.items() if v > 0}}

    def close(self) -> None:
        self.index.close()

    def __enter__(self) -> "InProcessLimit":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
