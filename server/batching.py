"""Dynamic batching: many concurrent queries become one student call and one faiss call.

    image query ──decode pool──> embed batcher ──(one ORT call per batch)──> search batcher ──> reply
    vector query ──────────────────────────────────────────────────────────> search batcher ──> reply

Each batcher is one or more threads (the embed batcher runs `embed_workers` of them, so the student uses more
than one core) that take the first waiting job, then keeps taking jobs until it holds `max_batch` of
them or `max_delay` has passed since the first one, and runs the batch. It waits only while other admitted
queries exist that could still join (so a lone query at low load never waits: measured, a 1 ms timed wait cost
20 ms at p50 on a busy 2-core machine, where a sleeping thread is woken late). While a batch runs, new jobs queue
up, so under load batches fill by themselves. Decoding (Pillow) runs in a worker
pool so that the request threads and the batchers never decode; an image whose decoded size (from its header) is
`LARGE_IMAGE_BYTES` or more is decoded in a lane of its own, one at a time, so large ones neither pile up in memory
nor delay ordinary ones.

Backpressure (`asymsearch.server.admission`): at most `max_queue` queries, and at most `memory_budget_bytes` of
what they occupy, are admitted at once (from admission to reply). An image query costs its encoded bytes, its
decoded 8-bit RGB image (w x h x 3, read from the header before any pixel is decoded; released once it is
decoded) and the student's input; a vector query its values. A query beyond either limit is refused at once with
`Overloaded` (RESOURCE_EXHAUSTED on the wire, the message naming the limit), so memory, the queue and the latency
of admitted queries stay bounded. A job whose deadline has passed (or whose caller went away) when its batch is formed is dropped
with `Expired` instead of being computed.
"""
from __future__ import annotations

import dataclasses
import logging
import queue
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Sequence

import numpy as np

from asymsearch.server.admission import Admission, Overloaded
from asymsearch.server.defaults import (DECODE_WORKERS, EMBED_BATCH, EMBED_WORKERS, MAX_QUEUE,
                                        MEMORY_BUDGET_BYTES)
from asymsearch.server.engine import InvalidQuery, QueryEngine, SearchResult

log = logging.getLogger(__name__)


class Expired(Exception):
    """The query's deadline passed (or its caller cancelled) before it was computed: dropped."""


@dataclasses.dataclass(frozen=True)
class BatchingConfig:
    max_batch: int = 32  # most queries in one faiss call (and one student call unless max_embed_batch says)
    max_delay_ms: float = 1.0  # longest wait for a batch to fill once its first query arrived
    max_queue: int = MAX_QUEUE  # most queries admitted at once; more are refused (RESOURCE_EXHAUSTED)
    decode_workers: int = DECODE_WORKERS  # threads decoding and preprocessing images
    max_embed_batch: int | None = EMBED_BATCH  # most images in one student call (None: max_batch)
    search_threads: int = 1  # faiss OpenMP threads of the search batcher (0: faiss's default, all cores)
    embed_workers: int = EMBED_WORKERS  # student calls running at once (each with the session's own threads)
    memory_budget_bytes: int = MEMORY_BUDGET_BYTES  # what admitted queries may occupy; more are refused

    def __post_init__(self) -> None:
        if (self.max_batch < 1 or self.max_queue < 1 or self.decode_workers < 1 or self.max_delay_ms < 0
                or (self.max_embed_batch is not None and self.max_embed_batch < 1) or self.search_threads < 0
                or self.embed_workers < 1 or self.memory_budget_bytes < 1):
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

    def admitted_bytes(self, nbytes: int) -> None: ...

    def tier_embed(self, tier: str, seconds: float, n: int) -> None: ...

    def stage_cpu(self, stage: str, seconds: float, n: int = 1) -> None: ...

    def tier_query(self, tier: str, kind: str, seconds: float) -> None: ...


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
    nbytes: int = 0  # held in the memory budget until the job is done
    decoded_nbytes: int = 0  # of which the decoded image, released as soon as it is decoded
    tier: Any = None  # the engine's Tier this query was admitted with (it embeds the image, even after a swap)
    filter: Any = None  # the query's parsed Filter, or None; jobs of one search batch are grouped by it

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
                 on_start: Callable[[], None] | None = None, workers: int = 1) -> None:
        self.name = name
        self._on_start = on_start
        self._process = process
        self._more_coming = more_coming  # more_coming(n): could a job not among these n still arrive?
        self._max_batch = max_batch or config.max_batch
        self._max_delay = config.max_delay_ms / 1e3
        self._metrics = metrics
        # queue.Queue, not SimpleQueue: with two workers, SimpleQueue.get(timeout=0.001) was seen to hang (5 s and more,
        # until the next put) on CPython 3.11.7, holding the job it had already taken (tests/test_query_cli round
        # robin: a BatchSearch waited to its deadline while the server idled)
        self._queue: queue.Queue = queue.Queue()
        self._threads = [threading.Thread(target=self._run, name=f"batch-{name}-{i}", daemon=True)
                         for i in range(workers)]
        for t in self._threads:
            t.start()

    def put(self, job: Job) -> None:
        job.ready = time.perf_counter()
        self._queue.put(job)

    def stop(self, timeout: float | None = None) -> None:
        for _ in self._threads:
            self._queue.put(self._STOP)
        for t in self._threads:
            t.join(timeout)

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


