"""Index stage: build against an independent numpy/faiss reference, the metadata, skipped files, atomic output."""
from __future__ import annotations

import json
import shutil
import sqlite3
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import faiss
import numpy as np
import pytest

from asymsearch.core.data import list_image_folder
from asymsearch.core.errors import UserError
from asymsearch.core.ort import OnnxEmbedder
from asymsearch.core.preprocess import decode_image
from asymsearch.index import build as build_module
from asymsearch.index.build import build_index
from asymsearch.index.store import SearchIndex


def reference_embeddings(model: Path, items) -> np.ndarray:
    """Embeddings computed without the build's batching and thread pool: one decode and one call per image."""
    embedder = OnnxEmbedder(model)
    return np.concatenate([embedder.embed_images([decode_image(item.path)]) for item in items])


@pytest.fixture(scope="module")
def listing(image_folder):
    return list_image_folder(image_folder)


@pytest.fixture(scope="module")
def reference(tiny_models, listing):
    return {"teacher": reference_embeddings(tiny_models["teacher"], listing),
            "student": reference_embeddings(tiny_models["student"], listing)}


@pytest.fixture(scope="module")
def flat_index(tmp_path_factory, tiny_models, image_folder) -> Path:
    out = tmp_path_factory.mktemp("flat") / "index"
    build_index(tiny_models["teacher"], image_folder, out, batch_size=7, progress=False)  # 7: a ragged last batch
    return out


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def test_flat_index_is_the_brute_force_ranking(flat_index, reference):
    teacher, queries = reference["teacher"], reference["student"]
    sims = queries @ teacher.T
    with SearchIndex.open(flat_index) as index:
        scores, ids = index.search(queries, index.count)
    assert ids.shape == scores.shape == (len(queries), len(teacher))
    for q in range(len(queries)):
        assert sorted(ids[q]) == list(range(len(teacher)))  # a full ranking of every database item
        true = sims[q, ids[q]]
        np.testing.assert_allclose(scores[q], true, atol=1e-5)
        assert np.all(np.diff(true) <= 1e-5)  # best first
        # where the reference has no near-tie, the position must hold exactly the reference's item
        order = np.argsort(-sims[q], kind="stable")
        gaps = -np.diff(sims[q, order])
        clear = np.ones(len(order), bool)
        clear[:-1] &= gaps > 1e-4
        clear[1:] &= gaps > 1e-4
        assert np.array_equal(ids[q][clear], order[clear])


def test_metadata_and_manifest(flat_index, listing, tiny_models, image_folder):
    with SearchIndex.open(flat_index) as index:
        assert index.count == len(listing) == 80
        assert index.dim == 16 and index.teacher_id == "teacher-a"
        assert index.lookup(range(index.count)) == [(item.path, item.label) for item in listing]
        assert index.lookup([5, 0, 5, 79]) == [(listing[i].path, listing[i].label) for i in (5, 0, 5, 79)]
        assert index.lookup([]) == []
        with pytest.raises(KeyError):
            index.lookup([3, 80])
    with sqlite3.connect(flat_index / "meta.sqlite") as con:
        columns = [(name, type_, notnull, pk) for _, name, type_, notnull, _, pk in con.execute("PRAGMA table_info(items)")]
    assert columns == [("id", "INTEGER", 0, 1), ("path", "TEXT", 1, 0), ("label", "TEXT", 1, 0),
                       ("extra", "TEXT", 0, 0)]
    stored = faiss.read_index(str(flat_index / "index.faiss"))
    assert stored.ntotal == 80 and isinstance(stored, faiss.IndexIDMap2)  # stable ids, not positions
    np.testing.assert_array_equal(faiss.vector_to_array(stored.id_map), np.arange(80))
    assert (flat_index / "skipped.tsv").read_text() == "path\treason\n"

    manifest = json.loads((flat_index / "manifest.json").read_text())
    assert manifest["teacher_id"] == "teacher-a"
    assert (manifest["count"], manifest["dim"], manifest["factory"], manifest["metric"]) == (80, 16, "Flat",
                                                                                            "inner_product")
    teacher_manifest = json.loads(tiny_models["teacher"].with_suffix(".json").read_text())
    assert manifest["teacher_model"] == {"path": str(tiny_models["teacher"].resolve()),
                                         "sha256": teacher_manifest["sha256"], "model_id": "teacher-a"}
    assert manifest["build"]["images"] == str(image_folder.resolve())
    assert manifest["build"]["skipped"] == [] and manifest["build"]["batch_size"] == 7
    assert manifest["build"]["next_id"] == 80
    assert manifest["search_params"] == {}
    assert leftovers(flat_index.parent) == []


