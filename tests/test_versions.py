"""Versioned index roots: resolving CURRENT, publishing, pruning, cleaning what a killed writer left, locking."""
from __future__ import annotations

import shutil

import numpy as np
import pytest

from asymsearch.core.errors import UserError
from asymsearch.index import versions
from asymsearch.index.build import build_index
from asymsearch.index.store import SearchIndex
from asymsearch.index.update import ensure_versioned
from asymsearch.index.versions import resolve_index_folder


@pytest.fixture(scope="module")
def plain(tmp_path_factory, tiny_models, image_folder):
    out = tmp_path_factory.mktemp("plain") / "index"
    build_index(tiny_models["teacher"], image_folder, out, classes="class_00,class_01,class_02", progress=False)
    return out


def copy_version(plain, root, name):
    shutil.copytree(plain, root / "versions" / name)


def test_resolve_plain_and_versioned(tmp_path, plain):
    assert resolve_index_folder(plain) == (plain, None)
    root = tmp_path / "root"
    copy_version(plain, root, "v000001")
    copy_version(plain, root, "v000002")
    (root / "CURRENT").write_text("v000001\n")
    assert resolve_index_folder(root) == (root / "versions" / "v000001", "v000001")
    (root / "CURRENT").write_text("v000002")
    assert resolve_index_folder(root) == (root / "versions" / "v000002", "v000002")
    with SearchIndex.open(root) as index:
        assert index.version == "v000002" and index.folder == root / "versions" / "v000002" and index.root == root
        assert index.count == 30


@pytest.mark.parametrize("current, message", [("v000009", "is missing"), ("../../etc", "not a version name"),
                                              ("", "not a version name")])
def test_bad_current_is_a_clear_error(tmp_path, plain, current, message):
    copy_version(plain, tmp_path, "v000001")
    (tmp_path / "CURRENT").write_text(current)
    with pytest.raises(UserError, match=message):
        resolve_index_folder(tmp_path)
    with pytest.raises(UserError, match=message):
        SearchIndex.open(tmp_path)


def test_not_an_index(tmp_path):
    with pytest.raises(UserError, match="not found"):
        resolve_index_folder(tmp_path / "missing")


def test_publish_prune_and_clean_stale(tmp_path, plain):
    root = tmp_path / "root"
    names = []
    with versions.writer_lock(root):
        for _ in range(4):
            staged = versions.staging_dir(root)
            for f in plain.iterdir():
                shutil.copy(f, staged / f.name)
            names.append(versions.publish(root, staged, keep=2))
    assert names == ["v000001", "v000002", "v000003", "v000004"]
    assert versions.list_versions(root) == ["v000003", "v000004"] and versions.read_current(root) == "v000004"
    assert not list(root.glob(".CURRENT.tmp*"))

    # what a killed writer leaves: a staging folder, and a published folder whose CURRENT switch never happened
    staging = versions.staging_dir(root)
    copy_version(plain, root, "v000005")
    with versions.writer_lock(root):
        assert sorted(versions.clean_stale(root)) == sorted([staging.name, "v000005"])
    assert sorted(p.name for p in (root / "versions").iterdir()) == ["v000003", "v000004"]
    with pytest.raises(UserError, match="at least 1"):
        versions.prune(root, 0)


def test_publish_refuses_an_incomplete_folder(tmp_path, plain):
    staged = versions.staging_dir(tmp_path)
    shutil.copy(plain / "manifest.json", staged / "manifest.json")
    with pytest.raises(UserError, match="index.faiss is missing"):
        versions.publish(tmp_path, staged)
    assert not (tmp_path / "CURRENT").exists()


def test_second_writer_gets_an_error_not_a_wait(tmp_path):
    with versions.writer_lock(tmp_path):
        with pytest.raises(UserError, match="another process"):
            with versions.writer_lock(tmp_path):
                pass
    with versions.writer_lock(tmp_path):  # released
        pass


