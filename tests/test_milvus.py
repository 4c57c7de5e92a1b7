"""Milvus as the index store, on Milvus Lite started by the tests (in this process, no Docker): build, add, remove,
search against faiss Flat and brute force, filters, alias swap under load with the server in-process on port 0,
rollback, teacher-id refusal, an unreachable address.

One Milvus Lite file per module (opening one costs about 0.3 s; each test uses its own alias in it).
"""
from __future__ import annotations

import shutil
import subprocess
import sys
import threading
from pathlib import Path

import grpc
import numpy as np
import pytest
from conftest import make_linear_onnx, wait_until
from test_hot_swap import Load
from grpc_health.v1 import health_pb2, health_pb2_grpc

pytest.importorskip("pymilvus", reason="the `milvus` extra: pip install 'asymsearch[milvus]'")
pytest.importorskip("milvus_lite", reason="the `milvus` extra: pip install 'asymsearch[milvus]'")

from asymsearch.clients.client import SearchClient  # noqa: E402
from asymsearch.core.errors import PairingError, UserError  # noqa: E402
from asymsearch.index import milvus  # noqa: E402
from asymsearch.index.backend import IndexStore, current_id, open_index  # noqa: E402
from asymsearch.index.build import build_index  # noqa: E402
from asymsearch.index.store import SearchIndex  # noqa: E402
from asymsearch.index.update import add_images, remove_ids, rollback  # noqa: E402
from asymsearch.protos.v1 import search_pb2, search_pb2_grpc  # noqa: E402
from asymsearch.server.engine import QueryEngine  # noqa: E402
from asymsearch.server.service import create_server  # noqa: E402


@pytest.fixture(scope="module")
def lite(tmp_path_factory) -> str:
    """The module's Milvus Lite file, as a location prefix: f"{lite}/NAME"."""
    return f"milvus-lite://{tmp_path_factory.mktemp('milvus') / 'test.db'}"


@pytest.fixture(scope="module")
def built(lite, tiny_models, image_folder, tmp_path_factory):
    """The 80 test images in a Milvus collection 'flat' and in a faiss Flat folder, by the same build."""
    loc = f"{lite}/flat"
    m = build_index(tiny_models["teacher"], image_folder, loc, progress=False)
    folder = tmp_path_factory.mktemp("faiss") / "flat"
    build_index(tiny_models["teacher"], image_folder, folder, progress=False)
    return {"loc": loc, "manifest": m, "faiss": folder}


def test_locations_parse_and_bad_ones_name_the_forms(tmp_path):
    loc = milvus.parse_location(f"milvus-lite://{tmp_path}/a.db/coll_1")
    assert (loc.uri, loc.name, loc.lite) == (str(tmp_path / "a.db"), "coll_1", True)
    assert milvus.parse_location(f"milvus-lite://{tmp_path}/a.db").name == milvus.DEFAULT_LITE_NAME
    cluster = milvus.parse_location("milvus://db.example:19530/images")
    assert (cluster.uri, cluster.name, cluster.lite) == ("http://db.example:19530", "images", False)
    for bad in ("milvus://host/images", "milvus://host:19530/", "milvus://h:1/bad-name", "milvus-lite:///x/file",
                "milvus://h:1/a__v1"):
        with pytest.raises(UserError, match="milvus"):
            milvus.parse_location(bad)


def test_factories_map_to_milvus_index_types():
    assert milvus.milvus_index("Flat", {}) == ("FLAT", {}, {})
    assert milvus.milvus_index("IVF64,Flat", {"nprobe": 8}) == ("IVF_FLAT", {"nlist": 64}, {"nprobe": 8})
    assert milvus.milvus_index("HNSW16", {"efSearch": 64})[::2] == ("HNSW", {"ef": 64})
    with pytest.raises(UserError, match="no Milvus counterpart"):
        milvus.milvus_index("IVF64,PQ8", {})
    with pytest.raises(UserError, match="does not apply"):
        milvus.milvus_index("Flat", {"nprobe": 4})