def test_search_contract(flat_index, reference):
    queries = reference["student"][:5]
    with SearchIndex.open(flat_index) as index:
        scores, ids = index.search(queries, 3)
        assert scores.shape == ids.shape == (5, 3) and scores.dtype == np.float32 and ids.dtype == np.int64
        assert index.search(queries, 1000)[1].shape == (5, 80)  # k' = min(k, count)
        for bad in (np.zeros((2, 15), np.float32), np.zeros(16, np.float32), np.zeros((1, 2, 16), np.float32)):
            with pytest.raises(ValueError, match=r"\(Q, 16\)"):
                index.search(bad, 3)
        with pytest.raises(ValueError):
            index.search(queries, 0)
        # concurrent callers get what a lone caller gets
        with ThreadPoolExecutor(4) as pool:
            results = list(pool.map(lambda q: index.search(reference["student"][q:q + 1], 10)[1],
                                    range(len(reference["student"]))))
        np.testing.assert_array_equal(np.concatenate(results), index.search(reference["student"], 10)[1])


def test_open_refuses_missing_or_incomplete_folders(tmp_path, flat_index):
    with pytest.raises(UserError, match="not found"):
        SearchIndex.open(tmp_path / "nowhere")
    broken = tmp_path / "broken"
    shutil.copytree(flat_index, broken)
    (broken / "meta.sqlite").unlink()
    with pytest.raises(UserError, match="meta.sqlite"):
        SearchIndex.open(broken)


# Measured on this data with student queries: IVF4,Flat at its default nprobe=1 0.76, HNSW8 1.00. IVF4 with
# nprobe=4 visits every list, so it must be exact.
@pytest.mark.parametrize("factory, search_params, threshold", [
    ("IVF4,Flat", {}, 0.6),
    ("IVF4,Flat", {"nprobe": 4}, 1.0),
    ("HNSW8", {}, 0.9),
])
def test_approximate_index_recall_against_brute_force(tmp_path, tiny_models, image_folder, reference, factory,
                                                      search_params, threshold):
    out = tmp_path / "index"
    build_index(tiny_models["teacher"], image_folder, out, factory=factory, progress=False)
    if search_params:  # the manifest's search parameters are applied when the index is opened
        manifest = json.loads((out / "manifest.json").read_text())
        manifest["search_params"] = search_params
        (out / "manifest.json").write_text(json.dumps(manifest))
    exact = faiss.IndexFlatIP(16)
    exact.add(reference["teacher"])
    _, truth = exact.search(reference["student"], 10)
    with SearchIndex.open(out) as index:
        assert index.manifest.factory == factory
        _, ids = index.search(reference["student"], 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, truth)])
    assert recall >= threshold, f"{factory} recall@10 {recall:.3f} < {threshold}"


