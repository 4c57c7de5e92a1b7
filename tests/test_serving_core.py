"""The serving core under hostile load, each over a real channel to an in-process server on port 0, and each
followed by a good request that must succeed: idle streams cost no thread and never block health or search; the
memory budget refuses what would not fit (naming the limit) while small queries pass; BatchSearch takes what it
advertises; the SDK splits larger batches; truncated images are refused."""
from __future__ import annotations

import asyncio
import concurrent.futures
import io
import threading

import grpc
import grpc.aio
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

from asymsearch.clients.client import SearchClient
from asymsearch.core.data import list_image_folder
from asymsearch.index.build import build_index
from asymsearch.protos.v1 import search_pb2, search_pb2_grpc
from asymsearch.server.batching import BatchingConfig
from asymsearch.server.engine import QueryEngine
from asymsearch.server.service import create_server
from conftest import wait_until

MIB = 1024 * 1024


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory, image_folder, tiny_models):
    out = tmp_path_factory.mktemp("core") / "index"
    build_index(tiny_models["teacher"], image_folder, out, progress=False)
    return out


@pytest.fixture(scope="module")
def items(image_folder):
    return list_image_folder(image_folder)


@pytest.fixture()
def engine(index_dir, tiny_models):
    with QueryEngine.open(index_dir, tiny_models["student"], max_k=50) as e:
        yield e


def serving(engine, **options):
    server, port = create_server(engine, **options)
    return server, f"127.0.0.1:{port}"


def health(address: str) -> int:
    with grpc.insecure_channel(address) as channel:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10).status


def random_vectors(n: int, dim: int, seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


class IdleStreams:
    """`n` SearchStream calls opened over `channels` connections from an asyncio client in a thread of its own,
    none sending anything, until `close()`."""

    def __init__(self, address: str, n: int, channels: int) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self._address, self._n, self._k = address, n, channels
        self.calls: list = []
        self._channels: list = []
        asyncio.run_coroutine_threadsafe(self._open(), self._loop).result(60)

    async def _open(self) -> None:
        # a local subchannel pool each: separate connections, as separate clients would have
        self._channels = [grpc.aio.insecure_channel(self._address, options=[("grpc.use_local_subchannel_pool", 1)])
                          for _ in range(self._k)]
        stubs = [search_pb2_grpc.SearchStub(c) for c in self._channels]
        self.calls = [stubs[i % self._k].SearchStream() for i in range(self._n)]
        await asyncio.gather(*(c.wait_for_connection() for c in self.calls))

    async def _close(self) -> None:
        for c in self.calls:
            c.cancel()
        await asyncio.gather(*(ch.close() for ch in self._channels))

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self._close(), self._loop).result(60)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


def test_a_thousand_idle_streams_cost_no_thread_and_block_nothing(engine, items):
    server, address = serving(engine)
    try:
        with SearchClient(address) as client:
            before_hits = client.search_image(items[3].path, k=5)
        threads_before = threading.active_count()
        streams = IdleStreams(address, 1000, channels=5)
        try:
            open_now = lambda: server.metrics.registry.get_sample_value("asymsearch_open_streams")  # noqa: E731
            assert wait_until(lambda: open_now() == 1000), open_now()  # all reached the server and are open there
            # an open stream holds no thread: a thread-per-RPC server would need 1,000 more
            assert threading.active_count() <= threads_before + 4, (threads_before, threading.active_count())
            assert health(address) == health_pb2.HealthCheckResponse.SERVING
            with SearchClient(address) as client:
                assert client.search_image(items[3].path, k=5) == before_hits
                assert len(client.search_vector(random_vectors(1, engine.dim, 0)[0], k=3)) == 3
        finally:
            streams.close()
        with SearchClient(address) as client:
            assert client.search_image(items[3].path, k=5) == before_hits
    finally:
        server.stop(None)


def big_png(side: int) -> bytes:
    """A `side`^2 RGB PNG of one colour: a few KB on the wire, side^2 x 4 bytes once Pillow decodes it."""
    buf = io.BytesIO()
    Image.new("RGB", (side, side), (90, 140, 30)).save(buf, "PNG")
    return buf.getvalue()


def test_memory_budget_refuses_large_headers_while_small_queries_pass(engine, items):
    """Budget 40 MiB: a 3000^2 image (34 MiB decoded) fits once; while one is held in decoding, a second is refused
    (the budget is spent); a 4000^2 one (61 MiB) is refused outright; small image and vector queries pass
    meanwhile, and the held one is answered once released."""
    large, huge = big_png(3000), big_png(4000)
    inside, release = threading.Event(), threading.Event()
    prepare = engine.prepare_image

    def held(data):
        if len(data) == len(large):
            inside.set()
            assert release.wait(30)
        return prepare(data)
    engine.prepare_image = held
    server, address = serving(engine, batching=BatchingConfig(memory_budget_bytes=40 * MIB, decode_workers=2))
    try:
        with SearchClient(address, timeout=30, retries=0) as client, \
                concurrent.futures.ThreadPoolExecutor(1) as pool:
            first = pool.submit(client.search_image, large, 3)
            assert inside.wait(20)
            for data, rule in ((large, "is spent"), (huge, "more than the whole memory budget")):
                with pytest.raises(Exception) as refused:
                    client.search_image(data, 3)
                assert refused.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED, refused.value
                assert "memory budget of 40 MiB" in str(refused.value) and rule in str(refused.value)
                assert "--memory-budget-mb" in str(refused.value)
            assert len(client.search_image(items[0].path, k=3)) == 3  # small queries pass meanwhile
            assert len(client.search_vector(random_vectors(1, engine.dim, 1)[0], k=3)) == 3
            assert server.pipeline.held_bytes >= 34 * MIB  # the held one's decoded size is counted
            release.set()
            assert len(first.result(30)) == 3
            assert server.pipeline.held_bytes == 0
            assert len(client.search_image(items[1].path, k=3)) == 3
    finally:
        release.set()
        server.stop(None)