def test_build_records_the_manifest_and_matches_faiss_flat_and_brute_force(built):
    with open_index(built["loc"]) as index, SearchIndex.open(built["faiss"]) as flat:
        assert isinstance(index, IndexStore) and isinstance(flat, IndexStore)
        m = index.manifest
        assert (index.count, index.dim, index.teacher_id, m.factory) == (80, flat.dim, "teacher-a", "Flat")
        assert m.build["preprocessing"] == flat.manifest.build.get("preprocessing", m.build["preprocessing"])
        assert m.build["preprocessing"]["crop"] > 0 and m.build["milvus"]["index_type"] == "FLAT"
        assert index.version == "flat__v000001" and current_id(built["loc"]) == index.manifest_id
        assert np.array_equal(index.ids(), np.arange(80))
        assert index.lookup_records(index.ids()) == flat.lookup_records(flat.ids())
        vectors = np.stack([flat._index.reconstruct(i) for i in range(80)])  # the stored teacher embeddings
        queries = np.random.default_rng(3).normal(size=(12, index.dim)).astype(np.float32)
        queries /= np.linalg.norm(queries, axis=1, keepdims=True)
        s_m, i_m = index.search(queries, 10)
        s_f, i_f = flat.search(queries, 10)
        brute = np.argsort(-(queries @ vectors.T), axis=1, kind="stable")[:, :10]
        assert np.array_equal(i_m, i_f) and np.array_equal(i_m, brute)
        np.testing.assert_allclose(s_m, s_f, atol=1e-5)
        with pytest.raises(KeyError):
            index.lookup_records([0, 999])


def test_a_second_build_without_overwrite_is_refused(built, tiny_models, image_folder):
    with pytest.raises(UserError, match="already holds an index"):
        build_index(tiny_models["teacher"], image_folder, built["loc"], progress=False)


class FakeFilter:
    """What `asymsearch.core.filters.Filter` offers the backend: its Milvus expression."""

    def __init__(self, expr: str) -> None:
        self.expr = expr

    def to_milvus(self) -> str:
        return self.expr


def test_filters_return_k_results_equal_to_brute_force_over_the_subset(built):
    with open_index(built["loc"]) as index, SearchIndex.open(built["faiss"]) as flat:
        records = flat.lookup_records(flat.ids())
        vectors = np.stack([flat._index.reconstruct(i) for i in range(80)])
        q = vectors[5:6]
        subset = np.array([r["id"] for r in records if r["label"] in ("class_01", "class_03")])
        scores, ids = index.search(q, 10, filter=FakeFilter('label in ["class_01", "class_03"]'))
        expect = subset[np.argsort(-(q @ vectors[subset].T)[0], kind="stable")[:10]]
        assert ids[0].tolist() == expect.tolist()
        _, ids = index.search(q, 5, filter=FakeFilter('label == "class_02" and id >= 25'))
        assert set(ids[0].tolist()) == {25, 26, 27, 28, 29}
        _, ids = index.search(q, 10, filter=FakeFilter('label == "nothing"'))
        assert (ids == -1).all()


def test_add_and_remove_change_the_live_collection_and_foreign_teachers_are_refused(lite, tiny_models,
                                                                                   image_folder, tmp_path):
    loc = f"{lite}/updates"
    build_index(tiny_models["teacher"], image_folder, loc, classes="first-half", progress=False)
    before = current_id(loc)
    new = tmp_path / "new"
    shutil.copytree(image_folder / "class_07", new / 'clåss "07"')  # non-ASCII and a quote in every path
    result = add_images(loc, tiny_models["teacher"], new)
    assert result.changed and result.manifest.count == 50 and result.version == "updates__v000001"
    assert result.manifest.build["history"][-1]["first_id"] == 40 and current_id(loc) != before
    with open_index(loc) as index:
        assert index.count == 50 and np.array_equal(index.ids(), np.arange(50))
        assert {r["label"] for r in index.lookup_records(range(40, 50))} == {'clåss "07"'}
    with pytest.raises(UserError, match="already in the index"):
        add_images(loc, tiny_models["teacher"], new)
    foreign = make_linear_onnx(tmp_path / "t2.onnx", role="teacher", teacher_id="teacher-b",
                               weight=np.random.default_rng(9).normal(size=(48, 16)))
    with pytest.raises(PairingError, match="teacher-b"):
        add_images(loc, foreign, image_folder / "class_06")
    with pytest.raises(UserError, match="not in the index"):
        remove_ids(loc, [3, 500])
    result = remove_ids(loc, [3, 41])
    assert result.changed and result.manifest.count == 48
    with open_index(loc) as index:
        assert 3 not in index.ids() and 41 not in index.ids() and index.count == 48
        _, ids = index.search(np.ones((1, index.dim), np.float32) / 4, 48)
        assert set(ids[0].tolist()) == set(range(50)) - {3, 41}
    assert not remove_ids(loc, [3, 41]).changed  # the same remove again: nothing to do
    with open_index(loc) as index:  # the next add takes ids after every id ever given
        assert index.manifest.build["next_id"] == 50


def test_ivf_full_probing_agrees_with_faiss_flat(lite, built, tiny_models, image_folder):
    loc = f"{lite}/ivf"
    m = build_index(tiny_models["teacher"], image_folder, loc, factory="IVF4,Flat", search_params={"nprobe": 4},
                    progress=False)
    assert m.build["milvus"] == {"collection": "ivf__v000001", "index_type": "IVF_FLAT", "params": {"nlist": 4}}
    with open_index(loc) as index, SearchIndex.open(built["faiss"]) as flat:
        queries = np.random.default_rng(4).normal(size=(20, index.dim)).astype(np.float32)
        assert np.array_equal(index.search(queries, 10)[1], flat.search(queries, 10)[1])


