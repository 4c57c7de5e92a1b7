"""Index updates against brute force, refused updates that change nothing, and kill -9 in the middle of a build,
an add and a publish (a real SIGKILL in a subprocess, at exact steps chosen through ASYMSEARCH_CRASH_AT)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import faiss
import numpy as np
import pytest

from asymsearch.core.data import list_image_folder, list_images_flat
from asymsearch.core.errors import PairingError, UserError
from asymsearch.core.ort import OnnxEmbedder
from asymsearch.core.preprocess import decode_image
from asymsearch.core.synthetic import make_synthetic_dataset
from asymsearch.index import versions
from asymsearch.index.build import build_index
from asymsearch.index.store import SearchIndex
from asymsearch.index.update import add_images, remove_ids

from conftest import make_linear_onnx

QUERIES = np.random.default_rng(5).normal(size=(12, 16)).astype(np.float32)


def embed(model: Path, items) -> np.ndarray:
    """Reference embeddings: one decode and one call per image, no pipeline."""
    e = OnnxEmbedder(model)
    return np.concatenate([e.embed_images([decode_image(item.path)]) for item in items])


def brute_force(ids: np.ndarray, vectors: np.ndarray, k: int) -> np.ndarray:
    scores = QUERIES @ vectors.T
    return ids[np.argsort(-scores, axis=1, kind="stable")[:, :k]]


def snapshot(root: Path) -> dict:
    """Everything a reader could observe: CURRENT, the version folders and their bytes, and the answers."""
    files = {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
             if p.is_file() and p.name != ".lock"}
    with SearchIndex.open(root) as index:
        scores, ids = index.search(QUERIES, 10)
        return {"files": files, "ids": ids, "scores": scores, "records": index.lookup_records(index.ids())}


def assert_same(a: dict, b: dict) -> None:
    assert a["files"].keys() == b["files"].keys() and all(a["files"][k] == b["files"][k] for k in a["files"])
    np.testing.assert_array_equal(a["ids"], b["ids"])
    np.testing.assert_array_equal(a["scores"], b["scores"])
    assert a["records"] == b["records"]


@pytest.fixture(scope="module")
def new_images(tmp_path_factory) -> Path:
    """12 images in two label folders, different from the database's."""
    return make_synthetic_dataset(tmp_path_factory.mktemp("new"), num_classes=2, per_class=6, size=48, seed=7)


@pytest.fixture
def root(tmp_path, tiny_models, image_folder) -> Path:
    out = tmp_path / "root"
    build_index(tiny_models["teacher"], image_folder, out, classes="class_00,class_01,class_02,class_03",
                versioned=True, progress=False)
    return out


def test_add_then_remove_matches_brute_force_with_stable_ids(root, tiny_models, image_folder, new_images):
    base = list_image_folder(image_folder, [f"class_0{i}" for i in range(4)])
    added = list_images_flat(new_images)
    csv = new_images.parent / "meta.csv"
    lines = ["path,caption,price"] + [f"{Path(i.path).relative_to(new_images)},bird {n},{n * 1.5}"
                                      for n, i in enumerate(added[:5])]
    csv.write_text("\n".join(lines) + "\n")
    manifest, version = add_images(root, tiny_models["teacher"], new_images, metadata=csv, progress=False)
    assert version == "v000002" and manifest.count == 52 and manifest.build["next_id"] == 52
    assert versions.read_current(root) == "v000002"
    all_vectors = np.concatenate([embed(tiny_models["teacher"], base), embed(tiny_models["teacher"], added)])
    all_ids = np.arange(52)
    with SearchIndex.open(root) as index:
        assert index.version == "v000002"
        np.testing.assert_array_equal(index.search(QUERIES, 10)[1], brute_force(all_ids, all_vectors, 10))
        records = index.lookup_records([0, 40, 44, 45])
        assert [r["path"] for r in records] == [base[0].path, added[0].path, added[4].path, added[5].path]
        assert records[1] == {"id": 40, "path": added[0].path, "label": added[0].label, "caption": "bird 0",
                              "price": "0.0"}
        assert "caption" not in records[3] and index.lookup([44]) == [(added[4].path, added[4].label)]

    gone = [3, 17, 41]
    manifest, version = remove_ids(root, gone, keep=2)
    assert version == "v000003" and manifest.count == 49 and manifest.build["next_id"] == 52
    assert versions.list_versions(root) == ["v000002", "v000003"]
    keep = ~np.isin(all_ids, gone)
    with SearchIndex.open(root) as index:
        np.testing.assert_array_equal(index.ids(), all_ids[keep])
        np.testing.assert_array_equal(index.search(QUERIES, 10)[1], brute_force(all_ids[keep], all_vectors[keep], 10))
        assert index.lookup([0, 40])[1] == (added[0].path, added[0].label)  # ids did not move
        with pytest.raises(KeyError):
            index.lookup([17])

    # an id is never reused: the next add continues after the highest id ever given
    extra = new_images.parent / "extra"
    make_synthetic_dataset(extra, num_classes=1, per_class=2, size=48, seed=9)
    manifest, _ = add_images(root, tiny_models["teacher"], extra, progress=False)
    with SearchIndex.open(root) as index:
        assert index.ids()[-2:].tolist() == [52, 53] and manifest.build["next_id"] == 54


