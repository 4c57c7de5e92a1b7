"""Student tiers on one index, over a real channel to an in-process server on port 0: each tier answers with its
own model (checked against onnxruntime + brute force), Info lists the tiers with their cost and gate figures, a
tier swap under load loses no request, the gate refuses a bad student at start-up and at LoadStudent, and every
bad input (unknown tier, a vector of an unpaired student, a student of another teacher, an index without a probe
set, a path outside --admin-root) is followed by a good request that succeeds."""
from __future__ import annotations

import shutil
import sqlite3
import threading
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest
from conftest import make_linear_onnx, wait_until

from asymsearch.cli.main import main
from asymsearch.clients.client import OnDeviceClient, SearchClient
from asymsearch.core.data import list_image_folder
from asymsearch.core.manifest import ModelManifest, manifest_path_for
from asymsearch.core.preprocess import decode_image, preprocess
from asymsearch.index.build import build_index
from asymsearch.index.probe import PROBE_TABLE, GateRefused, NoProbeSet
from asymsearch.protos.v1 import search_pb2, search_pb2_grpc
from asymsearch.server.engine import QueryEngine
from asymsearch.server.service import create_server
from asymsearch.server.tiers import GatePolicy, onnx_gflops

TOKEN = "tier-token"


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_models) -> dict[str, Path]:
    """Students of teacher-a: two good ones at 32 px (server, server2), one at 16 px (mobile), one random."""
    out = tmp_path_factory.mktemp("tier-models")
    rng = np.random.default_rng(0)
    w = rng.normal(size=(48, 16))  # the teacher's weights (conftest draws them from the same seed first)
    rng = np.random.default_rng(11)
    make = lambda name, weight, **kw: make_linear_onnx(out / f"{name}.onnx", role="student",  # noqa: E731
                                                       teacher_id="teacher-a", weight=weight, model_id=name, **kw)
    return {**tiny_models,
            "server": make("server", w + 0.05 * rng.normal(size=w.shape)),
            "server2": make("server2", w + 0.08 * rng.normal(size=w.shape)),
            "mobile": make("mobile", w + 0.05 * rng.normal(size=w.shape), crop=16),
            "random": make("random", rng.normal(size=w.shape))}


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory, image_folder, tiny_models) -> Path:
    out = tmp_path_factory.mktemp("tiers") / "index"
    build_index(tiny_models["teacher"], image_folder, out, progress=False)
    return out


@pytest.fixture(scope="module")
def images(image_folder) -> list[bytes]:
    return [Path(it.path).read_bytes() for it in list_image_folder(image_folder)]


@pytest.fixture(scope="module")
def database(index_dir, images, tiny_models) -> np.ndarray:
    """The teacher's database vectors, computed here with a bare onnxruntime session (id i = listing order)."""
    return ort_embed(tiny_models["teacher"], images)


def ort_embed(onnx_path: Path, images: list[bytes]) -> np.ndarray:
    spec = ModelManifest.load(manifest_path_for(onnx_path)).preprocessing
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    x = np.stack([preprocess(decode_image(b, min_side=spec.resize), spec) for b in images]).astype(np.float32)
    v = session.run(None, {"images": x})[0]
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def brute_force(query: np.ndarray, database: np.ndarray, k: int) -> list[int]:
    scores = database @ query
    return [int(i) for i in np.argsort(-scores, kind="stable")[:k]]


@pytest.fixture
def served(index_dir, models, tmp_path):
    """A server with tiers server (default) and mobile, Admin on with --admin-root tmp_path."""
    engine = QueryEngine.open(index_dir, [("server", models["server"]), ("mobile", models["mobile"])], max_k=100,
                              gate=GatePolicy(0.95))
    server, port = create_server(engine, admin=True, token=TOKEN, admin_roots=(str(tmp_path),))
    yield engine, server, f"127.0.0.1:{port}"
    server.stop(None)
    engine.close()


def ids(hits) -> list[int]:
    return [h.id for h in hits]


