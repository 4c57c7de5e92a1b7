"""On-disk IVF indexes (`asymsearch.index.ondisk`, `index build --on-disk`): the same answers as the same index
built in memory, exact brute force at nprobe = nlist, and still loadable after publishing, pruning and moving."""
from __future__ import annotations

import os

import faiss
import numpy as np
import pytest

from asymsearch.cli.main import main
from asymsearch.core.errors import UserError
from asymsearch.core.manifest import IndexManifest
from asymsearch.index import ondisk, versions
from asymsearch.index.build import build_index
from asymsearch.index.faiss_index import add_blocks, apply_search_params, new_index, train_index
from asymsearch.index.store import SearchIndex
from asymsearch.index.update import add_images, remove_ids

DIM = 16


def _unit(rng: np.random.Generator, n: int) -> np.ndarray:
    x = rng.standard_normal((n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _brute_force(db: np.ndarray, ids: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product top-k with a plain IndexFlatIP over the same vectors, mapped to the same ids."""
    flat = faiss.IndexFlatIP(DIM)
    flat.add(db)
    scores, pos = flat.search(queries, k)
    return scores, ids[pos]


@pytest.mark.parametrize("factory", ["IVF16,Flat", "IVF16,SQ8", "PCA8,IVF16,PQ4x4"])
def test_merged_shards_answer_like_the_in_memory_index(tmp_path, factory):
    rng = np.random.default_rng(0)
    db, queries = _unit(rng, 2000), _unit(rng, 50)
    ids = 1000 + 3 * np.arange(len(db), dtype=np.int64)  # stable ids that are not positions
    cuts = [0, 512, 1024, 1500, 1536, 2000]  # ragged shards, one much smaller than the others
    blocks = [(ids[a:b], db[a:b]) for a, b in zip(cuts, cuts[1:])]
    sample = db[::2]

    memory = train_index(new_index(DIM, factory), sample, factory)
    add_blocks(memory, blocks, factory)
    disk = ondisk.build_on_disk(blocks, sample, DIM, factory, tmp_path / "work")
    assert ondisk.is_on_disk(disk) and not ondisk.is_on_disk(memory)
    assert sorted(os.listdir(tmp_path / "work")) == [ondisk.IVFDATA_FILE]  # the per-shard blocks are gone
    assert disk.ntotal == memory.ntotal == len(db)

    folder = tmp_path / "written"
    folder.mkdir()
    ondisk.write_index(disk, folder / "index.faiss")
    assert not (tmp_path / "work").exists() and (folder / ondisk.IVFDATA_FILE).is_file()
    os.rename(folder, tmp_path / "moved")  # found again beside index.faiss after a move
    reread = ondisk.read_index(tmp_path / "moved" / "index.faiss")
    assert ondisk.is_on_disk(reread)
    for nprobe in (1, 4, 16):
        answers = []
        for index in (memory, disk, reread):
            apply_search_params(index, {"nprobe": nprobe})
            answers.append(index.search(queries, 10))
        for scores, found in answers[1:]:
            np.testing.assert_array_equal(found, answers[0][1])
            np.testing.assert_array_equal(scores, answers[0][0])

    if factory == "IVF16,Flat":  # every list probed: exact search, as brute force over the same vectors
        exact_scores, exact_ids = _brute_force(db, ids, queries, 10)
        scores, found = reread.search(queries, 10)
        np.testing.assert_array_equal(found, exact_ids)
        np.testing.assert_allclose(scores, exact_scores, rtol=0, atol=1e-5)


def test_build_on_disk_matches_in_memory_build_and_flat(tmp_path, tiny_models, image_folder):
    common = dict(factory="IVF4,Flat", shard_size=23, batch_size=7, progress=False)  # 80 images: 23+23+23+11
    build_index(tiny_models["teacher"], image_folder, tmp_path / "memory", search_params={"nprobe": 2}, **common)
    m = build_index(tiny_models["teacher"], image_folder, tmp_path / "disk", search_params={"nprobe": 2},
                    on_disk=True, **common)
    assert m.build["on_disk"] is True and m.count == 80
    assert (tmp_path / "disk" / ondisk.IVFDATA_FILE).is_file()
    assert not (tmp_path / "memory" / ondisk.IVFDATA_FILE).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["disk", "memory"]  # no work folder left behind
    build_index(tiny_models["teacher"], image_folder, tmp_path / "all", search_params={"nprobe": 4}, on_disk=True,
                **common)
    build_index(tiny_models["teacher"], image_folder, tmp_path / "flat", factory="Flat", progress=False)

    queries = _unit(np.random.default_rng(1), 25)
    with SearchIndex.open(tmp_path / "memory", gpu=False) as memory, \
            SearchIndex.open(tmp_path / "disk", gpu=False) as disk, \
            SearchIndex.open(tmp_path / "all", gpu=False) as every_list, \
            SearchIndex.open(tmp_path / "flat", gpu=False) as flat:
        assert ondisk.is_on_disk(disk._index) and not ondisk.is_on_disk(memory._index)
        for a, b in zip(memory.search(queries, 10), disk.search(queries, 10)):
            np.testing.assert_array_equal(a, b)
        exact_scores, exact_ids = flat.search(queries, 10)
        scores, found = every_list.search(queries, 10)
        np.testing.assert_allclose(scores, exact_scores, rtol=0, atol=1e-5)
        # the same ranking up to the order of equal scores: each id returned really has the score it is ranked at
        all_scores, all_ids = flat.search(queries, flat.count)
        for q in range(len(queries)):
            true = dict(zip(all_ids[q].tolist(), all_scores[q].tolist()))
            assert len(set(found[q].tolist())) == 10
            np.testing.assert_allclose([true[i] for i in found[q]], exact_scores[q], rtol=0, atol=1e-5)
        assert disk.lookup([0, 79]) == memory.lookup([0, 79])


def test_on_disk_versions_survive_publish_prune_and_move(tmp_path, tiny_models, image_folder):
    root = tmp_path / "root"
    common = dict(factory="IVF4,Flat", shard_size=23, progress=False, search_params={"nprobe": 2}, on_disk=True)
    build_index(tiny_models["teacher"], image_folder, tmp_path / "plain", **common)
    build_index(tiny_models["teacher"], image_folder, root, versioned=True, **common)
    queries = _unit(np.random.default_rng(2), 25)
    with SearchIndex.open(tmp_path / "plain", gpu=False) as plain:
        expected = plain.search(queries, 10)
    first = SearchIndex.open(root, gpu=False)
    assert first.version == "v000001" and ondisk.is_on_disk(first._index)
    assert (root / versions.VERSIONS_DIR / "v000001" / ondisk.IVFDATA_FILE).is_file()
    for a, b in zip(first.search(queries, 10), expected):
        np.testing.assert_array_equal(a, b)

    build_index(tiny_models["teacher"], image_folder, root, overwrite=True, keep=1, **common)  # v000002, prunes v1
    assert versions.read_current(root) == "v000002"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain", "root"]  # no work folders left behind
    assert not (root / versions.VERSIONS_DIR / "v000001").exists()
    for a, b in zip(first.search(queries, 10), expected):  # the opened version's lists stay mapped
        np.testing.assert_array_equal(a, b)
    first.close()

    os.rename(root, tmp_path / "moved")
    os.rename(tmp_path / "plain", tmp_path / "plain-moved")
    for path in (tmp_path / "moved", tmp_path / "plain-moved"):
        with SearchIndex.open(path, gpu=False) as index:
            for a, b in zip(index.search(queries, 10), expected):
                np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("factory", ["Flat", "HNSW8", "PQ4"])
def test_on_disk_needs_an_ivf_factory(tmp_path, tiny_models, image_folder, factory):
    with pytest.raises(UserError, match="--on-disk needs an IVF index"):
        build_index(tiny_models["teacher"], image_folder, tmp_path / "index", factory=factory, on_disk=True,
                    progress=False)
    assert not any(tmp_path.iterdir())  # refused before anything was embedded or written


def test_on_disk_refusals_change_nothing(tmp_path, tiny_models, image_folder, capsys):
    from asymsearch.index.auto import Budget
    with pytest.raises(UserError, match="--on-disk and --auto"):
        build_index(tiny_models["teacher"], image_folder, tmp_path / "index", on_disk=True,
                    auto=Budget(max_memory=1 << 30, target_ms=5, target_recall=0.9), progress=False)
    out = tmp_path / "index"
    build_index(tiny_models["teacher"], image_folder, out, factory="IVF4,Flat", on_disk=True, progress=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(UserError, match="on-disk IVF index"):
        remove_ids(out, [3])
    with pytest.raises(UserError, match="on-disk IVF index"):
        add_images(out, tiny_models["teacher"], image_folder / "class_00", progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.name != ".lock"} == before

    assert main(["index", "build", "--teacher", str(tiny_models["teacher"]), "--images", str(image_folder),
                 "--out", str(tmp_path / "cli-flat"), "--on-disk"]) == 2
    assert "--on-disk needs an IVF index" in capsys.readouterr().err
    assert main(["index", "build", "--teacher", str(tiny_models["teacher"]), "--images", str(image_folder),
                 "--out", str(tmp_path / "cli"), "--factory", "IVF4,Flat", "--on-disk"]) == 0
    assert IndexManifest.load(tmp_path / "cli" / "manifest.json").build["on_disk"] is True
    assert (tmp_path / "cli" / ondisk.IVFDATA_FILE).is_file()
