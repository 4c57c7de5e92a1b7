"""The query server in-process on port 0, over a real gRPC channel, checked against brute-force numpy search."""
from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from asymsearch.core.data import list_image_folder
from asymsearch.core.errors import PairingError
from asymsearch.core.ort import OnnxEmbedder
from asymsearch.core.preprocess import decode_image
from asymsearch.index.build import build_index
from asymsearch.protos.v1 import search_pb2, search_pb2_grpc
from asymsearch.server.engine import InvalidQuery, QueryEngine
from asymsearch.server.service import SERVICE_NAME, create_server

MAX_K = 50


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory, image_folder, tiny_models) -> Path:
    out = tmp_path_factory.mktemp("server") / "index"
    build_index(tiny_models["teacher"], image_folder, out, progress=False)
    return out


@pytest.fixture(scope="module")
def engine(index_dir, tiny_models):
    with QueryEngine.open(index_dir, tiny_models["student"], default_k=5, max_k=MAX_K) as engine:
        yield engine


@pytest.fixture(scope="module")
def channel(engine):
    server, port = create_server(engine, max_workers=4, expose_paths=True)
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        yield ch
    server.stop(None)


@pytest.fixture(scope="module")
def stub(channel):
    return search_pb2_grpc.SearchStub(channel)


@pytest.fixture(scope="module")
def reference(image_folder, tiny_models):
    """Independent of the index: every database image embedded by the teacher, and a student to embed queries."""
    items = list_image_folder(image_folder)
    teacher = OnnxEmbedder(tiny_models["teacher"])
    database = teacher.embed_images([decode_image(it.path) for it in items])
    return items, database, OnnxEmbedder(tiny_models["student"])


def brute_force(reference, query_path: str, k: int):
    """(ids, scores) of the top k by inner product; ids are listing positions, as the index builder assigns them."""
    items, database, student = reference
    q = student.embed_images([decode_image(query_path)])[0]
    q = q / np.linalg.norm(q)
    scores = database @ q
    order = np.argsort(-scores, kind="stable")[:k]
    return order, scores[order]


def test_foreign_student_refused(index_dir, tiny_models):
    with pytest.raises(PairingError) as e:
        QueryEngine.open(index_dir, tiny_models["foreign_student"])
    assert "teacher-a" in str(e.value) and "teacher-b" in str(e.value)


def test_teacher_serves_as_query_model(index_dir, tiny_models, image_folder):
    """Symmetric search: the teacher querying its own index finds the query image itself first."""
    path = list_image_folder(image_folder)[13].path
    with QueryEngine.open(index_dir, tiny_models["teacher"]) as engine:
        hit = engine.search_image(Path(path).read_bytes(), 1).hits[0]
    assert hit.id == 13 and hit.path == path and hit.score == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("position,k", [(0, 5), (37, 10), (79, MAX_K)])
def test_search_image_matches_brute_force(stub, reference, position, k):
    items = reference[0]
    query = items[position]
    reply = stub.SearchImage(search_pb2.ImageQuery(image=Path(query.path).read_bytes(), k=k))
    ids, scores = brute_force(reference, query.path, k)
    assert [h.id for h in reply.hits] == ids.tolist()
    np.testing.assert_allclose([h.score for h in reply.hits], scores, atol=1e-5)
    assert [(h.path, h.label) for h in reply.hits] == [(items[i].path, items[i].label) for i in ids]
    assert reply.embed_ms > 0 and reply.search_ms > 0


def test_k_zero_means_default_and_k_is_capped_by_count(stub, engine, reference):
    data = Path(reference[0][3].path).read_bytes()
    assert len(stub.SearchImage(search_pb2.ImageQuery(image=data)).hits) == engine.default_k
    with QueryEngine.open(engine.index.folder, engine.student.path, max_k=1000) as big:
        assert len(big.search_image(data, 1000).hits) == big.index.count == len(reference[0])


def test_search_vector_gives_the_same_hits(stub, reference):
    query = reference[0][21]
    student = reference[2]
    vector = student.embed_images([decode_image(query.path)])[0]
    by_image = stub.SearchImage(search_pb2.ImageQuery(image=Path(query.path).read_bytes(), k=8))
    # the server normalises: a scaled vector gives the same hits and scores
    by_vector = stub.SearchVector(search_pb2.VectorQuery(vector=(3.0 * vector).tolist(), k=8))
    assert [h.id for h in by_vector.hits] == [h.id for h in by_image.hits]
    np.testing.assert_allclose([h.score for h in by_vector.hits], [h.score for h in by_image.hits], atol=1e-5)
    assert [h.path for h in by_vector.hits] == [h.path for h in by_image.hits]
    assert by_vector.embed_ms == 0.0


def test_info(stub, engine, tiny_models):
    info = stub.Info(search_pb2.InfoRequest())
    assert (info.teacher_id, info.student_id) == ("teacher-a", "student-of-teacher-a")
    assert (info.dim, info.count, info.factory, info.metric) == (16, 80, "Flat", "inner_product")
    assert (info.max_k, info.default_k) == (MAX_K, 5)


