"""The read side of an index: search the faiss index, look ids up in the metadata. Used by the server and by
evaluation; safe to share between threads.

`SearchIndex.open` takes a plain index folder or a versioned root (`asymsearch.index.versions`), whose CURRENT
version it opens; `.version` says which (None for a plain folder). An opened index keeps serving the version it
opened, even after a newer one is published or the old folder is pruned (its files stay open).
"""
from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import threading
from pathlib import Path
from typing import Any, Sequence

import faiss
import numpy as np

from asymsearch.core.errors import ManifestError, UserError
from asymsearch.core.manifest import IndexManifest
from asymsearch.index.faiss_index import to_gpus
from asymsearch.index.versions import resolve_index_folder

INDEX_FILE = "index.faiss"  # the faiss index, always a CPU index
META_FILE = "meta.sqlite"  # items(id INTEGER PRIMARY KEY, path TEXT NOT NULL UNIQUE, label TEXT NOT NULL, extra TEXT)
MANIFEST_FILE = "manifest.json"  # IndexManifest
SKIPPED_FILE = "skipped.tsv"  # the build's report of unreadable files: path<TAB>reason
OPEN_ATTEMPTS = 3  # a version pruned between reading CURRENT and opening its files: read CURRENT again
# faiss (1.15) computes exact inner products query by query below `distance_compute_blas_threshold` queries (its
# default is 128k), so a batch costs as much per query as single searches. Batches of at least this many queries
# take the BLAS path (one matrix product); smaller ones keep the scan, which is faster for them (a single query
# cost about 3x more CPU on the BLAS path in a quick check here). 16 queries on 100k x 512 Flat: 1.96 vs 7.57 CPU
# ms per query (docs/results/bench_index_flat_batch.md).
BLAS_MIN_QUERIES = 4
_blas_lock = threading.Lock()  # the threshold is a faiss global: batched calls set and restore it one at a time


