"""IVF indexes whose inverted lists stay on disk: train once, add each shard to its own copy, merge on disk.

The recipe of `faiss.contrib.ondisk.merge_ondisk` (faiss's `demos/demo_ondisk_ivf.py`), for indexes larger than
RAM: the IVF index is trained once on the same fixed sample as an in-memory build
(`asymsearch.index.build.index_from_shards`); each embedding shard is added to its own empty copy of the trained
index and written to a block file in the work folder (one shard's codes in memory at a time); the blocks are read
back memory-mapped (`IO_FLAG_MMAP`) and their inverted lists merged by `OnDiskInvertedLists.merge_from_multiple`
into one `index.ivfdata` file. Only the coarse quantizer, the list offsets and the id map (8 bytes per vector) are
in memory; the codes are in the `.ivfdata` file, which the operating system pages in as lists are searched.

Like every index of the project it is wrapped in `IndexIDMap2`: each block stores, as IVF ids, the positions its
vectors would have had in the IDMap2 of an in-memory build (p = the p-th kept vector in listing order), and the id
map gives the stable id of each position. Search results are bit-identical to those of the same
index built in memory (tested).

Files: `index.faiss` refers to `index.ivfdata` by name; it is read with `faiss.IO_FLAG_ONDISK_SAME_DIR` (see
`read_index`), which looks for the `.ivfdata` file beside the `.faiss` file, so the folder may be renamed,
published as a version or moved. `index add` / `index remove` refuse an on-disk index (rebuild it instead).
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Iterable

import faiss
import numpy as np

from asymsearch.core.errors import UserError
from asymsearch.index.faiss_index import faiss_reason, new_index, train_index

IVFDATA_FILE = "index.ivfdata"  # the merged inverted lists, beside index.faiss
READ_FLAGS = faiss.IO_FLAG_ONDISK_SAME_DIR  # harmless for indexes whose lists are in memory


def ivf_of(index: faiss.Index, factory: str) -> faiss.IndexIVF:
    """The IVF inside IDMap2[/pre-transform], or `UserError` when the factory is not an IVF one that can live on
    disk."""
    inner = faiss.downcast_index(index.index if isinstance(index, faiss.IndexIDMap) else index)
    if isinstance(inner, faiss.IndexPreTransform):
        inner = faiss.downcast_index(inner.index)
    if not isinstance(inner, faiss.IndexIVF) or isinstance(inner, faiss.IndexIVFPQR):
        raise UserError(f"--on-disk needs an IVF index (e.g. 'IVF1024,Flat', 'IVF4096,PQ32', 'OPQ32,IVF1024,PQ32'), "
                        f"not {factory!r}: only an IVF index's inverted lists can live on disk")
    return inner


def check_factory(dim: int, factory: str) -> None:
    """`UserError` unless `factory` makes an IVF index that can be built on disk (checked before any embedding)."""
    ivf_of(new_index(dim, factory), factory)


def build_on_disk(blocks: Iterable[tuple[np.ndarray, np.ndarray]], sample: np.ndarray, dim: int, factory: str,
                  work: str | os.PathLike) -> faiss.IndexIDMap2:
    """An IDMap2-wrapped IVF index whose lists are in `work/index.ivfdata`.

    `blocks` yields (ids, vectors) per shard, in order; `sample` is the training sample. The block files are
    removed before returning (also on error); `write_index` moves the `.ivfdata` file into the index folder.
    """
    work = Path(work)
    shutil.rmtree(work, ignore_errors=True)  # what an interrupted build left
    work.mkdir(parents=True)
    try:
        index = new_index(dim, factory)
        ivf_of(index, factory)
        index = train_index(index, sample, factory)
        trained = faiss.downcast_index(index.index)
        names, all_ids, offset = [], [], 0
        for ids, vectors in blocks:
            if len(ids) == 0:
                continue
            block = faiss.clone_index(trained)  # an empty copy of the trained index
            positions = np.arange(offset, offset + len(ids), dtype=np.int64)  # what IDMap2 would have stored
            offset += len(ids)
            try:
                block.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), positions)
            except RuntimeError as e:
                raise UserError(f"faiss could not add vectors to index {factory!r}: {faiss_reason(e)}") from None
            names.append(str(work / f"block-{len(names):06d}.faiss"))
            faiss.write_index(block, names[-1])
            del block
            all_ids.append(np.asarray(ids, dtype=np.int64))
        _merge(index, names, str(work / IVFDATA_FILE))
        ids = np.concatenate(all_ids) if all_ids else np.zeros(0, np.int64)
        if len(ids) != index.ntotal:
            raise AssertionError(f"merged {index.ntotal} vectors but {len(ids)} ids")
        faiss.copy_array_to_vector(ids, index.id_map)
        index.construct_rev_map()
        return index
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    finally:
        for name in work.glob("block-*.faiss"):
            name.unlink(missing_ok=True)


def _merge(index: faiss.IndexIDMap2, block_files: list[str], ivfdata: str) -> None:
    """`faiss.contrib.ondisk.merge_ondisk(index, block_files, ivfdata)`, except that the blocks' memory-mapped
    lists are freed after the merge (merge_ondisk leaves them allocated) and every level of the wrapper (IDMap2,
    pre-transform, IVF) gets the new total.

    The blocks already hold global positions, so no `shift_ids`: in faiss 1.15.1
    `OnDiskInvertedLists::merge_from_multiple(..., shift_ids=true)` shifts block i by the running sum of the sizes
    of blocks 1..i instead of 0..i-1, which is wrong whenever the shards differ in size (found by this module's
    test: a ragged last shard got the ids of another shard)."""
    blocks = [faiss.read_index(name, faiss.IO_FLAG_MMAP) for name in block_files]  # codes not read into RAM
    ivf = faiss.extract_index_ivf(index)
    lists = faiss.OnDiskInvertedLists(ivf.nlist, ivf.code_size, ivfdata)
    sources = faiss.InvertedListsPtrVector()
    for block in blocks:
        sources.push_back(faiss.extract_index_ivf(block).invlists)
    ntotal = lists.merge_from_multiple(sources.data(), sources.size(), False) if blocks else 0
    ivf.replace_invlists(lists, True)
    lists.this.disown()  # owned by the index now
    del sources, blocks
    level = index
    while True:
        level.ntotal = ntotal
        if not hasattr(level, "index"):
            break
        level = faiss.downcast_index(level.index)


def is_on_disk(index: faiss.Index) -> bool:
    try:
        ivf = faiss.extract_index_ivf(index)
    except RuntimeError:
        return False
    return faiss.downcast_InvertedLists(ivf.invlists).__class__.__name__ == "OnDiskInvertedLists"


def write_index(index: faiss.Index, path: str | os.PathLike) -> None:
    """`faiss.write_index`, and for an on-disk index first move its `.ivfdata` file beside `path` (same name as
    `IVFDATA_FILE`), which is where `read_index` looks for it."""
    path = Path(path)
    if is_on_disk(index):
        lists = faiss.downcast_InvertedLists(faiss.extract_index_ivf(index).invlists)
        source, target = Path(lists.filename), path.parent / IVFDATA_FILE
        if source.resolve() != target.resolve():
            shutil.move(str(source), str(target))  # a rename on one file system; the mapping stays valid
            lists.filename = str(target)
            try:
                source.parent.rmdir()
            except OSError:
                pass
    faiss.write_index(index, str(path))


def read_index(path: str | os.PathLike) -> faiss.Index:
    """`faiss.read_index` that finds an on-disk index's `.ivfdata` beside the `.faiss` file wherever the folder
    now is; the lists are memory-mapped read-only, not loaded."""
    return faiss.read_index(str(path), READ_FLAGS)
