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
    assert sorted(p.name for p in root.iterdir()) == ["CURRENT", "versions"]
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
