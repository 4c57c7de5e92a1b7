"""Hot swap (following CURRENT, or the Admin Reload call), draining, refusal of a foreign index, and the client's
retries, with the server in-process on port 0 and real channels.

The versioned root is laid out by hand (ROOT/CURRENT naming ROOT/versions/<v>/, replaced with os.replace), the
layout `asymsearch.index.versions` publishes, so these tests do not depend on the index stage's writer.
"""
from __future__ import annotations

import os
import shutil
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from conftest import make_linear_onnx
from grpc_health.v1 import health_pb2, health_pb2_grpc

from asymsearch.clients.client import SearchClient, ServerUnavailable
from asymsearch.core.data import list_image_folder, select_classes
from asymsearch.index.build import build_index
from asymsearch.protos.v1 import search_pb2, search_pb2_grpc
from asymsearch.server.engine import QueryEngine
from asymsearch.server.service import SERVICE_NAME, SearchServer, ServeOptions, create_server

TOKEN = "swap-token"


def publish(root: Path, name: str, folder: Path) -> None:
    """Copy `folder` to ROOT/versions/<name> and point CURRENT at it atomically."""
    shutil.copytree(folder, root / "versions" / name)
    tmp = root / ".CURRENT.tmp"
    tmp.write_text(name + "\n")
    os.replace(tmp, root / "CURRENT")


@pytest.fixture(scope="module")
def folders(tmp_path_factory, image_folder, tiny_models) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("swap")
    all80, half = out / "all", out / "half"
    build_index(tiny_models["teacher"], image_folder, all80, progress=False)
    build_index(tiny_models["teacher"], image_folder, half, classes="first-half", progress=False)
    foreign_teacher = make_linear_onnx(out / "foreign-teacher.onnx", role="teacher", teacher_id="teacher-b",
                                       weight=np.random.default_rng(5).normal(size=(48, 16)))
    foreign = out / "foreign"
    build_index(foreign_teacher, image_folder, foreign, progress=False)
    return {"all": all80, "half": half, "foreign": foreign}


@pytest.fixture
def root(tmp_path, folders) -> Path:
    root = tmp_path / "root"
    publish(root, "v000001", folders["all"])
    return root


@pytest.fixture(scope="module")
def images(image_folder) -> list[bytes]:
    return [Path(it.path).read_bytes() for it in list_image_folder(image_folder)]


class Load:
    """Threads sending image and vector queries until stopped; they record every reply's version and every error
    (a reply without its k=5 hits counts as an error). tests/test_milvus.py uses it too."""

    def __init__(self, port: int, images: list[bytes], threads: int = 4) -> None:
        self.versions: list[str] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        stub = search_pb2_grpc.SearchStub(self._channel)

        def run(seed: int) -> None:
            rng = np.random.default_rng(seed)
            while not self._stop.is_set():
                try:
                    if rng.random() < 0.5:
                        r = stub.SearchImage(search_pb2.ImageQuery(image=images[rng.integers(len(images))], k=5),
                                             timeout=10)
                    else:
                        r = stub.SearchVector(search_pb2.VectorQuery(vector=rng.normal(size=16).tolist(), k=5),
                                              timeout=10)
                    assert len(r.hits) == 5
                    self.versions.append(r.index_version)
                except (grpc.RpcError, AssertionError) as e:
                    self.errors.append(repr(e))
        self._threads = [threading.Thread(target=run, args=(i,)) for i in range(threads)]
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(30)
        self._channel.close()


def _wait_for(predicate, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.02)


def test_follow_current_swaps_under_load_without_a_failed_request(root, folders, tiny_models, images,
                                                                   image_folder):
    engine = QueryEngine.open(root, tiny_models["student"])
    assert engine.index_version == "v000001" and engine.index.count == 80
    first = engine._served
    server, port = create_server(engine, max_workers=16, follow_current=True, poll_s=0.05, expose_paths=True)
    load = Load(port, images)
    try:
        _wait_for(lambda: len(load.versions) >= 20)
        publish(root, "v000002", folders["half"])
        _wait_for(lambda: engine.index_version == "v000002")
        n = len(load.versions)
        _wait_for(lambda: len(load.versions) >= n + 20)
    finally:
        load.stop()
    try:
        assert load.errors == []
        assert load.versions[0] == "v000001" and load.versions[-1] == "v000002"
        assert first.drained.wait(10)  # the old version was closed once its last batch finished
        half_paths = {it.path for it in list_image_folder(image_folder, select_classes(image_folder, "first-half"))}
        with SearchClient(f"127.0.0.1:{port}") as client:
            info = client.info()
            assert (info["index_version"], info["count"]) == ("v000002", 40)
            assert {h.path for h in client.search_image(images[70], k=40)} == half_paths
        text = server.metrics.text()
        assert 'asymsearch_index_info{teacher_id="teacher-a",version="v000002"} 1.0' in text
        assert 'version="v000001"' not in text
        assert 'asymsearch_index_swaps_total{result="swapped"} 1.0' in text
    finally:
        server.stop(None)
        engine.close()


