"""The asyncio SDK and round robin across replicas: in-process servers on port 0, real channels."""
from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from asymsearch.clients.aio import AsyncOnDeviceClient, AsyncSearchClient
from asymsearch.clients.client import (Hit, InvalidRequest, NotAuthorised, SearchClient,
                                       ServerUnavailable, channel_options, channel_target)
from asymsearch.core.data import list_image_folder
from asymsearch.core.errors import PairingError, UserError
from asymsearch.index.build import build_index
from asymsearch.server.engine import QueryEngine
from asymsearch.server.service import create_server

TOKEN = "s3cret-token"


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory, image_folder, tiny_models):
    out = tmp_path_factory.mktemp("sdk_async") / "index"
    build_index(tiny_models["teacher"], image_folder, out, progress=False)
    return out


@pytest.fixture(scope="module")
def servers(index_dir, tiny_models):
    """Two replicas of one index (each with its own engine) and a third that requires a token."""
    engines = [QueryEngine.open(index_dir, tiny_models["student"], max_k=100) for _ in range(3)]
    started = [create_server(engines[0], max_workers=4), create_server(engines[1], max_workers=4),
               create_server(engines[2], max_workers=4, token=TOKEN, search_requires_token=True)]
    yield started
    for (server, _), engine in zip(started, engines):
        server.stop(None)
        engine.close()


@pytest.fixture(scope="module")
def address(servers):
    return f"127.0.0.1:{servers[0][1]}"


@pytest.fixture(scope="module")
def items(image_folder):
    return list_image_folder(image_folder)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _served(server, method: str) -> float:
    return server.metrics.registry.get_sample_value("asymsearch_requests_total",
                                                    {"method": method, "code": "OK"}) or 0.0


def test_async_client_matches_the_sync_client(address, items):
    """Every query kind through asyncio equals the sync client's answer on the same server."""
    query = items[42]
    with SearchClient(address, timeout=10) as sync:
        expected = sync.search_image(query.path, k=6)
        expected_each = [sync.search_image(items[i].path, k=3) for i in range(8)]
        expected_info = sync.info()

    async def go():
        async with AsyncSearchClient(address, timeout=10) as client:
            await client.wait_ready(10)
            by_path = await client.search_image(query.path, k=6)
            by_bytes = await client.search(Path(query.path).read_bytes(), k=6)
            by_pil = await client.search(Image.open(query.path), k=6)
            gathered = await asyncio.gather(*(client.search(items[i].path, k=3) for i in range(8)))
            info = await client.info()
            batch = await client.batch_search([query.path, b"not an image", [0.25] * 16], k=6)
            by_vector = await client.search([0.25] * 16, k=6)
            return by_path, by_bytes, by_pil, gathered, info, batch, by_vector

    by_path, by_bytes, by_pil, gathered, info, batch, by_vector = asyncio.run(go())
    assert by_path == expected and by_bytes == expected and all(isinstance(h, Hit) for h in by_path)
    # the JPEG decoded by PIL and re-encoded as PNG: the same pixels, so the same ranking
    assert [h.id for h in by_pil] == [h.id for h in expected]
    np.testing.assert_allclose([h.score for h in by_pil], [h.score for h in expected], atol=1e-5)
    # concurrent queries are searched together (faiss's BLAS path), single ones by the scan: same ids, scores
    # equal to float rounding
    assert [[h.id for h in g] for g in gathered] == [[h.id for h in e] for e in expected_each]
    np.testing.assert_allclose([[h.score for h in g] for g in gathered],
                               [[h.score for h in e] for e in expected_each], atol=1e-5)
    assert info == expected_info
    assert batch[0] == expected and isinstance(batch[1], InvalidRequest) and batch[2] == by_vector


def test_async_errors_are_typed(address, servers, tmp_path, items, tiny_models):
    secured = f"127.0.0.1:{servers[2][1]}"

    async def go():
        async with AsyncSearchClient(address, timeout=10) as client:
            with pytest.raises(InvalidRequest, match="not a readable image"):
                await client.search_image(b"garbage", k=3)
            with pytest.raises(InvalidRequest, match="expected dim 16"):
                await client.search_vector([1.0] * 3)
            with pytest.raises(UserError, match="image not found"):
                await client.search_image(tmp_path / "missing.jpg")
        async with AsyncSearchClient(secured, timeout=10, token="wrong") as client:
            with pytest.raises(NotAuthorised, match="invalid bearer token"):
                await client.search_image(items[0].path, k=3)
        async with AsyncSearchClient(secured, timeout=10, token=TOKEN) as client:
            assert len(await client.search_image(items[0].path, k=3)) == 3
        async with AsyncOnDeviceClient(tiny_models["foreign_student"], address, timeout=10) as client:
            with pytest.raises(PairingError, match="teacher-b"):
                await client.search(items[0].path, k=3)

    asyncio.run(go())