def test_each_tier_answers_with_its_own_model(served, models, images, database):
    engine, server, address = served
    refs = {name: ort_embed(models[name], images[:12]) for name in ("server", "mobile")}
    differ = 0
    with SearchClient(address, timeout=30) as client:
        for i, data in enumerate(images[:12]):
            default = ids(client.search_image(data, k=5))
            by_tier = {name: ids(client.search_image(data, k=5, tier=name)) for name in ("server", "mobile")}
            for name in ("server", "mobile"):
                assert by_tier[name] == brute_force(refs[name][i], database, 5), (name, i)
            assert default == by_tier["server"]  # the first tier is the default
            differ += by_tier["server"] != by_tier["mobile"]
            # the same through BatchSearch and a stream, tier on each query
            batch = client.batch_search([data, data], k=5, tier="mobile")
            assert [ids(r) for r in batch] == [by_tier["mobile"]] * 2
            (tag, streamed), = list(client.stream_search([data], k=5, tier="mobile"))
            assert ids(streamed) == by_tier["mobile"]
    assert differ > 0  # the two students really differ, so a tier that were ignored would be caught
    text = server.metrics.text()
    assert 'asymsearch_tier_queries_total{kind="image",tier="mobile"}' in text
    assert 'asymsearch_tier_info{student_id="mobile",tier="mobile"} 1.0' in text
    assert 'asymsearch_tier_embed_seconds_count{tier="server"}' in text


def test_info_lists_the_tiers_with_cost_and_gate(served, models, index_dir):
    engine, _, address = served
    with SearchClient(address) as client:
        tiers = client.info()["tiers"]
    assert [t["name"] for t in tiers] == ["server", "mobile"]
    assert [t["student_id"] for t in tiers] == ["server", "mobile"]
    assert [t["image_size"] for t in tiers] == [32, 16]
    # one MatMul of (1, 48) by (48, 16): 2 * 48 * 16 FLOPs, whatever the input size (the pooling is not counted)
    assert [t["gflops"] for t in tiers] == [pytest.approx(2 * 48 * 16 / 1e9)] * 2
    assert onnx_gflops(models["teacher"], 32) == pytest.approx(2 * 48 * 16 / 1e9)
    assert all(t["measured_ms"] > 0 and t["gated"] for t in tiers)
    for t, tier in zip(tiers, engine.tiers):
        assert t["gate_recall_at_1"] == pytest.approx(tier.gate.recall_at_1)
        assert t["gate_teacher_recall_at_1"] == pytest.approx(tier.gate.teacher_recall_at_1)
        assert t["gate_teacher_recall_at_1"] > 0
        assert t["gate_recall_at_1"] >= 0.95 * t["gate_teacher_recall_at_1"]


def test_unknown_tier_is_invalid_argument_listing_the_tiers(served, images):
    _, _, address = served
    with grpc.insecure_channel(address) as ch:
        stub = search_pb2_grpc.SearchStub(ch)
        with pytest.raises(grpc.RpcError) as e:
            stub.SearchImage(search_pb2.ImageQuery(image=images[0], k=3, tier="gpu"), timeout=10)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "'gpu'" in e.value.details() and "server, mobile" in e.value.details()
        with pytest.raises(grpc.RpcError) as e:
            stub.SearchVector(search_pb2.VectorQuery(vector=[1.0] * 16, k=3, tier="gpu"), timeout=10)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        reply = stub.BatchSearch(search_pb2.BatchSearchRequest(queries=[
            search_pb2.Query(image=images[0], k=3, tag=1, tier="gpu"),
            search_pb2.Query(image=images[0], k=3, tag=2, tier="mobile")]), timeout=10)
        assert reply.results[0].code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
        assert "server, mobile" in reply.results[0].message
        assert reply.results[1].code == 0 and len(reply.results[1].reply.hits) == 3
        assert len(stub.SearchImage(search_pb2.ImageQuery(image=images[0], k=3), timeout=10).hits) == 3


def test_a_vector_of_an_unpaired_student_is_refused_naming_both_ids(served, models, images, database):
    _, _, address = served
    with grpc.insecure_channel(address) as ch:
        stub = search_pb2_grpc.SearchStub(ch)
        vector = ort_embed(models["mobile"], images[:1])[0]
        with pytest.raises(grpc.RpcError) as e:
            stub.SearchVector(search_pb2.VectorQuery(vector=vector.tolist(), k=3, student_id="student-of-teacher-b"),
                              timeout=10)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "student-of-teacher-b" in e.value.details() and "teacher-a" in e.value.details()
        reply = stub.BatchSearch(search_pb2.BatchSearchRequest(queries=[
            search_pb2.Query(vector=search_pb2.FloatVector(values=vector.tolist()), k=3, tag=1, student_id="x"),
            search_pb2.Query(vector=search_pb2.FloatVector(values=vector.tolist()), k=3, tag=2,
                             student_id="mobile")]), timeout=10)
        assert reply.results[0].code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
        assert [h.id for h in reply.results[1].reply.hits] == brute_force(vector, database, 3)
        good = stub.SearchVector(search_pb2.VectorQuery(vector=vector.tolist(), k=3, student_id="mobile"), timeout=10)
        assert [h.id for h in good.hits] == brute_force(vector, database, 3)
    # the on-device client sends its student's id: a student the server serves is answered ...
    with OnDeviceClient(models["mobile"], address, timeout=10) as client:
        assert ids(client.search(images[5], k=3)) == brute_force(ort_embed(models["mobile"], images[5:6])[0],
                                                                  database, 3)
    # ... one of the same teacher that the server never loaded is refused, naming it
    with OnDeviceClient(models["random"], address, timeout=10) as client:
        with pytest.raises(Exception, match="random"):
            client.search(images[5], k=3)