def test_health_serving(channel):
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", SERVICE_NAME):
        reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    assert SERVICE_NAME == "asymsearch.v1.Search"


def _corrupt_jpeg(image_folder) -> bytes:
    data = Path(list_image_folder(image_folder)[0].path).read_bytes()
    return data[: len(data) // 2]  # truncated: the header parses, the pixels do not


BAD_REQUESTS = {
    "garbage bytes": ("SearchImage", lambda f: search_pb2.ImageQuery(image=b"definitely not an image", k=3),
                      "not a readable image"),
    "truncated jpeg": ("SearchImage", lambda f: search_pb2.ImageQuery(image=_corrupt_jpeg(f), k=3),
                       "not a readable image"),
    "empty image request": ("SearchImage", lambda f: search_pb2.ImageQuery(), "empty image"),
    "empty vector request": ("SearchVector", lambda f: search_pb2.VectorQuery(), "expected dim 16"),
    "wrong-size vector": ("SearchVector", lambda f: search_pb2.VectorQuery(vector=[0.1] * 15, k=3),
                          "expected dim 16"),
    "NaN vector": ("SearchVector", lambda f: search_pb2.VectorQuery(vector=[0.1] * 15 + [math.nan], k=3), "NaN"),
    "inf vector": ("SearchVector", lambda f: search_pb2.VectorQuery(vector=[math.inf] + [0.1] * 15, k=3),
                   "infinite"),
    "zero vector": ("SearchVector", lambda f: search_pb2.VectorQuery(vector=[0.0] * 16, k=3), "zero length"),
    "negative k": ("SearchVector", lambda f: search_pb2.VectorQuery(vector=[0.1] * 16, k=-1), "k must be positive"),
    "k above max_k": ("SearchImage",
                      lambda f: search_pb2.ImageQuery(image=Path(list_image_folder(f)[0].path).read_bytes(),
                                                      k=MAX_K + 1), f"max_k of {MAX_K}"),
}


@pytest.mark.parametrize("name", BAD_REQUESTS)
def test_invalid_requests_are_refused_and_the_server_keeps_serving(stub, image_folder, reference, name):
    method, make, message = BAD_REQUESTS[name]
    with pytest.raises(grpc.RpcError) as e:
        getattr(stub, method)(make(image_folder), timeout=10)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in e.value.details()
    good = stub.SearchImage(search_pb2.ImageQuery(image=Path(reference[0][0].path).read_bytes(), k=3), timeout=10)
    assert [h.id for h in good.hits] == brute_force(reference, reference[0][0].path, 3)[0].tolist()


def test_oversized_image_is_refused(engine, reference):
    with QueryEngine.open(engine.index.folder, engine.student.path, max_pixels=47 * 47) as small:
        with pytest.raises(InvalidQuery, match="exceeds the limit"):
            small.search_image(Path(reference[0][0].path).read_bytes(), 3)


def test_unexpected_error_is_internal_and_server_keeps_serving(index_dir, tiny_models, caplog):
    """The student breaks on images with an unexpected error: INTERNAL without the details, vectors still work."""
    with QueryEngine.open(index_dir, tiny_models["student"]) as broken:
        def embed_prepared(pixels):
            raise RuntimeError("disk on fire")
        broken.embed_prepared = embed_prepared
        server, port = create_server(broken, max_workers=2)
        try:
            with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
                stub = search_pb2_grpc.SearchStub(ch)
                with pytest.raises(grpc.RpcError) as e:
                    stub.SearchImage(search_pb2.ImageQuery(image=_png(8, 8), k=1), timeout=10)
                assert e.value.code() == grpc.StatusCode.INTERNAL
                assert "disk on fire" not in e.value.details()  # details stay in the log
                assert len(stub.SearchVector(search_pb2.VectorQuery(vector=[1.0] * 16, k=2), timeout=10).hits) == 2
        finally:
            server.stop(None)
    assert "disk on fire" in caplog.text


def _png(w: int, h: int) -> bytes:
    import io
    from PIL import Image
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (200, 30, 30)).save(buf, "PNG")
    return buf.getvalue()


def test_serve_runs_until_sigterm(index_dir, tiny_models):
    """`serve` in its own process: it logs its port, answers, and exits cleanly on SIGTERM."""
    code = ("import logging, sys; logging.basicConfig(level=logging.INFO, stream=sys.stderr);"
            "from asymsearch.server.service import serve;"
            f"serve({str(index_dir)!r}, {str(tiny_models['student'])!r}, host='127.0.0.1', port=0)")
    proc = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        port, deadline, lines = None, time.monotonic() + 60, []
        while port is None and time.monotonic() < deadline:
            line = proc.stderr.readline()
            if not line:
                break
            lines.append(line)
            if m := re.search(r"serving 80 items on 127\.0\.0\.1:(\d+)", line):
                port = int(m.group(1))
        assert port, "".join(lines)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            info = search_pb2_grpc.SearchStub(ch).Info(search_pb2.InfoRequest(), timeout=10)
        assert info.count == 80
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()