def test_hnsw_remove_rebuilds_the_graph_with_the_same_ids(tmp_path, tiny_models, image_folder):
    out = tmp_path / "root"
    build_index(tiny_models["teacher"], image_folder, out, factory="HNSW8", versioned=True, progress=False)
    vectors = embed(tiny_models["teacher"], list_image_folder(image_folder))
    remove_ids(out, [0, 5, 79])
    ids = np.setdiff1d(np.arange(80), [0, 5, 79])
    with SearchIndex.open(out) as index:
        assert index.manifest.factory == "HNSW8" and index.count == 77
        assert isinstance(faiss.downcast_index(faiss.read_index(str(index.folder / "index.faiss")).index),
                          faiss.IndexHNSWFlat)
        found = index.search(QUERIES, 5)[1]
    truth = brute_force(ids, vectors[ids], 5)
    assert np.mean([len(set(a) & set(b)) / 5 for a, b in zip(found, truth)]) >= 0.9
    assert not np.isin(found, [0, 5, 79]).any()


def test_refused_updates_change_nothing(root, tmp_path, tiny_models, image_folder, new_images):
    before = snapshot(root)
    other = make_linear_onnx(tmp_path / "other.onnx", role="teacher", teacher_id="teacher-b",
                             weight=np.random.default_rng(3).normal(size=(48, 16)))
    with pytest.raises(PairingError, match="is teacher teacher-b, but the index .* embedded by teacher teacher-a"):
        add_images(root, other, new_images, progress=False)
    with pytest.raises(PairingError, match="is a student, not a teacher"):
        add_images(root, tiny_models["student"], new_images, progress=False)
    with pytest.raises(UserError, match="40 of the images are already in the index"):
        add_images(root, tiny_models["teacher"], image_folder, progress=False)
    bad_csv = tmp_path / "bad.csv"
    bad_csv.write_text("path,caption\nclass_00/0000.jpg,a\nnot/there.jpg,b\n")
    with pytest.raises(UserError, match="not among the images"):
        add_images(root, tiny_models["teacher"], new_images, metadata=bad_csv, progress=False)
    bad_csv.write_text("path,caption\nclass_00/0000.jpg,a\nclass_00/0000.jpg,b\n")
    with pytest.raises(UserError, match="listed twice"):
        add_images(root, tiny_models["teacher"], new_images, metadata=bad_csv, progress=False)
    with pytest.raises(UserError, match=r"2 id\(s\) are not in the index .*: 40, 99; nothing removed"):
        remove_ids(root, [1, 40, 99])
    with pytest.raises(UserError, match="leave the index empty"):
        remove_ids(root, range(40))
    assert_same(before, snapshot(root))


# -- kill -9 -------------------------------------------------------------------------------------------------