def search_faiss(index: faiss.Index, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """`index.search`, on faiss's BLAS path for batches of `BLAS_MIN_QUERIES` or more and on its scan path for
    fewer (whatever the global threshold says). Same ids as the scan; scores equal to float rounding."""
    if len(vectors) < BLAS_MIN_QUERIES:
        return index.search(vectors, k)
    with _blas_lock:
        before = faiss.cvar.distance_compute_blas_threshold
        faiss.cvar.distance_compute_blas_threshold = BLAS_MIN_QUERIES  # a single query meanwhile still scans
        try:
            return index.search(vectors, k)
        finally:
            faiss.cvar.distance_compute_blas_threshold = before


def manifest_id(folder: str | os.PathLike) -> str:
    """The id of the index in `folder`: the first 16 hex digits of the SHA-256 of its manifest.json (what
    `asymsearch info` prints). Two versions with the same name but other content have other ids."""
    try:
        return hashlib.sha256((Path(folder) / MANIFEST_FILE).read_bytes()).hexdigest()[:16]
    except OSError as e:
        raise UserError(f"cannot read the manifest of {folder}: {e.strerror or e}") from None


class SearchIndex:
    """An opened index folder. `search` returns inner-product scores and ids (best first); `lookup` turns ids into
    (path, label). An approximate index may return fewer than k real hits for a query: the rest are id -1."""

    def __init__(self, folder: Path, manifest: IndexManifest, index: faiss.Index, db: sqlite3.Connection, *,
                 root: Path | None = None, version: str | None = None) -> None:
        self.folder = folder  # the folder the files were read from (the version folder of a versioned root)
        self.root = root or folder  # what was opened: the versioned root, or the plain folder itself
        self.version = version  # e.g. "v000003", or None for a plain folder
        self.manifest_id = ""  # the digest of manifest.json (`manifest_id`): which index this is, whatever its name
        self.manifest = manifest
        self._index = index
        self._db = db
        self._db_lock = threading.Lock()

    @classmethod
    def open(cls, path: str | os.PathLike, *, gpu: bool = True) -> "SearchIndex":
        """Open a plain index folder or the CURRENT version of a versioned root. With `gpu` and a faiss built
        with GPUs, the index is searched on all of them (the files stay CPU indexes)."""
        for attempt in range(OPEN_ATTEMPTS):
            folder, version = resolve_index_folder(path)
            try:
                return cls._open_folder(folder, Path(path).resolve(), version, gpu)
            except UserError:
                if version is None or attempt == OPEN_ATTEMPTS - 1 or resolve_index_folder(path)[1] == version:
                    raise
        raise AssertionError("unreachable")

    @classmethod
    def _open_folder(cls, folder: Path, root: Path, version: str | None, gpu: bool) -> "SearchIndex":
        if not folder.is_dir():
            raise UserError(f"index folder not found: {folder}")
        for name in (MANIFEST_FILE, INDEX_FILE, META_FILE):
            if not (folder / name).is_file():
                raise UserError(f"index folder {folder} is incomplete: {folder / name} is missing")
        manifest = IndexManifest.load(folder / MANIFEST_FILE)
        digest = manifest_id(folder)
        try:
            index = faiss.read_index(str(folder / INDEX_FILE), faiss.IO_FLAG_ONDISK_SAME_DIR)  # index.ivfdata beside it
        except RuntimeError as e:
            raise ManifestError(f"cannot read faiss index {folder / INDEX_FILE}: {e}") from None
        if index.d != manifest.dim or index.ntotal != manifest.count:
            raise ManifestError(f"{folder / INDEX_FILE} holds {index.ntotal} vectors of dimension {index.d} but "
                                f"its manifest says {manifest.count} of dimension {manifest.dim}; rebuild the index")
        if gpu:
            index = to_gpus(index)
        for name, value in manifest.search_params.items():
            try:
                faiss.ParameterSpace().set_index_parameter(index, name, float(value))
            except RuntimeError as e:
                raise ManifestError(f"search parameter {name}={value} in {folder / MANIFEST_FILE} does not apply "
                                    f"to a {manifest.factory!r} index: {e}") from None
        try:
            db = sqlite3.connect(f"file:{folder / META_FILE}?mode=ro", uri=True, check_same_thread=False)
        except sqlite3.Error as e:  # e.g. the version was pruned a moment ago
            raise ManifestError(f"cannot open metadata {folder / META_FILE}: {e}") from None
        try:
            rows = db.execute("SELECT COUNT(*) FROM items").fetchone()[0]
        except sqlite3.DatabaseError as e:
            db.close()
            raise ManifestError(f"cannot read metadata {folder / META_FILE}: {e}") from None
        if rows != manifest.count:
            db.close()
            raise ManifestError(f"{folder / META_FILE} lists {rows} images but the index holds {manifest.count}; "
                                f"rebuild the index")
        opened = cls(folder, manifest, index, db, root=root, version=version)
        opened.manifest_id = digest
        return opened

    @property
    def dim(self) -> int:
        return self.manifest.dim

    @property
    def count(self) -> int:
        return self.manifest.count

    @property
    def teacher_id(self) -> str:
        return self.manifest.teacher_id

    def search(self, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Query vectors (Q, dim) -> scores (Q, k') float32 and ids (Q, k') int64, k' = min(k, count)."""
        vectors = np.asarray(vectors)
        if vectors.ndim != 2 or vectors.shape[1] != self.dim:
            raise ValueError(f"query vectors must have shape (Q, {self.dim}) for this index, got {vectors.shape}")
        if k < 1:
            raise ValueError(f"k must be at least 1, not {k}")
        if self._index is None:
            raise ValueError(f"index {self.folder} is closed")
        scores, ids = search_faiss(self._index, np.ascontiguousarray(vectors, dtype=np.float32),
                                   min(int(k), self.count))
        return scores, ids

    def lookup(self, ids: Sequence[int]) -> list[tuple[str, str]]:
        """(path, label) for each id, in the given order; `KeyError` for an id the index does not hold."""
        wanted = [int(i) for i in ids]
        if not wanted:
            return []
        found = {i: (path, label) for i, path, label in self._rows(wanted, "id, path, label")}
        missing = [i for i in wanted if i not in found]
        if missing:
            raise KeyError(f"ids not in index {self.folder}: {missing[:10]}")
        return [found[i] for i in wanted]

    def lookup_records(self, ids: Sequence[int]) -> list[dict[str, Any]]:
        """{"id", "path", "label", plus the user's metadata columns} for each id, in the given order; `KeyError`
        for an id the index does not hold. User columns never shadow id, path or label."""
        wanted = [int(i) for i in ids]
        if not wanted:
            return []
        rows = self._rows(wanted, "id, path, label, extra")
        found = {}
        for i, path, label, extra in rows:
            record = json.loads(extra) if extra else {}
            record.update(id=i, path=path, label=label)
            found[i] = record
        missing = [i for i in wanted if i not in found]
        if missing:
            raise KeyError(f"ids not in index {self.folder}: {missing[:10]}")
        return [dict(found[i]) for i in wanted]

    def ids(self) -> np.ndarray:
        """Every id the index holds, ascending (0..count-1 after a build; gaps after removals)."""
        with self._db_lock:
            if self._db is None:
                raise ValueError(f"index {self.folder} is closed")
            return np.asarray([r[0] for r in self._db.execute("SELECT id FROM items ORDER BY id")], dtype=np.int64)

    def _rows(self, wanted: list[int], columns: str) -> list[tuple]:
        # one query whatever the number of ids: they travel as one JSON array, not as SQL variables
        with self._db_lock:
            if self._db is None:
                raise ValueError(f"index {self.folder} is closed")
            return self._db.execute(f"SELECT {columns} FROM items WHERE id IN (SELECT value FROM json_each(?))",
                                    (json.dumps(sorted(set(wanted))),)).fetchall()

    def close(self) -> None:
        with self._db_lock:
            if self._db is not None:
                self._db.close()
                self._db = None
        self._index = None

    def __enter__(self) -> "SearchIndex":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"SearchIndex({str(self.root)!r}, version={self.version!r}, factory={self.manifest.factory!r}, count={self.count}, "
                f"dim={self.dim}, teacher_id={self.teacher_id!r})")
