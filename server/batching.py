"""Dynamic batching: many concurrent queries become one student call and one faiss call.

    image query ──decode pool──> embed batcher ──(one ORT call per batch)──> search batcher ──> reply
    vector query ──────────────────────────────────────────────────────────> search batcher ──> reply

Each batcher is a thread that takes the first waiting job, then keeps taking jobs until it holds `max_batch` of
them or `max_delay` has passed since the first one, and runs the batch. It waits only while other admitted
queries exist that could still join (so a lone query at low load never waits: measured, a 1 ms timed wait cost
20 ms at p50 on a busy 2-core machine, where a sleeping thread is woken late). While a batch runs, new jobs queue
up, so under load batches fill by themselves. Decoding (Pillow) runs in a worker
pool so that the request threads and the batchers never decode.

Backpressure: at most `max_queue` queries are admitted at once (from admission to reply); one more is refused
at once with `Overloaded` (RESOURCE_EXHAUSTED on the wire), so the queue and the latency of admitted queries
stay bounded. A job whose deadline has passed (or whose caller went away) when its batch is formed is dropped
with `Expired` instead of being computed.
"""
from __future__ import annotations

import dataclasses
import logging
import queue
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Sequence

import numpy as np

from asymsearch.server.engine import InvalidQuery, QueryEngine, SearchResult

log = logging.getLogger(__name__)


class Overloaded(Exception):
    """The server holds `max_queue` queries already; retry later."""


class Expired(Exception):
    """The query's deadline passed (or its caller cancelled) before it was computed: dropped."""


class Closed(Exception):
    """The server is shutting down and takes no new queries."""


@dataclasses.dataclass(frozen=True)
class BatchingConfig:
    max_batch: int = 32  # most queries in one faiss call (and one student call unless max_embed_batch says)
    max_delay_ms: float = 1.0  # longest wait for a batch to fill once its first query arrived
    max_queue: int = 256  # most queries admitted at once; more are refused (RESOURCE_EXHAUSTED)
    decode_workers: int = 2  # threads decoding and preprocessing images
    max_embed_batch: int | None = None  # most images in one student call (None: max_batch)
    search_threads: int = 1  # faiss OpenMP threads of the search batcher (0: faiss's default, all cores)

    def __post_init__(self) -> None:
        if (self.max_batch < 1 or self.max_queue < 1 or self.decode_workers < 1 or self.max_delay_ms < 0
                or (self.max_embed_batch is not None and self.max_embed_batch < 1) or self.search_threads < 0):
            raise ValueError(f"invalid batching configuration: {self}")

    @property
    def embed_batch(self) -> int:
        return self.max_embed_batch or self.max_batch


class Metrics:
    """What the pipeline reports; the server's Prometheus metrics implement it, the default does nothing."""

    def stage(self, stage: str, seconds: float, n: int = 1) -> None: ...

    def batch(self, stage: str, size: int) -> None: ...

    def queue_depth(self, depth: int) -> None: ...

    def dropped(self, reason: str, n: int = 1) -> None: ...


@dataclasses.dataclass(eq=False)
class Job:
    k: int
    deadline: float | None  # time.monotonic() after which the result is of no use
    alive: Callable[[], bool] | None  # False once the caller went away
    future: Future
    admitted: float = dataclasses.field(default_factory=time.perf_counter)
    pixels: np.ndarray | None = None
    vector: np.ndarray | None = None
    decode_ms: float = 0.0
    embed_ms: float = 0.0
    ready: float = 0.0  # when the job entered its current queue

    def expired(self, now: float) -> bool:
        return (self.deadline is not None and now >= self.deadline) or (self.alive is not None and not self.alive())

    def fail(self, exc: BaseException) -> None:
        if not self.future.done():
            self.future.set_exception(exc)