def test_serve_refuses_foreign_student(index_dir, tiny_models):
    from asymsearch.server.service import serve
    with pytest.raises(PairingError, match="teacher-b"):
        serve(index_dir, tiny_models["foreign_student"], port=0)


def test_serving_side_does_not_import_torch():
    code = ("import sys; import asymsearch.server.service, asymsearch.clients.client; "
            "sys.exit('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0, "server/ or clients/ imports torch"


def test_busy_port_is_a_user_error(engine):
    from asymsearch.core.errors import UserError
    server, port = create_server(engine, max_workers=1)
    try:
        with pytest.raises(UserError, match=f"cannot listen on 127.0.0.1:{port}"):
            create_server(engine, port=port, max_workers=1)
    finally:
        server.stop(None)


def test_metrics_over_http_and_reflection(engine, reference):
    """/metrics answers over HTTP with the request, stage, batch, queue and index series; reflection lists the
    services (what grpcurl uses)."""
    import urllib.request

    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    server, port = create_server(engine, max_workers=4, metrics_port=0)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = search_pb2_grpc.SearchStub(ch)
            stub.SearchImage(search_pb2.ImageQuery(image=Path(reference[0][0].path).read_bytes(), k=3), timeout=10)
            with pytest.raises(grpc.RpcError):
                stub.SearchVector(search_pb2.VectorQuery(vector=[1.0], k=3), timeout=10)
            services = set(ProtoReflectionDescriptorDatabase(ch).get_services())
            assert {SERVICE_NAME, "grpc.health.v1.Health"} <= services
            assert "asymsearch.v1.Admin" not in services  # off unless enabled
        text = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10).read().decode()
    finally:
        server.stop(None)
    for line in ('asymsearch_requests_total{code="OK",method="SearchImage"} 1.0',
                 'asymsearch_requests_total{code="INVALID_ARGUMENT",method="SearchVector"} 1.0',
                 'asymsearch_stage_seconds_count{stage="decode"} 1.0',
                 'asymsearch_stage_seconds_count{stage="embed"} 1.0',
                 'asymsearch_stage_seconds_count{stage="search"} 1.0',
                 'asymsearch_batch_size_count{stage="search"} 1.0',
                 'asymsearch_queue_depth 0.0',
                 'asymsearch_index_info{teacher_id="teacher-a",version=""} 1.0',
                 'asymsearch_index_items 80.0'):
        assert line in text, line


def test_json_logs_carry_the_event_fields():
    import json
    import logging

    from asymsearch.server.logs import JsonFormatter
    record = logging.LogRecord("asymsearch.server", logging.INFO, __file__, 1, "now serving %s", ("v000002",), None)
    record.event, record.version = "index_swapped", "v000002"
    line = json.loads(JsonFormatter().format(record))
    assert line["message"] == "now serving v000002" and line["level"] == "info"
    assert (line["event"], line["version"], line["logger"]) == ("index_swapped", "v000002", "asymsearch.server")


def test_sigterm_under_load_drains_without_errors(index_dir, tiny_models, reference):
    """`asymsearch serve` in its own process under a steady client load gets SIGTERM: every request sent before
    the signal succeeds (drained, not dropped); later ones succeed or are refused (UNAVAILABLE, or CANCELLED when
    they race with grpc's own shutdown); the process exits 0."""
    import threading
    proc = subprocess.Popen([sys.executable, "-m", "asymsearch.cli.main", "serve", "--index", str(index_dir),
                             "--student", str(tiny_models["student"]), "--host", "127.0.0.1", "--port", "0",
                             "--log-format", "json", "--drain-s", "10"],
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        port, deadline, lines = None, time.monotonic() + 60, []
        while port is None and time.monotonic() < deadline:
            line = proc.stderr.readline()
            if not line:
                break
            lines.append(line)
            if '"event": "serving"' in line:
                port = json.loads(line)["port"]
        assert port, "".join(lines)
        data = Path(reference[0][5].path).read_bytes()
        calls: list[tuple[float, str]] = []  # (start time, "CODE: details")
        stop = threading.Event()

        def load():
            with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
                stub = search_pb2_grpc.SearchStub(ch)
                while not stop.is_set():
                    started = time.monotonic()
                    try:
                        stub.SearchImage(search_pb2.ImageQuery(image=data, k=3), timeout=10)
                        calls.append((started, "OK"))
                    except grpc.RpcError as e:
                        calls.append((started, f"{e.code().name}: {e.details()}"))
                        time.sleep(0.01)
        threads = [threading.Thread(target=load) for _ in range(3)]
        for t in threads:
            t.start()
        while len(calls) < 30:
            time.sleep(0.01)
        signalled = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        stop.set()
        for t in threads:
            t.join(30)
        before = [c for t, c in calls if t < signalled]
        after = {c.split(":")[0] for t, c in calls if t >= signalled}
        assert len(before) >= 30 and set(before) == {"OK"}, set(before)
        assert after <= {"OK", "UNAVAILABLE", "CANCELLED"}, after
        tail = proc.stderr.read()
        assert '"event": "draining"' in tail and '"event": "stopped"' in tail
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