def test_a_foreign_index_is_refused_and_the_old_version_keeps_serving(root, folders, tiny_models, images):
    engine = QueryEngine.open(root, tiny_models["student"])
    server, port = create_server(engine, max_workers=8, follow_current=True, poll_s=0.05, admin=True, token=TOKEN)
    try:
        publish(root, "v000002", folders["foreign"])  # embedded by teacher-b: the student cannot query it
        with SearchClient(f"127.0.0.1:{port}", token=TOKEN) as client:
            _wait_for(lambda: 'result="refused"' in server.metrics.text())
            with pytest.raises(Exception) as e:
                client.reload()
            assert "FAILED_PRECONDITION" in str(e.value) and "teacher-a" in str(e.value) \
                and "teacher-b" in str(e.value)
            assert client.info()["index_version"] == "v000001"
            assert len(client.search_image(images[0], k=3)) == 3
            # the operator fixes CURRENT: the follower picks the good version up
            publish(root, "v000003", folders["half"])
            _wait_for(lambda: engine.index_version == "v000003")
            assert client.info()["count"] == 40
    finally:
        server.stop(None)
        engine.close()


def test_the_follower_knows_versions_by_manifest_id_not_by_name(root, folders, tiny_models, images):
    """A refused version is not retried while CURRENT names the same content, but the same name published again
    with other (good) content is picked up: versions are told apart by manifest id."""
    engine = QueryEngine.open(root, tiny_models["student"])
    server, port = create_server(engine, follow_current=True, poll_s=0.05)
    try:
        publish(root, "v000002", folders["foreign"])
        _wait_for(lambda: 'result="refused"' in server.metrics.text())
        refusals = server.metrics.registry.get_sample_value("asymsearch_index_swaps_total", {"result": "refused"})
        time.sleep(0.5)  # ten polls: the same refused content is not loaded again
        assert server.metrics.registry.get_sample_value("asymsearch_index_swaps_total",
                                                        {"result": "refused"}) == refusals
        shutil.rmtree(root / "versions" / "v000002")
        shutil.copytree(folders["half"], root / "versions" / "v000002")  # the same name, other content
        _wait_for(lambda: engine.index.count == 40)
        assert engine.index_version == "v000002"
        with SearchClient(f"127.0.0.1:{port}") as client:
            assert len(client.search_image(images[0], k=3)) == 3
    finally:
        server.stop(None)
        engine.close()


def test_reload_call_serves_a_given_version_of_the_root_and_nothing_else(root, folders, tiny_models, images):
    """Reload(version) serves that version of the served root (its name or its folder) under load; any other
    folder is PERMISSION_DENIED with the same message whether it exists or not, and the root stays the source."""
    publish(root, "v000002", folders["half"])
    engine = QueryEngine.open(root, tiny_models["student"])  # serves CURRENT, v000002
    server, port = create_server(engine, max_workers=8, admin=True, token=TOKEN)
    load = Load(port, images, threads=2)
    try:
        with SearchClient(f"127.0.0.1:{port}", token=TOKEN) as client:
            _wait_for(lambda: len(load.versions) >= 10)
            assert client.reload("v000001") == {"index_version": "v000001", "count": 80, "changed": True,
                                                "message": ""}
            assert client.reload(str(root / "versions" / "v000002"))["count"] == 40
            assert client.reload("v000002")["changed"] is False
            messages = set()
            for outside in (str(folders["half"]), "/etc", "/no/such/folder", "../versions/v000001", "v1"):
                with pytest.raises(Exception) as refused:
                    client.reload(outside)
                assert refused.value.code == grpc.StatusCode.PERMISSION_DENIED, outside
                messages.add(str(refused.value).split(": ", 1)[1])
            assert len(messages) == 1 and "only versions of the served index root" in messages.pop()
            assert engine.source == root  # still following the root
            assert client.reload()["index_version"] == "v000002"  # CURRENT
            n = len(load.versions)
            _wait_for(lambda: len(load.versions) >= n + 10)
    finally:
        load.stop()
        server.stop(None)
        engine.close()
    assert load.errors == []