def test_serving_a_student_of_another_teacher_is_refused_with_both_ids(built, tiny_models):
    with pytest.raises(PairingError, match="teacher-b.*teacher-a|teacher-a.*teacher-b"):
        QueryEngine.open(built["loc"], tiny_models["foreign_student"])


def test_a_collection_without_a_manifest_is_refused(lite):
    loc = milvus.parse_location(f"{lite}/stranger")
    client = milvus.connect(loc)
    client.create_collection("stranger__v000001", dimension=16)
    client.create_alias("stranger__v000001", "stranger")
    with pytest.raises(UserError, match="no asymsearch manifest"):
        open_index(str(loc))


def test_an_unreachable_address_is_unavailable_naming_it():
    with pytest.raises(milvus.MilvusUnavailable, match="127.0.0.1:9.*does not answer after 2 tries"):
        open_index("milvus://127.0.0.1:9/images", attempts=2)


@pytest.fixture(scope="module")
def images(image_folder) -> list[bytes]:
    return [p.read_bytes() for p in sorted(image_folder.rglob("*.jpg"))]


def test_alias_swap_under_load_without_a_failed_request_then_rollback(lite, tiny_models, image_folder, images):
    loc = f"{lite}/swap"
    build_index(tiny_models["teacher"], image_folder, loc, progress=False)
    engine = QueryEngine.open(loc, tiny_models["student"])
    assert engine.index_version == "swap__v000001"
    server, port = create_server(engine, max_workers=16, follow_current=True, poll_s=0.05, expose_paths=True)
    load = Load(port, images)
    try:
        assert wait_until(lambda: len(load.versions) >= 20)
        build_index(tiny_models["teacher"], image_folder, loc, classes="first-half", overwrite=True,
                    progress=False)
        assert wait_until(lambda: engine.index_version == "swap__v000002")
        n = len(load.versions)
        assert wait_until(lambda: len(load.versions) >= n + 20)
        rollback(loc, "1")
        assert wait_until(lambda: engine.index_version == "swap__v000001")
        n = len(load.versions)
        assert wait_until(lambda: len(load.versions) >= n + 20)
    finally:
        load.stop()
    try:
        assert load.errors == []
        seen = list(dict.fromkeys(load.versions))
        assert seen == ["swap__v000001", "swap__v000002"]  # then back to the first (rollback)
        assert load.versions[-1] == "swap__v000001"
        with SearchClient(f"127.0.0.1:{port}") as client:
            info = client.info()
            assert (info["index_version"], info["count"], info["backend"]) == ("swap__v000001", 80, "milvus")
            assert len(client.search_image(images[0], k=80)) == 80
    finally:
        server.stop(None)
        engine.close()


def test_store_unavailable_turns_health_not_serving_and_queries_unavailable(lite, built, tiny_models, images,
                                                                            monkeypatch):
    engine = QueryEngine.open(built["loc"], tiny_models["student"])
    server, port = create_server(engine, follow_current=True, poll_s=0.05)
    down = threading.Event()
    real_search, real_current = milvus.MilvusIndex.search, milvus.current_id

    def search(self, *a, **kw):
        if down.is_set():
            raise milvus.MilvusUnavailable(f"Milvus at {self.location.address} did not answer search: gone")
        return real_search(self, *a, **kw)

    def current(location):
        if down.is_set():
            raise milvus.MilvusUnavailable("Milvus at Milvus Lite test.db did not answer list_aliases: gone")
        return real_current(location)

    monkeypatch.setattr(milvus.MilvusIndex, "search", search)
    monkeypatch.setattr(milvus, "current_id", current)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    health = health_pb2_grpc.HealthStub(channel)

    def status() -> int:
        return health.Check(health_pb2.HealthCheckRequest(service="")).status

    try:
        with SearchClient(f"127.0.0.1:{port}", retries=0) as client:
            assert client.search_image(images[0], k=3)
            down.set()
            assert wait_until(lambda: status() == health_pb2.HealthCheckResponse.NOT_SERVING)
            with pytest.raises(Exception) as e:
                client.search_image(images[0], k=3)
            assert "UNAVAILABLE" in repr(e.value) or "unavailable" in str(e.value).lower()
            assert "did not answer" in str(e.value)
            down.clear()
            assert wait_until(lambda: status() == health_pb2.HealthCheckResponse.SERVING)
            assert client.search_image(images[0], k=3)  # the good request after the outage
    finally:
        channel.close()
        server.stop(None)
        engine.close()