class Batcher:
    """A thread that runs `process(jobs)` on batches of up to `max_batch` jobs from its queue."""

    _STOP = object()

    def __init__(self, name: str, process: Callable[[list[Job]], None], config: BatchingConfig,
                 metrics: Metrics, max_batch: int | None = None,
                 more_coming: Callable[[int], bool] = lambda n: True,
                 on_start: Callable[[], None] | None = None) -> None:
        self.name = name
        self._on_start = on_start
        self._process = process
        self._more_coming = more_coming  # more_coming(n): could a job not among these n still arrive?
        self._max_batch = max_batch or config.max_batch
        self._max_delay = config.max_delay_ms / 1e3
        self._metrics = metrics
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=f"batch-{name}", daemon=True)
        self._thread.start()

    def put(self, job: Job) -> None:
        job.ready = time.perf_counter()
        self._queue.put(job)

    def stop(self, timeout: float | None = None) -> None:
        self._queue.put(self._STOP)
        self._thread.join(timeout)

    def _collect(self) -> tuple[list[Job], bool]:
        first = self._queue.get()
        if first is self._STOP:
            return [], True
        batch, stop = [first], False
        fill_until = time.perf_counter() + self._max_delay
        while len(batch) < self._max_batch:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                left = fill_until - time.perf_counter()
                if left <= 0 or not self._more_coming(len(batch)):
                    break
                try:
                    job = self._queue.get(timeout=left)
                except queue.Empty:
                    break
            if job is self._STOP:
                stop = True
                break
            batch.append(job)
        return batch, stop

    def _run(self) -> None:
        if self._on_start is not None:
            self._on_start()
        while True:
            batch, stop = self._collect()
            if batch:
                now = time.monotonic()
                live = [j for j in batch if not j.expired(now)]
                if len(live) < len(batch):
                    self._metrics.dropped("expired", len(batch) - len(live))
                    for j in batch:
                        if j not in live:
                            j.fail(Expired("the deadline passed before the query was computed"))
                if live:
                    self._metrics.batch(self.name, len(live))
                    try:
                        self._process(live)
                    except Exception as e:  # a bug or a broken model: fail this batch, keep the server up
                        log.exception("%s batch of %d failed", self.name, len(live))
                        for j in live:
                            j.fail(e)
            if stop:
                return


def _set_omp_threads(n: int) -> None:
    """OpenMP's thread count is a per-thread setting: it must be set in the thread that calls faiss. Idle OpenMP
    workers spin, so on a shared or small machine one thread per search batcher is much faster (measured: 12 ms
    of CPU per single-query search over 100k vectors with faiss's default 2 threads, most of it spinning)."""
    if n > 0:
        import faiss
        faiss.omp_set_num_threads(n)