VECTOR_OVERHEAD_BYTES = 64  # a vector query's fixed share of the budget beside its values
LARGE_IMAGE_BYTES = 64 * 1024 * 1024  # decoded size (from the header) from which an image takes the large lane


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
        self.admission = Admission(config.max_queue, config.memory_budget_bytes)
        self._pool = ThreadPoolExecutor(config.decode_workers, thread_name_prefix="decode")
        # images that decode to LARGE_IMAGE_BYTES or more take a lane of their own, one at a time: a burst of them
        # neither holds their pixels all at once nor makes ordinary images wait behind them
        self._large = ThreadPoolExecutor(1, thread_name_prefix="decode-large")
        more = lambda n: self.admission.queries > n  # noqa: E731 - other admitted queries may still join the batch
        self._embedder = Batcher("embed", self._embed, config, self.metrics, config.embed_batch, more,
                                 workers=config.embed_workers)
        self._searcher = Batcher("search", self._search, config, self.metrics, more_coming=more,
                                 on_start=lambda: _set_omp_threads(config.search_threads))

    @property
    def in_flight(self) -> int:
        return self.admission.queries

    @property
    def held_bytes(self) -> int:
        return self.admission.bytes

    # -- admission ------------------------------------------------------------------------------------------

    def _admit(self, costs: Sequence[tuple[int, int]], deadline: float | None,
               alive: Callable[[], bool] | None) -> list[Job]:
        """One job per (bytes, of which decoded) cost, admitted together or not at all."""
        total = sum(c for c, _ in costs)
        try:
            self.admission.admit(len(costs), total)
        except Overloaded as e:
            self.metrics.dropped("memory_budget" if "memory budget" in str(e) else "overloaded", len(costs))
            raise
        self._report()
        jobs = []
        for nbytes, decoded in costs:
            job = Job(0, deadline, alive, Future(), nbytes=nbytes, decoded_nbytes=decoded)
            job.future.add_done_callback(lambda _, job=job: self._done(job))
            jobs.append(job)
        return jobs

    def _report(self) -> None:
        self.metrics.queue_depth(self.admission.queries)
        self.metrics.admitted_bytes(self.admission.bytes)

    def _done(self, job: Job) -> None:
        self.admission.release(1, job.nbytes)
        job.nbytes = job.decoded_nbytes = 0
        self._report()

    def _release_decoded(self, job: Job) -> None:
        if job.decoded_nbytes:
            self.admission.release(0, job.decoded_nbytes)
            job.nbytes -= job.decoded_nbytes
            job.decoded_nbytes = 0

    def _decoder(self, job: Job) -> ThreadPoolExecutor:
        return self._large if job.decoded_nbytes >= LARGE_IMAGE_BYTES else self._pool

    def image_cost(self, data: bytes, tier: Any = None) -> tuple[int, int]:
        """(bytes, of which the decoded image) an image query holds; `InvalidQuery` for a header that is not an
        image's."""
        decoded, prepared = self._with_tier(self.engine.image_nbytes, data, tier)
        return len(data) + decoded + prepared, decoded

    def _with_tier(self, method: Callable[..., Any], arg: Any, tier: Any) -> Any:
        """`method(arg)` for the engine's current default tier, `method(arg, tier)` for any other (a tier swapped
        out after its query was admitted included), so that an engine method wrapped to take one argument (as
        tests wrap them) keeps working for the default tier."""
        return method(arg) if tier is None or tier is self.engine.tier() else method(arg, tier)

    def vector_cost(self, vector: np.ndarray) -> tuple[int, int]:
        return VECTOR_OVERHEAD_BYTES + vector.nbytes, 0

    def submit_image(self, data: bytes, k: int, *, deadline: float | None = None,
                     alive: Callable[[], bool] | None = None, tier: Any = None, filter: str = "") -> Future:
        k = self.engine.resolve_k(k)
        tier = self.engine.tier(tier)
        parsed = self.engine.parse_filter(filter)
        (job,) = self._admit([self.image_cost(data, tier)], deadline, alive)
        job.k, job.tier, job.filter = k, tier, parsed
        self._decoder(job).submit(self._decode, job, data)
        return job.future

    def submit_vector(self, vector: Sequence[float] | np.ndarray, k: int, *, deadline: float | None = None,
                      alive: Callable[[], bool] | None = None, tier: Any = None, student_id: str = "",
                      filter: str = "") -> Future:
        k = self.engine.resolve_k(k)
        tier = self.engine.tier(tier)
        v = self.engine.check_vector(vector, student_id)
        parsed = self.engine.parse_filter(filter)
        (job,) = self._admit([self.vector_cost(v)], deadline, alive)
        job.k, job.vector, job.tier, job.filter = k, v, tier, parsed
        self._searcher.put(job)
        return job.future

    def submit_many(self, queries: Sequence[tuple[str, object, int]], *, deadline: float | None = None,
                    alive: Callable[[], bool] | None = None) -> list[Future]:
        """("image", bytes, k) / ("vector", values, k) queries admitted together (all or none, by count and by
        bytes); a query that is invalid gets a failed future instead of failing the others. A query may go on with
        its tier, (for a vector) the id of the student that made it, and its filter text:
        ("vector", values, k, tier, student_id, filter)."""
        checked: list[tuple[str, object, int, Any] | InvalidQuery] = []
        costs: list[tuple[int, int]] = []
        for kind, payload, k, *rest in queries:
            try:
                k = self.engine.resolve_k(k)
                tier = self.engine.tier(rest[0] if rest else None)
                if kind == "vector":
                    payload = self.engine.check_vector(payload, rest[1] if len(rest) > 1 else "")
                    cost = self.vector_cost(payload)
                else:
                    cost = self.image_cost(payload, tier)
                parsed = self.engine.parse_filter(rest[2] if len(rest) > 2 else "")
            except InvalidQuery as e:
                checked.append(e)
                costs.append((0, 0))
                continue
            checked.append((kind, payload, k, tier, parsed))
            costs.append(cost)
        jobs = self._admit(costs, deadline, alive)
        for job, query in zip(jobs, checked):
            if isinstance(query, InvalidQuery):
                job.fail(query)
                continue
            kind, payload, job.k, job.tier, job.filter = query
            if kind == "vector":
                job.vector = payload
                self._searcher.put(job)
            else:
                self._decoder(job).submit(self._decode, job, payload)
        return [j.future for j in jobs]

    # -- the stages -----------------------------------------------------------------------------------------

    def _decode(self, job: Job, data: bytes) -> None:
        if job.expired(time.monotonic()):
            self.metrics.dropped("expired")
            job.fail(Expired("the deadline passed before the image was decoded"))
            return
        start, cpu = time.perf_counter(), time.thread_time()
        try:
            job.pixels = self._with_tier(self.engine.prepare_image, data, job.tier)
        except InvalidQuery as e:
            job.fail(e)
            return
        except Exception as e:
            log.exception("decoding failed unexpectedly")
            job.fail(e)
            return
        finally:
            self._release_decoded(job)
        seconds = time.perf_counter() - start
        self.metrics.stage_cpu("decode", time.thread_time() - cpu)
        job.decode_ms = seconds * 1e3
        self.metrics.stage("decode", seconds)
        self._report()
        self._embedder.put(job)

    def _embed(self, jobs: list[Job]) -> None:
        """One student call per tier among `jobs` (each with the tier object its query was admitted with)."""
        by_tier: dict[int, list[Job]] = {}
        for j in jobs:
            by_tier.setdefault(id(j.tier), []).append(j)
        for group in by_tier.values():
            self._embed_tier(group)

    def _embed_tier(self, jobs: list[Job]) -> None:
        start = time.perf_counter()
        for j in jobs:
            self.metrics.stage("queue", start - j.ready)
        tier = jobs[0].tier
        cpu = time.thread_time()
        vectors = self._with_tier(self.engine.embed_prepared, np.stack([j.pixels for j in jobs]), tier)
        self.metrics.stage_cpu("embed", time.thread_time() - cpu, len(jobs))
        seconds = time.perf_counter() - start
        self.metrics.stage("embed", seconds)
        self.metrics.tier_embed(getattr(tier, "name", ""), seconds, len(jobs))
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
        cpu = time.thread_time()
        hits, version = self.engine.search_batch(np.stack([j.vector for j in jobs]), [j.k for j in jobs],
                                                 [j.filter for j in jobs])
        self.metrics.stage_cpu("search", time.thread_time() - cpu, len(jobs))
        end = time.perf_counter()
        self.metrics.stage("search", end - start)
        for j, h in zip(jobs, hits):
            if isinstance(h, InvalidQuery):  # its filter names a field the index (swapped meanwhile) lacks
                j.fail(h)
                continue
            j.future.set_result(SearchResult(
                h, j.embed_ms, (end - start) * 1e3, version, queue_ms=(start - j.admitted) * 1e3 - j.decode_ms
                - j.embed_ms, decode_ms=j.decode_ms, batch_size=len(jobs)))
            self.metrics.stage("total", end - j.admitted)
            self.metrics.tier_query(getattr(j.tier, "name", ""), "vector" if j.embed_ms == 0 else "image",
                                    end - j.admitted)

    # -- shutdown -------------------------------------------------------------------------------------------

    def close(self, timeout: float | None = None) -> bool:
        """Refuse new queries, wait up to `timeout` s for the admitted ones, stop the threads; True if drained."""
        drained = self.admission.close(timeout)
        self._embedder.stop(1.0)
        self._searcher.stop(1.0)
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._large.shutdown(wait=False, cancel_futures=True)
        return drained