def test_unreadable_files_are_skipped_and_listed(tmp_path, tiny_models, image_folder, listing, capsys):
    images = tmp_path / "images"
    shutil.copytree(image_folder, images)
    good = (images / "class_00" / "0000.jpg").read_bytes()
    rng = np.random.default_rng(0)
    bad = {
        images / "class_00" / "0003a_corrupt.jpg": b"\xff\xd8\xff\xe0" + rng.integers(0, 256, 2000, np.uint8).tobytes(),
        images / "class_03" / "0005a_truncated.jpg": good[:len(good) // 2],
        images / "class_07" / "notes.jpg": b"this is a text file, not a JPEG\n",
    }
    for path, data in bad.items():
        path.write_bytes(data)
    out = tmp_path / "index"
    manifest = build_index(tiny_models["teacher"], images, out, batch_size=16, progress=False)

    err = capsys.readouterr().err
    assert "skipped 3 unreadable files:" in err
    bad_paths = sorted(str(p.resolve()) for p in bad)
    assert all(p in err for p in bad_paths)
    assert sorted(manifest.build["skipped"]) == bad_paths
    assert manifest.count == 80
    report = (out / "skipped.tsv").read_text().splitlines()
    assert report[0] == "path\treason" and sorted(line.split("\t")[0] for line in report[1:]) == bad_paths
    assert all(line.split("\t")[1] for line in report[1:])  # every file with its reason
    with SearchIndex.open(out) as index:
        assert index.manifest.build["skipped"] == manifest.build["skipped"]
        assert [path for path, _ in index.lookup(range(index.count))] == \
               [str((images / Path(item.path).relative_to(image_folder)).resolve()) for item in listing]


def test_nothing_readable_is_an_error(tmp_path, tiny_models):
    (tmp_path / "images" / "a").mkdir(parents=True)
    (tmp_path / "images" / "a" / "x.jpg").write_text("nope")
    with pytest.raises(UserError, match="none of the 1 image files"):
        build_index(tiny_models["teacher"], tmp_path / "images", tmp_path / "index", progress=False)
    assert not (tmp_path / "index").exists() and leftovers(tmp_path) == []


def test_interrupted_build_leaves_no_index_and_resumes(tmp_path, tiny_models, image_folder, monkeypatch):
    """An exception after embedding, or Ctrl-C during it: no index and no temporary folder, only the committed
    embedding shards in `.index.work`, from which `resume` finishes with exactly the uninterrupted index."""
    parent = tmp_path / "parent"
    parent.mkdir()
    real = build_module.write_metadata

    def write_then_fail(path, rows):  # index.faiss is on disk when this fires
        real(path, rows)
        assert (path.parent / "index.faiss").is_file()
        raise RuntimeError("disk full")

    monkeypatch.setattr(build_module, "write_metadata", write_then_fail)
    with pytest.raises(RuntimeError, match="disk full"):
        build_index(tiny_models["teacher"], image_folder, parent / "index", shard_size=16, progress=False)
    assert [p.name for p in parent.iterdir()] == [".index.work"]
    assert len(list((parent / ".index.work" / "build").glob("shard-*.npy"))) == 5

    monkeypatch.undo()
    calls = []
    real_embed = OnnxEmbedder.embed_arrays

    def interrupt(self, batch):  # Ctrl-C during the fifth batch of 8: shards 0 and 1 (16 images each) are committed
        calls.extend([len(batch)] if batch.any() else [])  # not the all-zero warm-up batch of a model load
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real_embed(self, batch)

    monkeypatch.setattr(OnnxEmbedder, "embed_arrays", interrupt)
    with pytest.raises(KeyboardInterrupt):
        build_index(tiny_models["teacher"], image_folder, parent / "index", batch_size=8, shard_size=16,
                    progress=False)
    work = parent / ".index.work" / "build"
    assert [p.name for p in parent.iterdir()] == [".index.work"]
    assert sorted(p.name for p in work.glob("shard-*.npy")) == ["shard-000000.npy", "shard-000001.npy"]
    monkeypatch.undo()

    embedded = []
    monkeypatch.setattr(OnnxEmbedder, "embed_arrays",
                        lambda self, b: embedded.append(len(b) if b.any() else 0) or real_embed(self, b))
    build_index(tiny_models["teacher"], image_folder, parent / "index", batch_size=8, shard_size=16, resume=True,
                progress=False)
    assert sum(embedded) == 80 - 32  # only the missing shards were embedded
    monkeypatch.undo()
    whole = tmp_path / "whole"
    build_index(tiny_models["teacher"], image_folder, whole, batch_size=8, shard_size=16, progress=False)
    assert (parent / "index" / "index.faiss").read_bytes() == (whole / "index.faiss").read_bytes()
    with SearchIndex.open(parent / "index") as a, SearchIndex.open(whole) as b:
        assert a.lookup_records(a.ids()) == b.lookup_records(b.ids())
    assert [p.name for p in parent.iterdir()] == ["index"]  # the work folder is gone


def test_resume_refuses_a_changed_listing_and_fresh_build_discards_old_work(tmp_path, tiny_models, image_folder,
                                                                              monkeypatch):
    images = tmp_path / "images"
    shutil.copytree(image_folder, images)
    real_embed = OnnxEmbedder.embed_arrays
    calls = []

    def interrupt(self, batch):
        calls.extend([1] if batch.any() else [])
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_embed(self, batch)

    monkeypatch.setattr(OnnxEmbedder, "embed_arrays", interrupt)
    with pytest.raises(KeyboardInterrupt):
        build_index(tiny_models["teacher"], images, tmp_path / "index", batch_size=8, shard_size=8, progress=False)
    monkeypatch.undo()
    (images / "class_00" / "0000.jpg").rename(images / "class_00" / "zzzz.jpg")  # the listing changed
    with pytest.raises(UserError, match="cannot resume .* listing_sha256"):
        build_index(tiny_models["teacher"], images, tmp_path / "index", batch_size=8, shard_size=8, resume=True,
                    progress=False)
    assert not (tmp_path / "index").exists()
    m = build_index(tiny_models["teacher"], images, tmp_path / "index", batch_size=8, shard_size=8, progress=False)
    assert m.count == 80 and not (tmp_path / ".index.work").exists()


def test_search_params_are_stored_and_applied(tmp_path, tiny_models, image_folder, reference):
    out = tmp_path / "index"
    m = build_index(tiny_models["teacher"], image_folder, out, factory="IVF4,Flat", search_params={"nprobe": 4},
                    progress=False)
    assert m.search_params == {"nprobe": 4}
    exact = faiss.IndexFlatIP(16)
    exact.add(reference["teacher"])
    _, truth = exact.search(reference["student"], 10)
    with SearchIndex.open(out) as index:
        _, ids = index.search(reference["student"], 10)
    assert np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, truth)]) == 1.0  # nprobe=4 of 4: exact
    with pytest.raises(UserError, match="efSearch=16.* does not apply"):
        build_index(tiny_models["teacher"], image_folder, tmp_path / "other", factory="IVF4,Flat",
                    search_params={"efSearch": 16}, progress=False)