def test_the_cli_builds_adds_removes_rolls_back_describes_and_evaluates_a_milvus_location(
        lite, built, tiny_models, image_folder, tmp_path, capsys):
    import json

    from asymsearch.cli.main import main
    loc, teacher = f"{lite}/cli", str(tiny_models["teacher"])
    assert main(["index", "build", "--teacher", teacher, "--images", str(image_folder), "--out", loc,
                 "--classes", "first-half"]) == 0
    assert "40 images, Flat" in capsys.readouterr().out
    new = tmp_path / "new"
    shutil.copytree(image_folder / "class_06", new / "class_06")
    assert main(["index", "add", "--index", loc, "--teacher", teacher, "--images", str(new)]) == 0
    assert main(["index", "remove", "--index", loc, "--ids", "0,1"]) == 0
    capsys.readouterr()
    assert main(["index", "info", "--index", loc]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["count"], info["version"], info["teacher_id"], info["next_id"]) == (48, "cli__v000001",
                                                                                     "teacher-a", 50)
    assert [c["op"] for c in info["history"]] == ["add", "remove"]
    assert main(["index", "build", "--teacher", teacher, "--images", str(image_folder), "--out", loc,
                 "--overwrite"]) == 0
    assert main(["index", "rollback", loc, "1"]) == 0
    assert "alias now names cli__v000001 (was cli__v000002), 48 images" in capsys.readouterr().out
    assert main(["eval", "--data", str(image_folder), "--teacher", teacher, "--student",
                 str(tiny_models["student"]), "--index", built["loc"], "--json"]) == 0
    via_milvus = json.loads(capsys.readouterr().out)["student_teacher"]
    assert main(["eval", "--data", str(image_folder), "--teacher", teacher, "--student",
                 str(tiny_models["student"]), "--json"]) == 0
    in_memory = json.loads(capsys.readouterr().out)["student_teacher"]
    assert via_milvus == pytest.approx(in_memory, abs=1e-6)  # a Flat collection ranks as exact search does
    with pytest.raises(SystemExit) as e:
        main(["index", "info", "--index", "milvus://nohost/x"])
    assert e.value.code == 2 and "not of the form" in capsys.readouterr().err
    assert main(["index", "info", "--index", "milvus://127.0.0.1:9/x"]) == 2
    assert "127.0.0.1:9" in capsys.readouterr().err.strip().splitlines()[-1]


RAY_BUILD = """
import sys
import time
import numpy as np
import ray
t=time.perf_counter()
ray.init(num_cpus=2, object_store_memory=80 * 1024 * 1024, include_dashboard=False, log_to_driver=False, configure_logging=False)
print("ray init", time.perf_counter()-t, flush=True)
from asymsearch.index import milvus
from asymsearch.index.backend import open_index
from asymsearch.index.build import build_index
teacher, images, db = sys.argv[1:4]
calls = []
real = milvus.insert_rows
milvus.insert_rows = lambda *a, **kw: (calls.append(1), real(*a, **kw))
m = build_index(teacher, images, f"milvus-lite://{db}/ray", batch_size=8, shard_size=24, engine="ray", progress=False)
ray.shutdown()
milvus.insert_rows = real
assert calls == [], "the driver inserted rows"
build_index(teacher, images, f"milvus-lite://{db}/local", batch_size=8, shard_size=24, progress=False)
with open_index(f"milvus-lite://{db}/ray") as a, open_index(f"milvus-lite://{db}/local") as b:
    assert a.count == b.count == m.count and m.build["engine"] == "ray"
    assert a.lookup_records(a.ids()) == b.lookup_records(b.ids())
    q = np.random.default_rng(0).normal(size=(10, a.dim)).astype(np.float32)
    (sa, ia), (sb, ib) = a.search(q, 10), b.search(q, 10)
    assert np.array_equal(ia, ib) and np.allclose(sa, sb, atol=1e-5)
print("OK", m.count, time.perf_counter()-t)
"""