def test_batch_search_takes_257_and_1024_and_refuses_one_over_the_limit(engine):
    """The default limits fit together: what Info advertises as max_batch_queries is admitted on an idle server,
    one more is INVALID_ARGUMENT naming the limit; results equal single searches."""
    server, address = serving(engine)
    try:
        with grpc.insecure_channel(address) as channel:
            stub = search_pb2_grpc.SearchStub(channel)
            limit = stub.Info(search_pb2.InfoRequest(), timeout=10).max_batch_queries
            assert limit >= 1024
            vectors = random_vectors(limit + 1, engine.dim, 2)

            def batch(n):
                return stub.BatchSearch(search_pb2.BatchSearchRequest(queries=[
                    search_pb2.Query(vector=search_pb2.FloatVector(values=v), k=3, tag=i)
                    for i, v in enumerate(vectors[:n])]), timeout=60)
            for n in (257, 1024, limit):
                reply = batch(n)
                assert [r.code for r in reply.results] == [0] * n and [r.tag for r in reply.results] == list(range(n))
            single = [engine.search_vector(v, 3).hits for v in vectors[:5]]
            assert [[h.id for h in r.reply.hits] for r in reply.results[:5]] == [[h.id for h in s] for s in single]
            with pytest.raises(grpc.RpcError) as refused:
                batch(limit + 1)
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert f"{limit + 1} queries in one batch; the limit is {limit}" in refused.value.details()
            assert len(batch(3).results) == 3
    finally:
        server.stop(None)


def test_sdk_batch_search_splits_and_keeps_the_order(engine, items):
    """A server taking 7 queries per call: the SDK sends 25 mixed queries (one of them bad) in 4 calls and
    returns what a plain loop of single searches returns, in order."""
    server, address = serving(engine, max_batch_queries=7)
    try:
        vectors = random_vectors(12, engine.dim, 3)
        queries: list = []
        for i in range(25):
            queries.append(items[i].path if i % 2 == 0 else vectors[i // 2])
        queries[9] = b"not an image"
        calls = lambda: server.metrics.registry.get_sample_value(  # noqa: E731
            "asymsearch_requests_total", {"method": "BatchSearch", "code": "OK"}) or 0.0
        before = calls()
        with SearchClient(address) as client:
            got = client.batch_search(queries, k=4)
            assert calls() - before == 4  # ceil(25 / 7)
            for q, result in zip(queries, got):
                if isinstance(q, bytes):
                    assert result.code == grpc.StatusCode.INVALID_ARGUMENT
                    continue
                expected = client.search_image(q, 4) if isinstance(q, str) else client.search_vector(q, 4)
                assert [h.id for h in result] == [h.id for h in expected]
                assert np.allclose([h.score for h in result], [h.score for h in expected], atol=1e-5)
            assert client.batch_search([], k=4) == []
    finally:
        server.stop(None)


def test_sdk_batch_search_splits_by_message_size(engine, items):
    """Images whose total exceeds one message are sent in several calls, each under the server's limit."""
    server, address = serving(engine, max_message_bytes=256 * 1024)
    try:
        data = [open(items[i].path, "rb").read() for i in range(4)]
        padded = [d + b"\0" * (100 * 1024) for d in data]  # JPEG readers ignore what follows the end marker
        with SearchClient(address) as client:
            got = client.batch_search(padded, k=3)
            assert [[h.id for h in r] for r in got] == [[h.id for h in client.search_image(d, 3)] for d in data]
    finally:
        server.stop(None)


def test_truncated_jpeg_is_refused_over_the_wire(engine, items):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(4).integers(0, 255, (600, 800, 3), dtype=np.uint8)).save(buf, "JPEG")
    cut = buf.getvalue()[: len(buf.getvalue()) // 2]
    server, address = serving(engine)
    try:
        with SearchClient(address, retries=0) as client:
            with pytest.raises(Exception) as refused:
                client.search_image(cut, 3)
            assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT
            assert "truncated" in str(refused.value)
            assert len(client.search_image(items[2].path, k=3)) == 3
    finally:
        server.stop(None)


def test_large_images_decode_one_at_a_time_in_their_own_lane(engine, items):
    """With one decoder: three images that decode to >= 64 MiB each wait for the large lane, one decoding at a
    time, while an ordinary image query is answered meanwhile; then all three are answered."""
    large = big_png(4200)  # 4200^2 RGB: 67 MiB once decoded
    inside, most, release = [0], [0], threading.Event()
    lock = threading.Lock()
    prepare = engine.prepare_image

    def held(data):
        if len(data) == len(large):
            with lock:
                inside[0] += 1
                most[0] = max(most[0], inside[0])
            try:
                assert release.wait(30)
            finally:
                with lock:
                    inside[0] -= 1
        return prepare(data)
    engine.prepare_image = held
    server, address = serving(engine, batching=BatchingConfig(decode_workers=1, memory_budget_bytes=2 << 30))
    try:
        with SearchClient(address, timeout=60, retries=0) as client, \
                concurrent.futures.ThreadPoolExecutor(3) as pool:
            pending = [pool.submit(client.search_image, large, 3) for _ in range(3)]
            assert wait_until(lambda: inside[0] == 1 and server.pipeline.in_flight == 3)
            assert len(client.search_image(items[4].path, k=3)) == 3  # not stuck behind the large ones
            release.set()
            assert [len(f.result(60)) for f in pending] == [3, 3, 3]
        assert most[0] == 1  # never two large images decoding at once
    finally:
        release.set()
        server.stop(None)