def test_stop_drains_in_flight_queries(root, tiny_models, images):
    """Queries admitted before stop() are answered; new ones are refused; health says NOT_SERVING meanwhile."""
    engine = QueryEngine.open(root, tiny_models["student"])
    release, entered = threading.Event(), threading.Event()
    inner = engine.embed_prepared

    def held(pixels):
        entered.set()
        release.wait(30)
        return inner(pixels)
    engine.embed_prepared = held
    server, port = create_server(engine, max_workers=8, drain_announce_s=3.0)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub, health = search_pb2_grpc.SearchStub(ch), health_pb2_grpc.HealthStub(ch)
            calls = [stub.SearchImage.future(search_pb2.ImageQuery(image=images[i], k=3), timeout=30)
                     for i in range(3)]
            assert entered.wait(10)
            stopper = threading.Thread(target=server.stop, args=(20,))
            stopper.start()
            _wait_for(lambda: health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=5)
                      .status == health_pb2.HealthCheckResponse.NOT_SERVING)
            release.set()
            assert [len(c.result().hits) for c in calls] == [3, 3, 3]
            stopper.join(30)
            with pytest.raises(grpc.RpcError) as e:
                stub.SearchImage(search_pb2.ImageQuery(image=images[0], k=3), timeout=5)
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        release.set()
        server.stop(None)
        engine.close()


def test_health_not_serving_while_loading(root, tiny_models):
    server = SearchServer(ServeOptions(max_workers=4))
    port = server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            health = health_pb2_grpc.HealthStub(ch)
            check = lambda: health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=5).status
            assert check() == health_pb2.HealthCheckResponse.NOT_SERVING
            with pytest.raises(grpc.RpcError) as e:
                search_pb2_grpc.SearchStub(ch).Info(search_pb2.InfoRequest(), timeout=5)
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE and "loading" in e.value.details()
            engine = QueryEngine.open(root, tiny_models["student"])
            server.attach(engine)
            assert check() == health_pb2.HealthCheckResponse.SERVING
    finally:
        server.stop(None)
        engine.close()


def test_client_retries_unavailable_with_backoff(root, tiny_models):
    """The server dies; the client sees UNAVAILABLE after its retries, and succeeds when the server comes back
    while it is still retrying."""
    engine = QueryEngine.open(root, tiny_models["student"])
    server, port = create_server(engine, max_workers=4)
    try:
        with SearchClient(f"127.0.0.1:{port}", timeout=2, retries=0) as client:
            assert client.info()["count"] == 80
            server.stop(None)
            with pytest.raises(ServerUnavailable):
                client.info()
            assert client.attempts == 2
        restarted = []
        threading.Timer(0.5, lambda: restarted.append(create_server(engine, max_workers=4, port=port))).start()
        with SearchClient(f"127.0.0.1:{port}", timeout=2, retries=8, backoff=0.1, max_backoff=0.5) as client:
            assert len(client.search_vector([1.0] * 16, k=2)) == 2
            assert client.attempts > 1  # it failed at least once, then got through
        _wait_for(lambda: restarted)
        restarted[0][0].stop(None)
    finally:
        server.stop(None)
        engine.close()


def test_admin_add_and_remove_publish_and_serve_new_versions(root, tiny_models, tmp_path, images):
    """AddImages embeds a folder with the teacher (the index stage's `add_images`), publishes a new version and
    the server swaps to it; RemoveImages likewise. Both through the client SDK with the token."""
    from asymsearch.core.synthetic import make_synthetic_dataset
    from asymsearch.server.admin import TeacherUpdater

    new = make_synthetic_dataset(tmp_path / "new", num_classes=2, per_class=3, size=48, seed=9)
    new_paths = sorted(str(p.resolve()) for p in new.rglob("*.jpg"))
    engine = QueryEngine.open(root, tiny_models["student"], max_k=200)
    server, port = create_server(engine, max_workers=8, admin=True, token=TOKEN, expose_paths=True,
                                 admin_roots=(str(tmp_path),), updater=TeacherUpdater(tiny_models["teacher"]))
    load = Load(port, images, threads=2)
    try:
        with SearchClient(f"127.0.0.1:{port}", token=TOKEN) as client:
            added = client.add_images(new)
            assert (added["index_version"], added["count"], added["changed"]) == ("v000002", 86, True)
            hits = client.search_image(new_paths[4], k=1)
            assert hits[0].path == new_paths[4] and hits[0].label == Path(new_paths[4]).parent.name
            new_ids = [h.id for h in client.search_image(new_paths[0], k=200) if h.path in new_paths]
            assert len(new_ids) == 6 and min(new_ids) >= 80  # new ids, never reused ones
            removed = client.remove_images([hits[0].id])
            assert (removed["index_version"], removed["count"]) == ("v000003", 85)
            assert new_paths[4] not in {h.path for h in client.search_image(new_paths[4], k=200)}
            with pytest.raises(Exception, match="not in the index"):
                client.remove_images([10**9])
            assert client.info()["index_version"] == "v000003"
    finally:
        load.stop()
        server.stop(None)
        engine.close()
    assert load.errors == []
    assert (root / "CURRENT").read_text().strip() == "v000003"