def test_an_item_removed_in_place_between_a_search_and_its_lookup_is_left_out_not_an_error(lite, tiny_models,
                                                                                        image_folder):
    """On Milvus a removal deletes from the served collection itself (no new version to swap), so it can land
    between a query's search and its path/label lookup; the query then answers without that item, and the next
    query is served as usual (CI saw this race as INTERNAL once)."""
    loc = f"{lite}/race"
    build_index(tiny_models["teacher"], image_folder, loc, classes="first-half", progress=False)
    engine = QueryEngine.open(loc, tiny_models["student"], max_k=50)
    try:
        with engine.using_index() as served:
            index, search = served.index, served.index.search
        removed: list[int] = []

        def search_then_remove(vectors, k, **kw):
            scores, ids = search(vectors, k, **kw)
            if not removed:
                removed.append(int(ids[0, 0]))
                remove_ids(loc, removed)  # in place, after the search saw the item
            return scores, ids

        index.search = search_then_remove
        query = np.ones(index.dim, np.float32)
        result = engine.search_vector(query, 5)
        assert removed and len(result.hits) == 4 and removed[0] not in {h.id for h in result.hits}
        with pytest.raises(KeyError):
            index.lookup_records(removed)  # the lookup the engine made: the item is gone
        assert index.lookup_records([removed[0], result.hits[0].id], skip_missing=True)[0]["id"] == result.hits[0].id
        again = engine.search_vector(query, 5)
        assert len(again.hits) == 5 and removed[0] not in {h.id for h in again.hits}
    finally:
        engine.close()