def test_async_retries_with_backoff_on_unavailable():
    """A server that is down: UNAVAILABLE is retried `retries` times, then `ServerUnavailable`."""
    async def go():
        client = AsyncSearchClient(f"127.0.0.1:{_closed_port()}", timeout=2, retries=2, backoff=0.01)
        try:
            with pytest.raises(ServerUnavailable, match="unavailable"):
                await client.info()
            with pytest.raises(ServerUnavailable, match="not ready"):
                await client.wait_ready(0.3)
            return client.attempts
        finally:
            await client.close()

    assert asyncio.run(go()) == 3


def test_async_on_device_equals_server_side(address, items, tiny_models):
    async def go():
        async with AsyncSearchClient(address, timeout=10) as server_side, \
                AsyncOnDeviceClient(tiny_models["student"], address, timeout=10) as on_device:
            return [(await server_side.search_image(items[i].path, k=8), await on_device.search(items[i].path, k=8))
                    for i in (3, 61)]

    for expected, got in asyncio.run(go()):
        assert [h.id for h in got] == [h.id for h in expected]
        np.testing.assert_allclose([h.score for h in got], [h.score for h in expected], atol=1e-3)


def test_round_robin_spreads_requests_across_two_servers(servers, items):
    """gRPC's round_robin policy over a static two-address target: both replicas answer, about half each."""
    (a, port_a), (b, port_b) = servers[0], servers[1]
    addresses = [f"127.0.0.1:{port_a}", f"127.0.0.1:{port_b}"]
    target = channel_target(addresses)
    assert target == f"ipv4:127.0.0.1:{port_a},127.0.0.1:{port_b}"
    assert ("grpc.lb_policy_name", "round_robin") in channel_options(addresses)
    vector = [0.1] * 16
    n = 40

    before = (_served(a, "SearchVector"), _served(b, "SearchVector"))
    with SearchClient(addresses, timeout=10) as client:
        client.wait_ready(10)
        expected = client.search_vector(vector, k=3)
        for _ in range(n - 1):
            assert client.search_vector(vector, k=3) == expected
    sync_counts = (_served(a, "SearchVector") - before[0], _served(b, "SearchVector") - before[1])
    assert sum(sync_counts) == n and min(sync_counts) >= n // 4, sync_counts

    async def go():
        async with AsyncSearchClient(",".join(addresses), timeout=10) as client:
            await client.wait_ready(10)
            for _ in range(n):
                await client.search_vector(vector, k=3)

    before = (_served(a, "SearchVector"), _served(b, "SearchVector"))
    asyncio.run(go())
    async_counts = (_served(a, "SearchVector") - before[0], _served(b, "SearchVector") - before[1])
    assert sum(async_counts) == n and min(async_counts) >= n // 4, async_counts


def test_round_robin_survives_one_replica_down(servers):
    """One address dead, one alive: every call is answered by the live one (round robin skips the dead)."""
    addresses = [f"127.0.0.1:{_closed_port()}", f"127.0.0.1:{servers[0][1]}"]
    with SearchClient(addresses, timeout=5) as client:
        client.wait_ready(10)
        for _ in range(6):
            assert len(client.search_vector([0.1] * 16, k=2)) == 2


def test_bad_addresses_are_user_errors():
    with pytest.raises(UserError, match="no server address"):
        channel_target([])
    with pytest.raises(UserError, match="HOST:PORT"):
        channel_target(["127.0.0.1:1", "nohostport"])
    assert channel_target("localhost:50051") == "localhost:50051"
    assert channel_target("127.0.0.1:1, 127.0.0.1:2") == "ipv4:127.0.0.1:1,127.0.0.1:2"
    assert channel_target(["localhost:1", "127.0.0.1:2"]) == "ipv4:127.0.0.1:1,127.0.0.1:2"
