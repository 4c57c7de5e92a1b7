"""Dynamic batching, backpressure and deadlines: the pipeline alone and the server over a real channel.

The reference is the engine answering one query at a time (itself checked against brute force in test_server.py):
batched answers must be identical. Gated models (a student or search that waits on an event) make the queue
states deterministic without any timing assumption.
"""
from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest

from asymsearch.core.data import list_image_folder
from asymsearch.core.preprocess import decode_image
from asymsearch.index.build import build_index
from asymsearch.protos.v1 import search_pb2, search_pb2_grpc
from asymsearch.server.batching import BatchingConfig, Expired, Metrics, Overloaded, Pipeline
from asymsearch.server.engine import InvalidQuery, QueryEngine
from asymsearch.server.service import create_server


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory, image_folder, tiny_models) -> Path:
    out = tmp_path_factory.mktemp("batching") / "index"
    build_index(tiny_models["teacher"], image_folder, out, progress=False)
    return out


@pytest.fixture
def engine(index_dir, tiny_models):
    with QueryEngine.open(index_dir, tiny_models["student"], max_k=50) as engine:
        yield engine


@pytest.fixture(scope="module")
def images(image_folder) -> list[bytes]:
    return [Path(it.path).read_bytes() for it in list_image_folder(image_folder)]


class Gate:
    """Wraps an engine method: every call waits until `open()` and records the batch sizes it saw."""

    def __init__(self, engine: QueryEngine, name: str) -> None:
        self.sizes: list[int] = []
        self.entered = threading.Event()
        self._open = threading.Event()
        inner = getattr(engine, name)

        def gated(arg, *rest):
            self.entered.set()
            assert self._open.wait(30), "gate never opened"
            self.sizes.append(len(arg))
            return inner(arg, *rest)
        setattr(engine, name, gated)

    def open(self) -> None:
        self._open.set()


def test_batched_answers_equal_single_answers_and_batches_form(engine, images):
    """40 image and 40 vector queries submitted while the student is held: they run in a few full batches
    and every answer equals the engine's one-at-a-time answer."""
    vectors = [engine.student.embed_images([decode_image(d)])[0] * 2.5 for d in images[:40]]
    expected_img = [engine.search_image(d, 7) for d in images[:40]]
    expected_vec = [engine.search_vector(v, 5) for v in vectors]
    gate = Gate(engine, "embed_prepared")
    pipeline = Pipeline(engine, BatchingConfig(max_batch=16, max_delay_ms=50, max_queue=100, decode_workers=2,
                                               max_embed_batch=None, embed_workers=1))
    try:
        img_futures = [pipeline.submit_image(d, 7) for d in images[:40]]
        vec_futures = [pipeline.submit_vector(v, 5) for v in vectors]
        assert gate.entered.wait(10)
        gate.open()
        got_img = [f.result(30) for f in img_futures]
        got_vec = [f.result(30) for f in vec_futures]
    finally:
        pipeline.close(5)
    assert sum(gate.sizes) == 40 and max(gate.sizes) == 16  # held back -> full batches
    for got, want in zip(got_img + got_vec, expected_img + expected_vec):
        assert [h.id for h in got.hits] == [h.id for h in want.hits]
        np.testing.assert_allclose([h.score for h in got.hits], [h.score for h in want.hits], atol=1e-5)
        assert [(h.path, h.label) for h in got.hits] == [(h.path, h.label) for h in want.hits]
    assert max(r.batch_size for r in got_img + got_vec) > 1


def test_embed_workers_run_the_student_side_by_side(engine, images):
    """With two embed workers, two student calls are in progress at once (both held inside the model), and the
    answers equal the one-at-a-time ones."""
    expected = [[h.id for h in engine.search_image(images[i], 5).hits] for i in range(6)]
    inside, both, release = [0], threading.Event(), threading.Event()
    lock = threading.Lock()
    inner = engine.embed_prepared

    def held(pixels):
        with lock:
            inside[0] += 1
            if inside[0] == 2:
                both.set()
        assert release.wait(30)
        return inner(pixels)
    engine.embed_prepared = held
    pipeline = Pipeline(engine, BatchingConfig(max_batch=8, max_delay_ms=0, max_queue=16, decode_workers=2,
                                               max_embed_batch=1, embed_workers=2))
    try:
        futures = [pipeline.submit_image(images[i], 5) for i in range(6)]
        assert both.wait(20), "the second embed worker never entered the student"
        release.set()
        assert [[h.id for h in f.result(30).hits] for f in futures] == expected
    finally:
        release.set()
        pipeline.close(5)