def test_a_ray_build_writes_from_the_workers_and_equals_the_local_build(tiny_models, image_folder, tmp_path):
    """In a fresh process: Ray must start before a Milvus Lite server's gRPC threads exist in the process (its
    fork of the GCS otherwise times out), so this build runs where Ray starts first."""
    pytest.importorskip("ray", reason="Ray is the `distributed` extra: pip install 'ray[data]'")
    script = tmp_path / "ray_build.py"
    script.write_text(RAY_BUILD)
    r = subprocess.run([sys.executable, str(script), str(tiny_models["teacher"]), str(image_folder),
                        str(tmp_path / "ray.db")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "OK 80" in r.stdout, r.stderr[-3000:]


def test_metadata_filters_of_the_grammar_match_brute_force_over_the_subset(lite, tiny_models, image_folder,
                                                                           tmp_path):
    filters = pytest.importorskip("asymsearch.core.filters", reason="the filter grammar (core/filters.py)")
    items = sorted(image_folder.rglob("*.jpg"))
    import csv
    shops = ["north", "south", 'we"st']
    meta = tmp_path / "meta.csv"
    with open(meta, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "shop", "price"])
        for i, p in enumerate(items):
            w.writerow([p.relative_to(image_folder), shops[i % 3], i % 7 if i % 5 else "n/a"])
    loc = f"{lite}/filtered"
    build_index(tiny_models["teacher"], image_folder, loc, metadata=meta, progress=False)
    with open_index(loc) as index:
        records = index.lookup_records(index.ids())
        assert all("asym_num" not in r and "vector" not in r for r in records)
        assert {r["shop"] for r in records} == {"north", "south", 'we"st'}
        q = np.random.default_rng(7).normal(size=(1, index.dim)).astype(np.float32)
        _, order = index.search(q, 80)
        scores_all = dict(zip(order[0].tolist(), range(80)))  # exact ranking of every item (FLAT)
        assert index.filter_fields == ("label", "price", "shop")
        fields, sizes = list(index.filter_fields), []
        for text in ('shop = "north" and price < 5', 'not (shop != \'we"st\') or label in ("class_02")',
                     'price >= 3 and not shop in ("south", "north")', 'shop = "x\\" or label != \\"y"',
                     "price = 2", "not price = 2"):
            f = filters.parse_filter(text, fields)
            subset = [r["id"] for r in records if f.matches(r)]
            expect = sorted(subset, key=scores_all.get)[:10]
            _, ids = index.search(q, 10, filter=f)
            got = [i for i in ids[0].tolist() if i >= 0]
            assert got == expect, (text, got, expect)
            sizes.append(len(subset))
        assert all(n < 80 for n in sizes) and sum(n >= 10 for n in sizes) >= 3, sizes  # real subsets, k reachable
        with pytest.raises(UserError, match="fields are: label, price, shop"):  # parsed for another index
            index.search(q, 10, filter=filters.parse_filter('colour = "red"', ["label", "colour"]))
        _, ids = index.search(q, 10, filter=filters.parse_filter("price = 2", fields))  # and it still answers
        assert (ids >= 0).sum() > 0


def test_filters_over_the_wire_on_a_milvus_served_index(lite, built, tiny_models):
    filters = pytest.importorskip("asymsearch.core.filters", reason="the filter grammar (core/filters.py)")
    engine = QueryEngine.open(built["loc"], tiny_models["student"])
    server, port = create_server(engine, expose_paths=True)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    stub = search_pb2_grpc.SearchStub(channel)
    try:
        with open_index(built["loc"]) as index:
            records = {r["id"]: r for r in index.lookup_records(index.ids())}
            v = np.random.default_rng(11).normal(size=16).astype(np.float32)
            q = (v / np.linalg.norm(v))[None]
            _, everything = index.search(q, 80)
        text = 'label in ("class_01", "class_05") and not label = "class_05"'
        f = filters.parse_filter(text, ["label"])
        expect = [i for i in everything[0].tolist() if f.matches(records[i])][:10]
        r = stub.SearchVector(search_pb2.VectorQuery(vector=v.tolist(), k=10, filter=text), timeout=30)
        assert [h.id for h in r.hits] == expect and len(expect) == 10
        assert {h.label for h in r.hits} == {"class_01"}
        for bad in ('label = "a" or', 'colour = "red"', 'label = "x"; drop collection flat__v000001'):
            with pytest.raises(grpc.RpcError) as e:
                stub.SearchVector(search_pb2.VectorQuery(vector=v.tolist(), k=10, filter=bad), timeout=30)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value.details()
        r = stub.SearchVector(search_pb2.VectorQuery(vector=v.tolist(), k=10), timeout=30)  # still serving
        assert [h.id for h in r.hits] == everything[0].tolist()[:10]
    finally:
        channel.close()
        server.stop(None)
        engine.close()


def test_a_collection_of_another_dimension_is_refused_at_start(lite, tiny_models, image_folder, tmp_path):
    wide = make_linear_onnx(tmp_path / "wide.onnx", role="teacher", teacher_id="teacher-a",
                            weight=np.random.default_rng(2).normal(size=(48, 24)))
    loc = f"{lite}/wide"
    build_index(wide, image_folder, loc, classes="first-half", progress=False)
    with pytest.raises(PairingError, match="16 dimensions.*24"):
        QueryEngine.open(loc, tiny_models["student"])


def test_keep_drops_versions_older_than_the_live_one_beyond_it(lite, tiny_models, image_folder):
    loc = f"{lite}/pruned"
    for n in range(3):
        build_index(tiny_models["teacher"], image_folder, loc, classes="first-half", overwrite=n > 0, keep=2,
                    progress=False)
    assert rollback(loc, "2")[0].version == "pruned__v000002"  # a kept version
    build_index(tiny_models["teacher"], image_folder, loc, classes="first-half", overwrite=True, keep=2,
                progress=False)
    parsed = milvus.parse_location(loc)
    names = milvus.version_collections(milvus.connect(parsed), parsed)
    # keep=2: the live version and one older; v1 went at the third build, v2 at the fourth (v3 is the one older)
    assert names == ["pruned__v000003", "pruned__v000004"]
    held = sorted(n for n in milvus.connect(parsed).list_collections() if n.startswith("pruned__"))
    assert held == ["pruned__v000003", "pruned__v000003__probe", "pruned__v000004", "pruned__v000004__probe"]
    assert milvus.live_collection(milvus.connect(parsed), parsed) == "pruned__v000004"


def test_two_stateless_servers_over_one_collection_behind_the_sdk_round_robin(built, tiny_models, images):
    engines = [QueryEngine.open(built["loc"], tiny_models["student"]) for _ in range(2)]
    servers = [create_server(e, expose_paths=True) for e in engines]
    try:
        addresses = [f"127.0.0.1:{port}" for _, port in servers]
        with SearchClient(addresses) as client:
            answers = [[(h.id, h.path) for h in client.search_image(images[i % 8], k=5)] for i in range(16)]
        assert answers[:8] == answers[8:]  # the same answers whichever server took the call
        served = [int(s.metrics.text().count('method="SearchImage"') > 0) for s, _ in servers]
        assert served == [1, 1], "round robin did not reach both servers"
    finally:
        for (s, _), e in zip(servers, engines):
            s.stop(None)
            e.close()


def test_admin_add_upload_and_remove_on_a_milvus_index_over_a_real_channel(lite, tiny_models, image_folder, images,
                                                                           tmp_path):
    """Admin AddImages / UploadImages / RemoveImages against a Milvus Lite collection, through the SDK over a real
    gRPC channel under query load: the new items are found, the removed one is gone, no request fails."""
    from asymsearch.core.synthetic import make_synthetic_dataset
    from asymsearch.server.admin import TeacherUpdater
    loc = f"{lite}/admin"
    build_index(tiny_models["teacher"], image_folder, loc, progress=False)
    new = make_synthetic_dataset(tmp_path / "new", num_classes=2, per_class=3, size=48, seed=9)
    new_paths = sorted(str(p.resolve()) for p in new.rglob("*.jpg"))
    engine = QueryEngine.open(loc, tiny_models["student"], max_k=200)
    server, port = create_server(engine, max_workers=8, admin=True, token="milvus-admin", expose_paths=True,
                                 admin_roots=(str(tmp_path),), updater=TeacherUpdater(tiny_models["teacher"]))
    load = Load(port, images, threads=2)
    try:
        with SearchClient(f"127.0.0.1:{port}", token="milvus-admin") as client:
            added = client.add_images(new)
            assert (added["index_version"], added["count"], added["changed"]) == ("admin__v000001", 86, True)
            hits = client.search_image(new_paths[4], k=1)
            assert hits[0].path == new_paths[4] and hits[0].label == Path(new_paths[4]).parent.name
            new_ids = sorted(h.id for h in client.search_image(new_paths[0], k=200) if h.path in new_paths)
            assert new_ids == list(range(80, 86))  # ids after every id given before
            removed = client.remove_images([hits[0].id])
            assert (removed["index_version"], removed["count"]) == ("admin__v000001", 85)
            assert new_paths[4] not in {h.path for h in client.search_image(new_paths[4], k=200)}
            with pytest.raises(Exception, match="not in the index"):
                client.remove_images([10**9])
            pushed = client.push_images([(Path(new_paths[4]).read_bytes(), "pushed", {"shop": "north"})])
            assert (pushed["count"], pushed["changed"]) == (86, True)
            top = client.search_image(Path(new_paths[4]).read_bytes(), k=1)[0]
            assert (top.id, top.label) == (86, "pushed")
            assert Path(top.path).is_file() and Path(top.path).read_bytes() == Path(new_paths[4]).read_bytes()
            kept = Path(milvus.parse_location(loc).uri + ".uploads") / "admin"  # beside the Lite file
            assert Path(top.path).is_relative_to(kept) and top.metadata == {"shop": "north"}
            info = client.info()
            assert (info["index_version"], info["count"], info["backend"]) == ("admin__v000001", 86, "milvus")
            with pytest.raises(Exception, match="index rollback"):  # no version folders on Milvus
                client.reload("v000001")
            assert client.reload()["index_version"] == "admin__v000001"
            assert len(client.search_image(images[0], k=5)) == 5  # a good request after the refused ones
    finally:
        load.stop()
        server.stop(None)
        engine.close()
    assert load.errors == []
    with open_index(loc) as index:  # what the collection holds, read back past the server
        assert index.count == 86 and sorted(set(range(87)) - set(index.ids().tolist())) == [hits[0].id]
        assert index.lookup_records([86])[0]["shop"] == "north"


def test_the_probe_set_lives_beside_each_version_and_gates_students_on_milvus(lite, built, tiny_models,
                                                                             image_folder, tmp_path, capsys):
    """The build's probe set in a side collection: the same images, labels and index vectors a faiss build keeps in
    meta.sqlite, the same gate figures; `student check --index milvus-lite://...` and the server's tier gate use
    it; an in-place add keeps it; a version without one, or with a damaged one, is refused in one line."""
    import json

    from asymsearch.cli.main import main
    from asymsearch.index.probe import GateRefused, NoProbeSet, check_student, find_probe, require_probe
    from asymsearch.core.ort import OnnxEmbedder
    from asymsearch.server.tiers import GatePolicy
    rand = make_linear_onnx(tmp_path / "random.onnx", role="student", teacher_id="teacher-a",
                            weight=np.random.default_rng(7).normal(size=(48, 16)), model_id="random-student")
    with open_index(built["loc"]) as index, SearchIndex.open(built["faiss"]) as flat:
        probe, reference = require_probe(index), require_probe(flat)
        assert index.manifest.build["probe"]["collection"] == "flat__v000001__probe"
        assert len(probe) == 80 and probe.ids == reference.ids and probe.labels == reference.labels
        assert probe.images == reference.images and probe.mode == reference.mode == "labels"
        records = index.lookup_records(list(probe.ids))
        assert [open(r["path"], "rb").read() for r in records] == list(probe.images)  # the database files
        stored = np.stack([flat._index.reconstruct(int(i)) for i in probe.ids])  # what faiss Flat holds for them
        np.testing.assert_allclose(probe.teacher, stored, atol=1e-6)
        good = check_student(OnnxEmbedder(tiny_models["student"]), probe)
        assert good == check_student(OnnxEmbedder(tiny_models["student"]), reference)
        assert good.ratio >= 0.95 > check_student(OnnxEmbedder(rand), probe).ratio

    # the CLI: passes, below the gate exit 1, a student of another teacher exit 2
    assert main(["student", "check", "--index", built["loc"], "--student", str(tiny_models["student"]),
                 "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["passed"] and report["recall_at_1"] == pytest.approx(good.recall_at_1)
    assert main(["student", "check", "--index", built["loc"], "--student", str(rand)]) == 1
    assert "fails the quality gate" in capsys.readouterr().err
    assert main(["student", "check", "--index", built["loc"], "--student",
                 str(tiny_models["foreign_student"])]) == 2
    assert "teacher-b" in capsys.readouterr().err

    # the server's tier gate: the good student is gated and served, the random one refused with both figures
    loc = f"{lite}/gated"
    build_index(tiny_models["teacher"], image_folder, loc, classes="first-half", progress=False)
    policy = GatePolicy(min_ratio=0.95, required=True)
    engine = QueryEngine.open(loc, tiny_models["student"], gate=policy)
    try:
        tier = engine.tiers[0]
        assert tier.gate is not None and tier.gate.count == 40 and tier.gate.ratio >= 0.95
        with pytest.raises(GateRefused, match="fails the quality gate"):
            engine.load_tier("fast", rand)
        new = tmp_path / "new"
        shutil.copytree(image_folder / "class_07", new / "class_07")
        add_images(loc, tiny_models["teacher"], new)  # in place: the same probe set, the engine swaps and stays gated
        assert engine.reload()[0] and engine.index.count == 50
        assert find_probe(engine.index).ids == find_probe(open_index(loc)).ids and engine.tiers[0].gate is not None
    finally:
        engine.close()
    with pytest.raises(GateRefused):
        QueryEngine.open(loc, rand, gate=policy)

    # a version without a probe set (written by publish_blocks with no probe), then one whose side collection lost
    # a row: one line each, and the good index still checks
    parsed = milvus.parse_location(f"{lite}/bare")
    with SearchIndex.open(built["faiss"]) as flat:
        vectors = np.stack([flat._index.reconstruct(i) for i in range(80)])
        records = [(r["path"], r["label"], None) for r in flat.lookup_records(flat.ids())]
        manifest = flat.manifest
    milvus.publish_blocks(parsed, manifest, [(np.arange(80), vectors, records)])
    with open_index(str(parsed)) as bare, pytest.raises(NoProbeSet, match="side collection bare__v000001__probe"):
        require_probe(bare)
    assert main(["student", "check", "--index", str(parsed), "--student", str(tiny_models["student"])]) == 2
    assert "no probe set" in capsys.readouterr().err
    client = milvus.connect(milvus.parse_location(loc))
    client.delete("gated__v000001__probe", ids=[0])
    with open_index(loc) as damaged, pytest.raises(UserError, match="not the one its index recorded"):
        require_probe(damaged)
    assert main(["student", "check", "--index", built["loc"], "--student", str(tiny_models["student"])]) == 0


def test_filtered_ivf_and_hnsw_on_milvus_return_k_results_equal_to_brute_force_over_the_subset(lite, monkeypatch):
    """Milvus searches only nprobe lists / the graph and drops what a filter rejects (at 1% selectivity its HNSW
    came back with fewer than k, its IVF missed matches); MilvusIndex searches a small subset exactly, and a large
    one approximately with each short query again exactly: k results, equal to numpy brute force over the rows the
    filter keeps."""
    from asymsearch.core.filters import parse_filter
    from asymsearch.core.manifest import IndexManifest
    from asymsearch.index import store
    rng = np.random.default_rng(5)
    n, dim = 20_000, 16
    x = rng.normal(size=(n, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    q = rng.normal(size=(20, dim)).astype(np.float32)
    labels = np.array([f"class_{i % 100:03d}" for i in range(n)])
    for factory, params in (("HNSW8", {"efSearch": 16}), ("IVF64,Flat", {"nprobe": 1})):
        name = factory.split(",")[0].lower()
        manifest = IndexManifest(teacher_id="t", dim=dim, metric="inner_product", factory=factory, count=0,
                                 teacher_model={}, build={}, search_params=params)
        blocks = [(np.arange(lo, lo + 5000), x[lo:lo + 5000], [("p", str(labels[i]), None)
                                                              for i in range(lo, lo + 5000)])
                  for lo in range(0, n, 5000)]
        milvus.publish_blocks(milvus.parse_location(f"{lite}/{name}"), manifest, blocks)
        with open_index(f"{lite}/{name}") as index:
            for text, limit in (('label = "class_042"', store.SUBSET_EXACT_MAX),  # 200 rows: exact subset
                                ('label in ("class_001", "class_002", "class_003")', 100)):  # 600 > 100: ANN
                monkeypatch.setattr(store, "SUBSET_EXACT_MAX", limit)
                f = parse_filter(text, index.filter_fields)
                rows = np.flatnonzero(np.array([f.matches({"label": label}) for label in labels]))
                scores, ids = index.search(q, 10, filter=f)
                assert (ids >= 0).all() and ids.shape == (20, 10), (factory, text)
                assert np.isin(ids, rows).all()
                brute = rows[np.argsort(-(q @ x[rows].T), axis=1, kind="stable")[:, :10]]
                if limit >= len(rows):
                    assert np.array_equal(ids, brute), (factory, text)
                    np.testing.assert_allclose(scores, np.take_along_axis(q @ x.T, brute, 1), atol=1e-5)