class Pipeline:
    """Admission, decoding pool and the two batchers in front of a `QueryEngine`.

    `submit_image` / `submit_vector` return a `Future` of a `SearchResult`; it fails with `InvalidQuery`,
    `Expired`, or whatever the engine raised. Both raise `Overloaded` / `Closed` at once instead of queueing.
    """

    def __init__(self, engine: QueryEngine, config: BatchingConfig = BatchingConfig(),
                 metrics: Metrics | None = None) -> None:
        self.engine = engine
        self.config = config
        self.metrics = metrics or Metrics()
        self._lock = threading.Lock()
        self._in_flight = 0
        self._pool = ThreadPoolExecutor(config.decode_workers, thread_name_prefix="decode")
        more = lambda n: self._in_flight > n  # noqa: E731 - other admitted queries may still join the batch
        self._embedder = Batcher("embed", self._embed, config, self.metrics, config.embed_batch, more)
        self._searcher = Batcher("search", self._search, config, self.metrics, more_coming=more,
                                 on_start=lambda: _set_omp_threads(config.search_threads))
        self._idle = threading.Condition(self._lock)
        self._closed = False

    @property
    def in_flight(self) -> int:
        return self._in_flight

    # -- admission ------------------------------------------------------------------------------------------

    def _admit(self, n: int, deadline: float | None, alive: Callable[[], bool] | None) -> list[Job]:
        with self._lock:
            if self._closed:
                raise Closed("the server is shutting down")
            if self._in_flight + n > self.config.max_queue:
                self.metrics.dropped("overloaded", n)
                raise Overloaded(f"server busy: {self._in_flight} queries in progress, the limit is "
                                 f"{self.config.max_queue}; retry later")
            self._in_flight += n
            depth = self._in_flight
        self.metrics.queue_depth(depth)
        jobs = []
        for _ in range(n):
            job = Job(0, deadline, alive, Future())
            job.future.add_done_callback(self._done)
            jobs.append(job)
        return jobs

    def _done(self, _: Future) -> None:
        with self._lock:
            self._in_flight -= 1
            depth = self._in_flight
            if depth == 0:
                self._idle.notify_all()
        self.metrics.queue_depth(depth)

    def submit_image(self, data: bytes, k: int, *, deadline: float | None = None,
                     alive: Callable[[], bool] | None = None) -> Future:
        k = self.engine.resolve_k(k)
        (job,) = self._admit(1, deadline, alive)
        job.k = k
        self._pool.submit(self._decode, job, data)
        return job.future

    def submit_vector(self, vector: Sequence[float] | np.ndarray, k: int, *, deadline: float | None = None,
                      alive: Callable[[], bool] | None = None) -> Future:
        k = self.engine.resolve_k(k)
        v = self.engine.check_vector(vector)
        (job,) = self._admit(1, deadline, alive)
        job.k, job.vector = k, v
        self._searcher.put(job)
        return job.future

    def submit_many(self, queries: Sequence[tuple[str, object, int]], *, deadline: float | None = None,
                    alive: Callable[[], bool] | None = None) -> list[Future]:
        """("image", bytes, k) / ("vector", values, k) queries admitted together (all or none); a query that is
        invalid gets a failed future instead of failing the others."""
        jobs = self._admit(len(queries), deadline, alive)
        for job, (kind, payload, k) in zip(jobs, queries):
            try:
                job.k = self.engine.resolve_k(k)
                if kind == "vector":
                    job.vector = self.engine.check_vector(payload)
            except InvalidQuery as e:
                job.fail(e)
                continue
            if kind == "vector":
                self._searcher.put(job)
            else:
                self._pool.submit(self._decode, job, payload)
        return [j.future for j in jobs]

    # -- the stages -----------------------------------------------------------------------------------------

    def _decode(self, job: Job, data: bytes) -> None:
        if job.expired(time.monotonic()):
            self.metrics.dropped("expired")
            job.fail(Expired("the deadline passed before the image was decoded"))
            return
        start = time.perf_counter()
        try:
            job.pixels = self.engine.prepare_image(data)
        except InvalidQuery as e:
            job.fail(e)
            return
        except Exception as e:
            log.exception("decoding failed unexpectedly")
            job.fail(e)
            return
        seconds = time.perf_counter() - start
        job.decode_ms = seconds * 1e3
        self.metrics.stage("decode", seconds)
        self._embedder.put(job)

    def _embed(self, jobs: list[Job]) -> None:
        start = time.perf_counter()
        for j in jobs:
            self.metrics.stage("queue", start - j.ready)
        vectors = self.engine.embed_prepared(np.stack([j.pixels for j in jobs]))
        seconds = time.perf_counter() - start
        self.metrics.stage("embed", seconds)
        for j, v in zip(jobs, vectors):
            j.pixels = None
            j.embed_ms = seconds * 1e3
            try:
                j.vector = self.engine.normalise(v)
            except InvalidQuery as e:
                j.fail(InvalidQuery(f"the image embeds to an unusable vector: {e}"))
                continue
            self._searcher.put(j)

    def _search(self, jobs: list[Job]) -> None:
        start = time.perf_counter()
        for j in jobs:
            self.metrics.stage("queue", start - j.ready)
        hits, version = self.engine.search_batch(np.stack([j.vector for j in jobs]), [j.k for j in jobs])
        end = time.perf_counter()
        self.metrics.stage("search", end - start)
        for j, h in zip(jobs, hits):
            j.future.set_result(SearchResult(
                h, j.embed_ms, (end - start) * 1e3, version, queue_ms=(start - j.admitted) * 1e3 - j.decode_ms
                - j.embed_ms, decode_ms=j.decode_ms, batch_size=len(jobs)))
            self.metrics.stage("total", end - j.admitted)

    # -- shutdown -------------------------------------------------------------------------------------------

    def close(self, timeout: float | None = None) -> bool:
        """Refuse new queries, wait up to `timeout` s for the admitted ones, stop the threads; True if drained."""
        with self._lock:
            self._closed = True
            drained = self._idle.wait_for(lambda: self._in_flight == 0, timeout)
        self._embedder.stop(1.0)
        self._searcher.stop(1.0)
        self._pool.shutdown(wait=False, cancel_futures=True)
        return drained