def cli(*args: str, crash: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop(versions.CRASH_ENV, None)
    if crash:
        env[versions.CRASH_ENV] = crash
    return subprocess.run([sys.executable, "-m", "asymsearch.cli.main", *args], env=env, capture_output=True,
                          text=True, timeout=120)


def killed(result: subprocess.CompletedProcess) -> bool:
    return result.returncode == -signal.SIGKILL


def test_kill_during_build_then_resume_gives_the_uninterrupted_index(tmp_path, tiny_models, image_folder):
    out = tmp_path / "root"
    args = ["index", "build", "--teacher", str(tiny_models["teacher"]), "--images", str(image_folder),
            "--out", str(out), "--versioned", "--batch-size", "8", "--shard-size", "16"]
    r = cli(*args, crash="embed:after-shard")  # killed right after the first shard was committed
    assert killed(r), r.stderr
    assert not out.exists() or not versions.is_versioned_root(out)
    assert [p.name for p in (tmp_path / ".root.work" / "build").glob("shard-*.json")] == ["shard-000000.json"]
    r = cli(*args, "--resume")
    assert r.returncode == 0, r.stderr
    whole = tmp_path / "whole"
    build_index(tiny_models["teacher"], image_folder, whole, batch_size=8, shard_size=16, progress=False)
    assert (out / "versions" / "v000001" / "index.faiss").read_bytes() == (whole / "index.faiss").read_bytes()
    with SearchIndex.open(out) as a, SearchIndex.open(whole) as b:
        assert a.lookup_records(a.ids()) == b.lookup_records(b.ids()) and a.count == 80
    assert not (tmp_path / ".root.work").exists()


@pytest.mark.parametrize("crash", ["add:locked", "embed:after-shard", "add:before-publish", "publish:after-rename",
                                   "publish:before-current", "current:before-replace"])
def test_kill_during_add_keeps_the_old_version_and_rerun_finishes(root, tiny_models, new_images, crash):
    before = snapshot(root)
    args = ["index", "add", "--index", str(root), "--teacher", str(tiny_models["teacher"]),
            "--images", str(new_images), "--batch-size", "4"]
    r = cli(*args, crash=crash)
    assert killed(r), r.stderr
    after = snapshot(root)
    # the previous version loads and answers identically; only leftovers outside it may differ
    assert after["files"]["CURRENT"] == before["files"]["CURRENT"]
    assert {k: v for k, v in after["files"].items() if k.startswith("versions/v000001/")} == \
           {k: v for k, v in before["files"].items() if k.startswith("versions/v000001/")}
    np.testing.assert_array_equal(after["ids"], before["ids"])
    np.testing.assert_array_equal(after["scores"], before["scores"])
    assert after["records"] == before["records"]

    r = cli(*args)  # the same command again finishes the job, and says what it found
    assert r.returncode == 0, r.stderr
    assert "stopped before finishing" in r.stderr
    if crash in ("embed:after-shard", "add:before-publish"):
        assert "resuming the add of" in r.stderr and "1 of 1 embedding shards already done" in r.stderr
    if crash in ("publish:before-current", "current:before-replace"):
        # v000002 was listed in PUBLISHED before the kill: it may have been live, so it is kept and not reused
        assert versions.list_versions(root) == ["v000001", "v000002", "v000003"]
        assert versions.read_current(root) == "v000003"
    else:  # the orphan of a killed publish (renamed into place, never listed) was cleaned
        assert versions.list_versions(root) == ["v000001", "v000002"]
        assert ("v000002 (never published)" in r.stderr) == (crash == "publish:after-rename")
    with SearchIndex.open(root) as index:
        ids = index.ids()
        paths = [rec["path"] for rec in index.lookup_records(ids)]
    assert ids.tolist() == list(range(52))  # no id lost, none duplicated
    assert len(set(paths)) == 52 and sorted(paths[40:]) == sorted(i.path for i in list_images_flat(new_images))
    assert not (root.parent / ".root.work").exists()


def test_kill_right_after_the_switch_leaves_the_new_version_live(root, tiny_models):
    r = cli("index", "remove", "--index", str(root), "--ids", "1,2", "--keep", "1", crash="publish:after-current")
    assert killed(r), r.stderr
    assert versions.read_current(root) == "v000002"
    assert versions.list_versions(root) == ["v000001", "v000002"]  # killed before pruning
    with SearchIndex.open(root) as index:
        assert index.count == 38 and 1 not in index.ids() and 2 not in index.ids()
    r = cli("index", "remove", "--index", str(root), "--ids", "3", "--keep", "1")
    assert r.returncode == 0, r.stderr
    assert versions.list_versions(root) == ["v000003"]


def test_cli_errors_are_one_line(root, tiny_models, image_folder):
    r = cli("index", "remove", "--index", str(root), "--ids", "12345")
    assert r.returncode == 2 and r.stderr.strip().splitlines() == \
        [f"asymsearch: error: 1 id(s) are not in the index {root}: 12345; nothing removed"]
    r = cli("index", "add", "--index", str(root), "--teacher", str(tiny_models["teacher"]),
            "--images", str(image_folder / "class_00"))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "already in the index" in r.stderr


@pytest.mark.parametrize("crash", ["publish:before-current", "publish:after-current"])
def test_kill_while_a_plain_folder_becomes_a_root(tmp_path, tiny_models, image_folder, new_images, crash):
    """`add` on a plain folder first turns it into a root (its first publish); killed there, the index still
    loads and answers as before, and the same command again finishes the add."""
    plain = tmp_path / "plain"
    build_index(tiny_models["teacher"], image_folder, plain, classes="class_00,class_01", progress=False)
    before = snapshot(plain)
    args = ["index", "add", "--index", str(plain), "--teacher", str(tiny_models["teacher"]),
            "--images", str(new_images)]
    r = cli(*args, crash=crash)
    assert killed(r), r.stderr
    after = snapshot(plain)
    np.testing.assert_array_equal(after["ids"], before["ids"])
    np.testing.assert_array_equal(after["scores"], before["scores"])
    assert after["records"] == before["records"]
    r = cli(*args)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in plain.iterdir()) == ["CURRENT", "PUBLISHED", "versions"]
    with SearchIndex.open(plain) as index:
        assert index.ids().tolist() == list(range(32)) and index.version == "v000002"