class StageCpu(Metrics):
    """Records the pipeline's stage_cpu reports."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, float, int]] = []
        self._lock = threading.Lock()

    def stage_cpu(self, stage: str, seconds: float, n: int = 1) -> None:
        with self._lock:
            self.calls.append((stage, seconds, n))


def test_each_stage_reports_its_thread_cpu_for_the_queries_it_ran(engine, images):
    """Every image is counted once by decode and embed, every query once by search, with a CPU time >= 0 taken on
    the thread that ran the stage (what bench serve subtracts from the process CPU to find the rest)."""
    metrics = StageCpu()
    pipeline = Pipeline(engine, BatchingConfig(max_batch=4, max_delay_ms=5, max_queue=64, decode_workers=2,
                                               max_embed_batch=2, embed_workers=2), metrics)
    try:
        futures = [pipeline.submit_image(d, 5) for d in images[:9]]
        futures += [pipeline.submit_vector(engine.student.embed_images([decode_image(d)])[0], 5) for d in images[:3]]
        for f in futures:
            f.result(30)
    finally:
        pipeline.close(5)
    count = {stage: sum(n for s, _, n in metrics.calls if s == stage) for stage in ("decode", "embed", "search")}
    assert count == {"decode": 9, "embed": 9, "search": 12}
    assert all(seconds >= 0 for _, seconds, _ in metrics.calls)
    assert sum(seconds for s, seconds, _ in metrics.calls if s == "embed") > 0


def test_full_queue_is_refused_at_once_and_frees_up(engine, images):
    gate = Gate(engine, "embed_prepared")
    pipeline = Pipeline(engine, BatchingConfig(max_batch=2, max_delay_ms=0, max_queue=5, decode_workers=1))
    try:
        admitted = [pipeline.submit_image(images[i], 3) for i in range(5)]
        assert pipeline.in_flight == 5
        with pytest.raises(Overloaded, match="limit is 5"):
            pipeline.submit_image(images[5], 3)
        with pytest.raises(Overloaded):
            pipeline.submit_vector([1.0] * 16, 3)
        with pytest.raises(Overloaded):  # a multi-query call is admitted whole or not at all
            pipeline.submit_many([("vector", [1.0] * 16, 3)] * 2)
        gate.open()
        assert all(len(f.result(30).hits) == 3 for f in admitted)
        assert len(pipeline.submit_image(images[5], 3).result(30).hits) == 3
        assert pipeline.in_flight == 0
    finally:
        pipeline.close(5)


def test_expired_queries_are_dropped_not_computed(engine, images):
    """Queries whose deadline passes while an earlier batch holds the student are failed with Expired and never
    reach the model; a query without a deadline queued beside them is answered."""
    gate = Gate(engine, "embed_prepared")
    pipeline = Pipeline(engine, BatchingConfig(max_batch=64, max_delay_ms=0, max_queue=64, decode_workers=1,
                                               embed_workers=1))
    try:
        first = pipeline.submit_image(images[0], 3)
        assert gate.entered.wait(10)  # the student is now busy with `first`
        doomed = [pipeline.submit_image(images[i], 3, deadline=time.monotonic() + 0.05) for i in range(1, 6)]
        cancelled = pipeline.submit_image(images[6], 3, alive=lambda: False)
        kept = pipeline.submit_image(images[7], 3)
        time.sleep(0.2)  # past the deadlines (an ordering condition, not a speed assertion)
        gate.open()
        assert len(first.result(30).hits) == 3 and len(kept.result(30).hits) == 3
        for f in doomed + [cancelled]:
            with pytest.raises(Expired):
                f.result(30)
    finally:
        pipeline.close(5)
    assert sum(gate.sizes) == 2  # `first`, then `kept` alone: the expired ones were never embedded


def test_invalid_queries_fail_alone(engine, images):
    pipeline = Pipeline(engine, BatchingConfig(max_batch=8, max_delay_ms=20, max_queue=16))
    try:
        with pytest.raises(InvalidQuery, match="expected dim 16"):
            pipeline.submit_vector([1.0] * 3, 3)
        futures = pipeline.submit_many([("image", images[0], 3), ("image", b"junk", 3),
                                        ("vector", [np.nan] * 16, 3), ("vector", [1.0] * 16, 4)])
        assert len(futures[0].result(30).hits) == 3 and len(futures[3].result(30).hits) == 4
        with pytest.raises(InvalidQuery, match="not a readable image"):
            futures[1].result(30)
        with pytest.raises(InvalidQuery, match="NaN"):
            futures[2].result(30)
        assert pipeline.in_flight == 0
    finally:
        pipeline.close(5)


def test_concurrent_clients_over_the_wire_get_batched(engine, images):
    """32 threads over a real channel: every reply equals the single-query answer and some shared a batch."""
    expected = {i: [h.id for h in engine.search_image(images[i], 5).hits] for i in range(32)}
    server, port = create_server(engine, max_workers=32,
                                 batching=BatchingConfig(max_batch=16, max_delay_ms=20, max_queue=64))
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = search_pb2_grpc.SearchStub(ch)
            with ThreadPoolExecutor(32) as pool:
                replies = list(pool.map(
                    lambda i: (i, stub.SearchImage(search_pb2.ImageQuery(image=images[i], k=5), timeout=30)),
                    range(32)))
        for i, reply in replies:
            assert [h.id for h in reply.hits] == expected[i]
        assert max(r.batch_size for _, r in replies) > 1
        metrics = server.metrics.text()
        assert 'asymsearch_requests_total{code="OK",method="SearchImage"} 32.0' in metrics
    finally:
        server.stop(None)


def test_overload_over_the_wire_is_resource_exhausted_and_admitted_ones_finish(engine, images):
    """Far more concurrent requests than the queue holds: the excess gets RESOURCE_EXHAUSTED at once, the admitted
    ones are answered once the (held) student runs, and the server answers normally afterwards."""
    gate = Gate(engine, "embed_prepared")
    server, port = create_server(engine, max_workers=24,
                                 batching=BatchingConfig(max_batch=8, max_delay_ms=0, max_queue=6))
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = search_pb2_grpc.SearchStub(ch)
            calls = [stub.SearchImage.future(search_pb2.ImageQuery(image=images[i % 80], k=3), timeout=30)
                     for i in range(20)]
            refused = []
            deadline = time.monotonic() + 20
            while len(refused) < 14 and time.monotonic() < deadline:  # 20 - 6 admitted
                refused = [c for c in calls if c.done() and c.code() == grpc.StatusCode.RESOURCE_EXHAUSTED]
                time.sleep(0.01)
            assert len(refused) == 14
            assert all("retry later" in c.details() for c in refused)
            gate.open()
            ok = [c for c in calls if c not in refused]
            assert all(len(c.result().hits) == 3 for c in ok)
            assert len(stub.SearchImage(search_pb2.ImageQuery(image=images[0], k=2), timeout=30).hits) == 2
        assert 'asymsearch_dropped_total{reason="overloaded"} 14.0' in server.metrics.text()
    finally:
        server.stop(None)


def test_batch_search_and_stream(engine, images):
    """BatchSearch and SearchStream answer like single queries; a bad query fails alone with its status."""
    expected = [[h.id for h in engine.search_image(images[i], 4).hits] for i in range(10)]
    vector = engine.student.embed_arrays(engine.prepare_image(images[3])[None])[0]
    server, port = create_server(engine, max_workers=8)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = search_pb2_grpc.SearchStub(ch)
            queries = [search_pb2.Query(image=images[i], k=4, tag=100 + i) for i in range(10)]
            queries.insert(5, search_pb2.Query(image=b"not an image", k=4, tag=7))
            queries.append(search_pb2.Query(vector=search_pb2.FloatVector(values=vector.tolist()), k=4, tag=8))
            queries.append(search_pb2.Query(k=4, tag=9))  # neither image nor vector
            reply = stub.BatchSearch(search_pb2.BatchSearchRequest(queries=queries), timeout=30)
            assert [r.tag for r in reply.results] == [q.tag for q in queries]
            by_tag = {r.tag: r for r in reply.results}
            for i in range(10):
                assert by_tag[100 + i].code == 0 and [h.id for h in by_tag[100 + i].reply.hits] == expected[i]
            assert [h.id for h in by_tag[8].reply.hits] == expected[3]
            assert by_tag[7].code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
            assert "not a readable image" in by_tag[7].message
            assert by_tag[9].code == grpc.StatusCode.INVALID_ARGUMENT.value[0] and "empty query" in by_tag[9].message

            streamed = {r.tag: r for r in stub.SearchStream(iter(queries), timeout=30)}
            assert set(streamed) == {q.tag for q in queries}
            for tag, r in by_tag.items():
                assert streamed[tag].code == r.code
                assert [h.id for h in streamed[tag].reply.hits] == [h.id for h in r.reply.hits]
            with pytest.raises(grpc.RpcError) as e:
                stub.BatchSearch(search_pb2.BatchSearchRequest(), timeout=10)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "empty batch" in e.value.details()
    finally:
        server.stop(None)


def test_a_lone_query_does_not_wait_for_a_batch_to_fill(engine, images):
    """With a 60 s max delay, a query with nothing else in flight is answered at once (within the 20 s timeout),
    because nothing could join its batch."""
    pipeline = Pipeline(engine, BatchingConfig(max_batch=8, max_delay_ms=60_000, max_queue=8))
    try:
        assert len(pipeline.submit_image(images[0], 3).result(20).hits) == 3
        assert len(pipeline.submit_vector([1.0] * 16, 3).result(20).hits) == 3
    finally:
        pipeline.close(5)
