"""The Python client against the query server running in-process on port 0."""
from __future__ import annotations

import socket
from pathlib import Path

import numpy as np
import pytest

from asymsearch.clients.client import (Hit, InvalidRequest, OnDeviceEmbedder, SearchClient, SearchError,
                                       ServerUnavailable)
from asymsearch.core.data import list_image_folder
from asymsearch.core.errors import PairingError, UserError
from asymsearch.index.build import build_index
from asymsearch.server.engine import QueryEngine
from asymsearch.server.service import create_server


@pytest.fixture(scope="module")
def address(tmp_path_factory, image_folder, tiny_models):
    out = tmp_path_factory.mktemp("client") / "index"
    build_index(tiny_models["teacher"], image_folder, out, progress=False)
    with QueryEngine.open(out, tiny_models["student"], max_k=100) as engine:
        server, port = create_server(engine, max_workers=4, expose_paths=True)
        yield f"127.0.0.1:{port}"
        server.stop(None)


@pytest.fixture
def client(address):
    with SearchClient(address, timeout=10) as client:
        client.wait_ready(10)
        yield client


@pytest.fixture(scope="module")
def items(image_folder):
    return list_image_folder(image_folder)


def test_search_image_by_path_and_by_bytes(client, items):
    query = items[42]
    by_path = client.search_image(query.path, k=6)
    assert len(by_path) == 6 and all(isinstance(h, Hit) for h in by_path)
    assert by_path == client.search_image(Path(query.path).read_bytes(), k=6)
    assert [h.score for h in by_path] == sorted((h.score for h in by_path), reverse=True)
    assert all(h.path == items[h.id].path and h.label == items[h.id].label for h in by_path)


def test_on_device_matches_server_side(client, items, tiny_models):
    embedder = OnDeviceEmbedder(tiny_models["student"])
    assert embedder.teacher_id == "teacher-a"
    for query in (items[0], items[55]):
        on_server = client.search_image(query.path, k=10)
        on_device = client.search_on_device(embedder, query.path, k=10)
        assert [h.id for h in on_device] == [h.id for h in on_server]
        np.testing.assert_allclose([h.score for h in on_device], [h.score for h in on_server], atol=1e-4)
        assert [(h.path, h.label) for h in on_device] == [(h.path, h.label) for h in on_server]


def test_on_device_with_foreign_student_is_refused(client, items, tiny_models):
    foreign = OnDeviceEmbedder(tiny_models["foreign_student"])
    with pytest.raises(PairingError) as e:
        client.search_on_device(foreign, items[0].path, k=3)
    assert "teacher-a" in str(e.value) and "teacher-b" in str(e.value)


def test_info(client):
    info = client.info()
    assert {k: info[k] for k in ("teacher_id", "student_id", "dim", "count", "factory", "metric", "max_k",
                                 "default_k")} == {
        "teacher_id": "teacher-a", "student_id": "student-of-teacher-a", "dim": 16, "count": 80,
        "factory": "Flat", "metric": "inner_product", "max_k": 100, "default_k": 10}
    assert info["index_version"] == "" and info["search_params"] == {} and info["admin_enabled"] is False
    assert '"tiny_linear"' in info["student_architecture"] and info["max_message_bytes"] == 16 * 1024 * 1024


def test_invalid_requests_raise_invalid_request_with_the_server_message(client, items):
    with pytest.raises(InvalidRequest, match="not a readable image"):
        client.search_image(b"not an image", k=3)
    with pytest.raises(InvalidRequest, match="expected dim 16"):
        client.search_vector([0.5] * 4)
    with pytest.raises(InvalidRequest, match="max_k of 100"):
        client.search_image(items[0].path, k=101)
    assert issubclass(InvalidRequest, SearchError)
    assert len(client.search_image(items[0].path, k=2)) == 2


def test_missing_local_image_is_a_user_error(client, tmp_path, tiny_models):
    with pytest.raises(UserError, match="image not found"):
        client.search_image(tmp_path / "nope.jpg")
    with pytest.raises(UserError, match="no such file"):
        OnDeviceEmbedder(tiny_models["student"]).embed(tmp_path / "nope.jpg")


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_server_down_is_unavailable():
    with SearchClient(f"127.0.0.1:{_closed_port()}", timeout=1.0) as client:
        with pytest.raises(ServerUnavailable):
            client.info()
        with pytest.raises(ServerUnavailable, match="not ready"):
            client.wait_ready(0.5)


def same(a: list[Hit], b: list[Hit]) -> bool:
    """The same hits (ids, labels, paths, metadata) with scores equal to float rounding."""
    strip = lambda hits: [(h.id, h.label, h.path, h.metadata) for h in hits]  # noqa: E731
    return strip(a) == strip(b) and np.allclose([h.score for h in a], [h.score for h in b], atol=1e-5)


def test_batch_search_and_stream_search(client, items):
    """One entry per query, in order (batch) or tagged (stream); equal to the single-query answers; a bad query
    comes back as its own error."""
    paths = [items[i].path for i in (0, 17, 42)]
    singles = [client.search_image(p, k=4) for p in paths]
    vector = [0.25] * 16
    queries = [paths[0], Path(paths[1]).read_bytes(), vector, b"no image here", paths[2]]
    batch = client.batch_search(queries, k=4)
    # queries searched together may take faiss's BLAS path, single ones its scan: same hits, scores to rounding
    assert same(batch[0], singles[0]) and same(batch[1], singles[1]) and same(batch[4], singles[2])
    assert same(batch[2], client.search_vector(vector, k=4))
    assert isinstance(batch[3], InvalidRequest) and "not a readable image" in str(batch[3])
    streamed = dict(client.stream_search(iter(queries), k=4))
    assert set(streamed) == set(range(len(queries)))
    assert all(same(streamed[i], batch[i]) for i in (0, 1, 2, 4))
    assert isinstance(streamed[3], InvalidRequest)


def test_tls_options_read_missing_files_as_user_errors(tmp_path):
    from asymsearch.clients.client import TlsOptions
    with pytest.raises(UserError, match="cannot read"):
        SearchClient("127.0.0.1:1", tls=TlsOptions(root_ca=tmp_path / "missing.pem"))