def test_auto_choice_records_a_recall_it_really_has(tmp_path, tiny_models, image_folder, reference):
    from asymsearch.index.auto import Budget
    out = tmp_path / "index"
    # a memory budget below Flat, HNSW and IVF-Flat (80 x 16 floats = 5 KB): IVF,SQ8 is what fits
    m = build_index(tiny_models["teacher"], image_folder, out, auto=Budget(max_memory=6500, target_ms=1000.0,
                                                                           target_recall=0.99), progress=False)
    auto = m.build["auto"]
    assert m.factory == auto["chosen"] == "IVF2,SQ8" and m.search_params == auto["search_params"]
    assert [c["factory"] for c in auto["candidates"] if c.get("skipped")] == ["Flat", "HNSW32", "IVF2,Flat"]
    # the recorded recall is the recall of the saved index, recomputed here against brute force
    vectors = reference["teacher"]
    rng = np.random.default_rng(0)
    held = np.sort(rng.choice(80, auto["queries"], replace=False))
    exact = faiss.IndexFlatIP(16)
    exact.add(vectors)
    _, truth = exact.search(vectors[held], 11)
    with SearchIndex.open(out) as index:
        _, ids = index.search(vectors[held], 11)
    hits = [len(set(a[a != q][:10]) & set(t[t != q][:10])) / 10 for a, t, q in zip(ids, truth, held)]
    assert abs(np.mean(hits) - auto["recall@10"]) < 1e-3
    assert auto["recall@10"] >= 0.99 and auto["targets_met"]


def test_existing_output_is_refused_unless_overwrite(tmp_path, tiny_models, image_folder):
    out = tmp_path / "index"
    first = build_index(tiny_models["teacher"], image_folder, out, classes="class_00,class_01", progress=False)
    assert first.count == 20
    with pytest.raises(UserError, match="already exists"):
        build_index(tiny_models["teacher"], image_folder, out, progress=False)
    assert json.loads((out / "manifest.json").read_text())["count"] == 20

    second = build_index(tiny_models["teacher"], image_folder, out, factory="HNSW8", overwrite=True, progress=False)
    assert second.count == 80
    with SearchIndex.open(out) as index:
        assert (index.count, index.manifest.factory, index.manifest.build["classes"]) == (80, "HNSW8", "all")
    assert leftovers(tmp_path) == []

    # overwrite replaces an index folder, not an unrelated folder that happens to have the name
    other = tmp_path / "photos"
    other.mkdir()
    (other / "holiday.jpg").write_bytes(b"precious")
    with pytest.raises(UserError, match="not an index folder"):
        build_index(tiny_models["teacher"], image_folder, other, overwrite=True, progress=False)
    assert (other / "holiday.jpg").read_bytes() == b"precious"


def test_refuses_a_student_as_teacher(tmp_path, tiny_models, image_folder):
    with pytest.raises(UserError, match="not a teacher"):
        build_index(tiny_models["student"], image_folder, tmp_path / "index", progress=False)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("factory, message", [
    ("NotAFactory,Flat", "invalid faiss index factory 'NotAFactory,Flat'"),
    ("IVF256,Flat", "too few vectors to train faiss index 'IVF256,Flat': 80"),
])
def test_bad_or_untrainable_factory(tmp_path, tiny_models, image_folder, factory, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(")):
        build_index(tiny_models["teacher"], image_folder, tmp_path / "index", factory=factory, progress=False)
    assert list(tmp_path.iterdir()) == []