def test_open_index_survives_publish_and_prune(tmp_path, plain):
    root = tmp_path / "root"
    shutil.copytree(plain, root)
    ensure_versioned(root)  # the plain folder becomes v000001, in place
    assert sorted(p.name for p in root.iterdir()) == ["CURRENT", "PUBLISHED", "versions"]
    queries = np.eye(16, dtype=np.float32)
    index = SearchIndex.open(root)
    before = index.search(queries, 5)
    staged = versions.staging_dir(root)
    for f in (root / "versions" / "v000001").iterdir():
        shutil.copy(f, staged / f.name)
    versions.publish(root, staged, keep=1)
    assert versions.list_versions(root) == ["v000002"]  # v000001 deleted while open
    after = index.search(queries, 5)
    np.testing.assert_array_equal(before[1], after[1])
    assert index.lookup(after[1][0]) == SearchIndex.open(plain).lookup(before[1][0])
    index.close()


def test_rollback_switches_current_and_never_loses_or_reuses_a_version(tmp_path, tiny_models, image_folder, capsys):
    from asymsearch.cli.main import main
    from asymsearch.core.synthetic import make_synthetic_dataset
    from asymsearch.index.update import add_images, remove_ids

    def cli(*args):
        rc = main(["index", *map(str, args)])
        out, err = capsys.readouterr()
        return rc, out, err

    teacher, root = tiny_models["teacher"], tmp_path / "root"
    build_index(teacher, image_folder, root, classes="class_00,class_01", versioned=True, progress=False)
    extra = make_synthetic_dataset(tmp_path / "extra", num_classes=1, per_class=3, size=48, seed=9)
    add_images(root, teacher, extra, progress=False)  # v000002: 23 images
    remove_ids(root, [0, 1])  # v000003: 21
    rc, out, _ = cli("rollback", root, "v000001")
    assert rc == 0 and out.strip() == (f"index {root}: CURRENT now names v000001 (was v000003), 20 images; "
                                       f"kept newer: v000002, v000003")
    with SearchIndex.open(root) as index:
        assert (index.version, index.count) == ("v000001", 20)

    # the next change gets a name never used, and the versions rolled back from stay
    _, name = add_images(root, teacher, extra, progress=False)
    assert name == "v000004" and versions.list_versions(root) == ["v000001", "v000002", "v000003", "v000004"]
    # a rollback by hand-editing CURRENT (the old way): newer versions stay too
    (root / "CURRENT").write_text("v000002\n")
    assert remove_ids(root, [5]).version == "v000005"
    assert versions.list_versions(root) == [f"v00000{i}" for i in range(1, 6)]
    assert versions.read_published(root) == [f"v00000{i}" for i in range(1, 6)]

    rc, out, _ = cli("rollback", root, "3")  # forward, by number
    assert rc == 0 and "CURRENT now names v000003 (was v000005), 21 images; kept newer: v000004, v000005" in out
    rc, out, _ = cli("rollback", root, "v000003")
    assert rc == 0 and "CURRENT already names v000003" in out

    before = (root / "CURRENT").read_bytes()
    for version, message in [("v000009", "has no version 'v000009'; its versions are v000001, v000002, v000003, "
                                         "v000004, v000005 (CURRENT: v000003)"),
                             ("latest", "has no version 'latest'")]:
        rc, _, err = cli("rollback", root, version)
        assert rc == 2 and len(err.strip().splitlines()) == 1 and message in err, err
    (root / "versions" / "v000001" / "meta.sqlite").unlink()
    rc, _, err = cli("rollback", root, "v000001")
    assert rc == 2 and err.strip() == ("asymsearch: error: version v000001 is incomplete (meta.sqlite is missing); "
                                       "refusing to switch to it")
    rc, _, err = cli("rollback", extra, "v000001")
    assert rc == 2 and "is not a versioned index root" in err and len(err.strip().splitlines()) == 1
    assert (root / "CURRENT").read_bytes() == before


def test_a_root_made_before_published_existed_keeps_every_version(tmp_path, plain):
    """No PUBLISHED: whether a version newer than CURRENT was ever live cannot be known, so none is removed."""
    root = tmp_path / "root"
    for name in ("v000001", "v000002", "v000003"):
        copy_version(plain, root, name)
    (root / "CURRENT").write_text("v000002\n")
    with versions.writer_lock(root) as lock:
        assert versions.clean_stale(root, lock) == []
        assert versions.read_published(root) == ["v000001", "v000002", "v000003"]
        staged = versions.staging_dir(root)
        for f in plain.iterdir():
            shutil.copy(f, staged / f.name)
        assert versions.publish(root, staged) == "v000004"
    assert versions.list_versions(root) == ["v000001", "v000002", "v000003", "v000004"]
    assert not versions.work_root(root).exists()  # a finished writer leaves no lock folder behind
