"""`OnDeviceClient`: the student runs here, only the vector is sent (<= 4 KB), the answer equals server-side
embedding of the same image, and a student of another teacher is refused before anything is searched."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from asymsearch.clients.client import OnDeviceClient, SearchClient
from asymsearch.core.data import list_image_folder
from asymsearch.core.errors import InvalidImage, PairingError, UserError
from asymsearch.index.build import build_index
from asymsearch.server.engine import QueryEngine
from asymsearch.server.service import create_server

MAX_REQUEST_BYTES = 4 * 1024


@pytest.fixture(scope="module")
def served(tmp_path_factory, image_folder, tiny_models):
    out = tmp_path_factory.mktemp("ondevice") / "index"
    build_index(tiny_models["teacher"], image_folder, out, progress=False)
    with QueryEngine.open(out, tiny_models["student"], max_k=100) as engine:
        server, port = create_server(engine, max_workers=4)
        yield server, f"127.0.0.1:{port}"
        server.stop(None)


@pytest.fixture(scope="module")
def items(image_folder):
    return list_image_folder(image_folder)


class _Recorder:
    """Wraps a stub method: records the serialised size of each request, then sends it unchanged."""

    def __init__(self, method):
        self.method, self.sizes = method, []

    def __call__(self, request, **kw):
        self.sizes.append(len(request.SerializeToString()))
        return self.method(request, **kw)


def _served(server, method: str) -> float:
    return server.metrics.registry.get_sample_value("asymsearch_requests_total",
                                                    {"method": method, "code": "OK"}) or 0.0


def test_on_device_sends_a_small_vector_and_matches_server_side(served, items, tiny_models):
    server, address = served
    with SearchClient(address, timeout=10) as reference, \
            OnDeviceClient(student=tiny_models["student"], address=address, timeout=10) as client:
        recorder = _Recorder(client.client._stub.SearchVector)
        client.client._stub.SearchVector = recorder
        images_before = _served(server, "SearchImage")
        for i in (0, 13, 55, 79):
            on_device = client.search(items[i].path, k=10)
            on_server = reference.search_image(items[i].path, k=10)
            assert [h.id for h in on_device] == [h.id for h in on_server]
            np.testing.assert_allclose([h.score for h in on_device], [h.score for h in on_server], atol=1e-3)
            assert [(h.path, h.label) for h in on_device] == [(h.path, h.label) for h in on_server]
        # PIL images and bytes go the same way
        pil = client.search(Image.open(items[13].path), k=10)
        assert [h.id for h in pil] == [h.id for h in reference.search_image(items[13].path, k=10)]
        assert client.search(Path(items[13].path).read_bytes(), k=10) == client.search(items[13].path, k=10)
        # only vectors left this client: the server embedded no image for it (the reference's 5 calls only)
        assert _served(server, "SearchImage") - images_before == 5
    assert len(recorder.sizes) == 7 and max(recorder.sizes) <= MAX_REQUEST_BYTES, recorder.sizes


def test_student_of_another_teacher_is_refused_before_the_first_query(served, items, tiny_models):
    server, address = served
    vectors_before = _served(server, "SearchVector")
    with OnDeviceClient(student=tiny_models["foreign_student"], address=address, timeout=10) as client:
        with pytest.raises(PairingError) as e:
            client.search(items[0].path, k=3)
        assert "teacher-a" in str(e.value) and "teacher-b" in str(e.value)
        with pytest.raises(PairingError):
            client.batch_search([items[0].path], k=3)
    assert _served(server, "SearchVector") == vectors_before
    assert issubclass(PairingError, UserError)


def test_on_device_batch_and_unreadable_image(served, items, tiny_models, tmp_path):
    _, address = served
    with OnDeviceClient(student=tiny_models["student"], address=address, timeout=10) as client:
        assert client.check()["teacher_id"] == "teacher-a"
        batch = client.batch_search([items[1].path, items[2].path], k=4)
        assert batch == [client.search(items[1].path, k=4), client.search(items[2].path, k=4)]
        bad = tmp_path / "bad.jpg"
        bad.write_bytes(b"definitely not a jpeg")
        with pytest.raises(InvalidImage, match="bad.jpg: not a readable image"):
            client.search(bad, k=3)
        with pytest.raises(UserError, match="missing.jpg"):
            client.search(tmp_path / "missing.jpg", k=3)