def test_tier_swap_under_load_loses_no_request(served, models, images, database, tmp_path):
    engine, server, address = served
    for name in ("server2", "random"):  # LoadStudent reads only under --admin-root (tmp_path)
        shutil.copy(models[name], tmp_path / f"{name}.onnx")
        shutil.copy(manifest_path_for(models[name]), tmp_path / f"{name}.json")
    errors: list[str] = []
    answered = [0]
    stop = threading.Event()

    def load(seed: int) -> None:
        rng = np.random.default_rng(seed)
        with grpc.insecure_channel(address) as ch:
            stub = search_pb2_grpc.SearchStub(ch)
            while not stop.is_set():
                try:
                    data = images[int(rng.integers(80))]
                    if rng.random() < 0.7:
                        r = stub.SearchImage(search_pb2.ImageQuery(image=data, k=5, tier="server"), timeout=30)
                    else:
                        r = stub.BatchSearch(search_pb2.BatchSearchRequest(queries=[
                            search_pb2.Query(image=data, k=5, tag=1, tier="server"),
                            search_pb2.Query(image=data, k=5, tag=2)]), timeout=30)
                        bad = [q for q in r.results if q.code != 0]
                        if bad:
                            errors.append(bad[0].message)
                    answered[0] += 1
                except grpc.RpcError as e:
                    errors.append(f"{e.code().name}: {e.details()}")

    threads = [threading.Thread(target=load, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    try:
        with SearchClient(address, token=TOKEN, timeout=60) as admin:
            for path in ("server2", "server", "server2"):
                n = answered[0]
                assert wait_until(lambda: answered[0] >= n + 10)
                onnx = tmp_path / "server2.onnx" if path == "server2" else models["server"]
                if path == "server":  # back to the first model: copy it under the admin root too
                    shutil.copy(models["server"], tmp_path / "server.onnx")
                    shutil.copy(manifest_path_for(models["server"]), tmp_path / "server.json")
                    onnx = tmp_path / "server.onnx"
                reply = admin.load_student("server", onnx)
                assert reply["changed"] and "replaced" in reply["message"] and "gate" in reply["message"]
            n = answered[0]
            assert wait_until(lambda: answered[0] >= n + 10)
            # a bad student of the same teacher: refused by the gate with both figures, the tier keeps serving
            with pytest.raises(Exception) as e:
                admin.load_student("server", tmp_path / "random.onnx")
            assert "FAILED_PRECONDITION" in str(e.value) and "fails the quality gate" in str(e.value)
            tier = engine.tier("server")
            assert f"{tier.gate.teacher_recall_at_1:.4f}" in str(e.value)
            assert tier.student_id == "server2"
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert errors == [] and answered[0] > 40
    # the swapped tier now answers with the new model, checked against onnxruntime
    with SearchClient(address) as client:
        ref = ort_embed(models["server2"], images[:5])
        for i in range(5):
            assert ids(client.search_image(images[i], k=5, tier="server")) == brute_force(ref[i], database, 5)
        assert [t["student_id"] for t in client.info()["tiers"]] == ["server2", "mobile"]
    text = server.metrics.text()
    assert 'asymsearch_tier_loads_total{result="loaded",tier="server"} 3.0' in text
    assert 'asymsearch_tier_loads_total{result="refused",tier="server"} 1.0' in text


def test_load_student_adds_a_tier_and_refuses_bad_inputs(served, models, images, tmp_path, database):
    engine, _, address = served
    for name in ("server2", "foreign_student"):
        shutil.copy(models[name], tmp_path / f"{name}.onnx")
        shutil.copy(manifest_path_for(models[name]), tmp_path / f"{name}.json")
    with SearchClient(address, token=TOKEN, timeout=30) as admin:
        # a student of another teacher: FAILED_PRECONDITION naming both teacher ids, nothing loaded
        with pytest.raises(Exception) as e:
            admin.load_student("int8", tmp_path / "foreign_student.onnx")
        assert "FAILED_PRECONDITION" in str(e.value) and "teacher-b" in str(e.value) and "teacher-a" in str(e.value)
        # outside --admin-root: PERMISSION_DENIED; no tier name: INVALID_ARGUMENT
        with pytest.raises(Exception, match="PERMISSION_DENIED"):
            admin.load_student("int8", models["server2"])
        with pytest.raises(Exception, match="tier name"):
            admin.load_student("", tmp_path / "server2.onnx")
        assert [t.name for t in engine.tiers] == ["server", "mobile"]
        # a good one under a new name: a third tier, answering with its model
        reply = admin.load_student("int8", tmp_path / "server2.onnx")
        assert "added" in reply["message"]
        assert [t["name"] for t in admin.info()["tiers"]] == ["server", "mobile", "int8"]
        ref = ort_embed(models["server2"], images[:1])[0]
        assert ids(admin.search_image(images[0], k=4, tier="int8")) == brute_force(ref, database, 4)


def test_the_gate_refuses_at_start_and_an_index_without_probe_set(index_dir, models, tmp_path, images):
    with pytest.raises(GateRefused) as e:
        QueryEngine.open(index_dir, [("server", models["server"]), ("bad", models["random"])],
                         gate=GatePolicy(0.95))
    assert "'bad'" in str(e.value) and "0.95" in str(e.value)
    bare = tmp_path / "bare"
    shutil.copytree(index_dir, bare)
    con = sqlite3.connect(bare / "meta.sqlite")
    with con:
        con.execute(f"DROP TABLE {PROBE_TABLE}")
    con.close()
    with pytest.raises(NoProbeSet, match="no probe set"):  # asked to gate: one line naming what is missing
        QueryEngine.open(bare, models["server"], gate=GatePolicy(0.95, required=True))
    # not asked: it serves ungated, and says so in Info; a random student loads since nothing measures it
    with QueryEngine.open(bare, [("default", models["random"])], gate=GatePolicy(0.95)) as engine:
        server, port = create_server(engine)
        try:
            with SearchClient(f"127.0.0.1:{port}") as client:
                (tier,) = client.info()["tiers"]
                assert tier["name"] == "default" and not tier["gated"] and tier["gate_recall_at_1"] == 0
                assert len(client.search_image(images[0], k=3)) == 3
        finally:
            server.stop(None)
    # a good student on the gated index after all of that
    with QueryEngine.open(index_dir, models["server"], gate=GatePolicy(0.95, required=True)) as engine:
        assert engine.tier().gate.ratio >= 0.95 and engine.tier().name == "default"


def test_serve_cli_refuses_bad_tier_specs(capsys, index_dir, models):
    """Each bad --student is one line (a usage error, or the gate's refusal with both figures) and exit 2."""
    for argv, needle in (
            (["--student", f"a={models['server']}", "--student", f"a={models['mobile']}"], "given twice"),
            (["--student", f"bad name={models['server']}"], "not valid"),
            (["--student", "x=/nonexistent/s.onnx"], "not found"),
            (["--student", str(models["random"]), "--port", "0"], "fails the quality gate")):
        try:
            code = main(["serve", "--index", str(index_dir), *argv])
        except SystemExit as e:  # argparse's usage error
            code = e.code
        assert code == 2
        errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
        assert len(errors) == 1 and needle in errors[0], errors
    assert "0.4875" in errors[0] or "teacher's" in errors[0]


def test_a_reload_to_a_rebuilt_index_gates_the_tiers_again(tmp_path, image_folder, tiny_models, models):
    root = tmp_path / "root"
    build_index(tiny_models["teacher"], image_folder, root, versioned=True, progress=False)
    with QueryEngine.open(root, [("server", models["server"])], gate=GatePolicy(0.95)) as engine:
        assert engine.tier("server").gate.count == 80
        build_index(tiny_models["teacher"], image_folder, root, classes="first-half", overwrite=True,
                    progress=False)  # v000002: another probe set, of 40 images
        assert engine.reload() == (True, "v000002")
        assert engine.tier("server").gate.count == 40 and engine.index.count == 40
        engine.gate = GatePolicy(10.0)  # a bar no student can pass: the next rebuilt index is refused
        build_index(tiny_models["teacher"], image_folder, root, overwrite=True, progress=False)
        with pytest.raises(GateRefused, match="'server'"):
            engine.reload()
        assert engine.index_version == "v000002" and engine.tier("server").gate.count == 40
