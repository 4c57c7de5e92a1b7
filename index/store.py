"""The read side of an index: search the faiss index, look ids up in the metadata. Used by the server and by
evaluation; safe to share between threads.

`SearchIndex.open` takes a plain index folder or a versioned root (`asymsearch.index.versions`), whose CURRENT
version it opens; `.version` says which (None for a plain folder). An opened index keeps serving the version it
opened, even after a newer one is published or the old folder is pruned (its files stay open).

Filtered search (`search(..., filter=...)`, an `asymsearch.core.filters.Filter` on `label` and the user metadata
columns): the ids that match come from SQLite (one parameterised query on a second read-only connection, under a
step budget, cached per filter), and faiss searches only those ids through an ID selector (`SearchParameters*.sel`).
The rule, so that a query gets min(k, matches) results, never fewer:

- an exhaustive index (Flat, SQ: every code is scored) searches with the selector: exact over the matching items
  (for Flat, equal to brute force over them);
- an IVF or HNSW index whose matching items number at most `SUBSET_EXACT_MAX` searches the subset exactly: by
  reconstructing the matching vectors and scoring them all, in blocks of `SUBSET_BLOCK` (IVF-Flat through a direct
  map built on first use), other IVF kinds with the selector and every list probed (nprobe = nlist). For IVF-Flat
  and HNSW-Flat that is brute force over the subset; for PQ / SQ codes it is exact over the stored codes;
- a larger subset takes the approximate search with the selector at the index's own nprobe / efSearch, and any
  query that gets fewer than min(k, matches) results from it is searched again on the exact subset path.
"""
from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any, Sequence

import faiss
import numpy as np

from asymsearch.core.errors import ManifestError, UserError
from asymsearch.core.filters import Filter, parse_filter
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
SUBSET_EXACT_MAX = 32_768  # IVF / HNSW: at most this many matching items are searched exactly (see the docstring)
SUBSET_BLOCK = 16_384  # reconstructed vectors scored at a time on the exact subset path
FILTER_CACHE_BYTES = 64 * 2**20  # matching ids kept per filter text, least recently used dropped beyond this
FILTER_CACHE_ENTRIES = 64
FILTER_SQL_STEPS = 2_000_000_000  # SQLite VM steps one filter may take (a 1M-item label filter takes ~3e7)
_PROGRESS_EVERY = 100_000  # SQLite VM steps between two calls of the budget check


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
        self._filter_db: sqlite3.Connection | None = None  # a second connection, so long filter scans do not hold
        self._filter_lock = threading.Lock()  # up the lookups of other queries
        self._filter_cache: OrderedDict[str, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self._cache_lock = threading.Lock()
        self.filter_fields: tuple[str, ...] = ("label",)  # what a filter may name: label and the user columns

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
        try:
            fields = [r[0] for r in db.execute("SELECT DISTINCT j.key FROM items, json_each(items.extra) AS j "
                                                "WHERE items.extra IS NOT NULL ORDER BY j.key")]
            filter_db = sqlite3.connect(f"file:{folder / META_FILE}?mode=ro", uri=True, check_same_thread=False)
        except sqlite3.Error as e:
            db.close()
            raise ManifestError(f"cannot read metadata {folder / META_FILE}: {e}") from None
        opened = cls(folder, manifest, index, db, root=root, version=version)
        opened.manifest_id = digest
        opened.filter_fields = ("label", *(str(f) for f in fields if f not in ("id", "path", "label")))
        opened._filter_db = filter_db
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

    def search(self, vectors: np.ndarray, k: int, *, filter: Filter | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
        """Query vectors (Q, dim) -> scores (Q, k') float32 and ids (Q, k') int64, k' = min(k, count), or with a
        `filter` k' = min(k, matching items): every row then holds k' real hits (see the module docstring)."""
        vectors = np.asarray(vectors)
        if vectors.ndim != 2 or vectors.shape[1] != self.dim:
            raise ValueError(f"query vectors must have shape (Q, {self.dim}) for this index, got {vectors.shape}")
        if k < 1:
            raise ValueError(f"k must be at least 1, not {k}")
        if self._index is None:
            raise ValueError(f"index {self.folder} is closed")
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if filter is not None:
            return self._search_filtered(vectors, int(k), filter)
        scores, ids = search_faiss(self._index, vectors, min(int(k), self.count))
        return scores, ids

    # -- filters ----------------------------------------------------------------------------------------------

    def parse_filter(self, text: str) -> Filter | None:
        """`text` parsed against this index's `filter_fields` (None for an empty text); `FilterError` else."""
        return parse_filter(text, self.filter_fields)

    def matching_ids(self, filter: Filter) -> np.ndarray:
        """The ids whose metadata match `filter`, ascending (from SQLite; cached per filter text)."""
        return self._matches(filter)[0]

    def _matches(self, filter: Filter) -> tuple[np.ndarray, np.ndarray]:
        unknown = [f for f in filter.fields if f not in self.filter_fields]
        if unknown:  # parsed against another index (e.g. before a swap): parse again, for the position
            parse_filter(filter.text, self.filter_fields)
            raise UserError(f"filter field {unknown[0]!r} is not in this index; the fields are: "
                            f"{', '.join(self.filter_fields)}")
        key = filter.canonical
        with self._cache_lock:
            hit = self._filter_cache.get(key)
            if hit is not None:
                self._filter_cache.move_to_end(key)
                return hit
        where, params = filter.to_sqlite()
        with self._filter_lock:
            con = self._filter_db
            if con is None:
                raise ValueError(f"index {self.folder} is closed")
            steps = [0]

            def budget() -> int:
                steps[0] += _PROGRESS_EVERY
                return 1 if steps[0] > FILTER_SQL_STEPS else 0
            con.set_progress_handler(budget, _PROGRESS_EVERY)
            try:
                ids = np.fromiter((r[0] for r in con.execute(f"SELECT id FROM items WHERE {where} ORDER BY id",
                                                             params)), dtype=np.int64)
            except sqlite3.OperationalError as e:
                if steps[0] > FILTER_SQL_STEPS:
                    raise UserError(f"the filter is too costly to evaluate over {self.count} items (more than "
                                    f"{FILTER_SQL_STEPS:.0e} SQLite steps); simplify it") from None
                raise UserError(f"the filter could not be evaluated: {e}") from None
            finally:
                con.set_progress_handler(None, 0)
        mask = np.zeros(int(ids[-1]) + 1 if len(ids) else 1, bool)
        mask[ids] = True
        bitmap = np.packbits(mask, bitorder="little")  # bit i of byte i >> 3: faiss's IDSelectorBitmap layout
        entry = (ids, bitmap)
        with self._cache_lock:
            self._filter_cache[key] = entry
            total = sum(a.nbytes + b.nbytes for a, b in self._filter_cache.values())
            while len(self._filter_cache) > 1 and (total > FILTER_CACHE_BYTES
                                                   or len(self._filter_cache) > FILTER_CACHE_ENTRIES):
                _, (a, b) = self._filter_cache.popitem(last=False)
                total -= a.nbytes + b.nbytes
        return entry

    def _search_filtered(self, vectors: np.ndarray, k: int, filter: Filter) -> tuple[np.ndarray, np.ndarray]:
        ids, bitmap = self._matches(filter)
        k = min(k, len(ids))
        if k == 0:
            return np.zeros((len(vectors), 0), np.float32), np.zeros((len(vectors), 0), np.int64)
        selector = faiss.IDSelectorBitmap(len(bitmap), faiss.swig_ptr(bitmap))
        kind, core = _index_kind(self._index)
        if kind == "exhaustive":
            return self._index.search(vectors, k, params=faiss.SearchParameters(sel=selector))
        if len(ids) <= SUBSET_EXACT_MAX:
            return self._search_subset(vectors, k, ids, selector, kind, core)
        if kind == "ivf":
            params = faiss.SearchParametersIVF(sel=selector, nprobe=core.nprobe, max_codes=core.max_codes)
        elif kind == "hnsw":
            params = faiss.SearchParametersHNSW(sel=selector, efSearch=core.hnsw.efSearch)
        else:
            return self._search_subset(vectors, k, ids, selector, kind, core)
        scores, found = self._index.search(vectors, k, params=params)
        short = np.flatnonzero((found >= 0).sum(axis=1) < k)
        if len(short):  # the approximate search came back with fewer than k: those queries go exact
            scores[short], found[short] = self._search_subset(vectors[short], k, ids, selector, kind, core)
        return scores, found

    def _direct_map(self, ivf: faiss.Index) -> bool:
        """Whether the IVF-Flat `ivf` (directly inside the IDMap2) can reconstruct by position: builds its direct
        map on first use (8 bytes per vector; a hash table where positions have gaps). False for other IVFs."""
        if not isinstance(ivf, faiss.IndexIVFFlat) or not isinstance(self._index, faiss.IndexIDMap2) or \
                not isinstance(faiss.downcast_index(self._index.index), faiss.IndexIVFFlat):  # no pre-transform
            return False
        with self._cache_lock:
            if ivf.direct_map.type == faiss.DirectMap.NoMap:
                try:
                    ivf.make_direct_map()
                except RuntimeError:  # positions not 0..n-1: a hash table instead
                    ivf.set_direct_map_type(faiss.DirectMap.Hashtable)
        return True

    def _search_subset(self, vectors: np.ndarray, k: int, ids: np.ndarray, selector: faiss.IDSelector, kind: str,
                       core: faiss.Index) -> tuple[np.ndarray, np.ndarray]:
        """Exact over the matching items: their reconstructed vectors (IVF-Flat through a direct map, built once);
        other IVF kinds with the selector and every list probed (no decoding of codes here)."""
        if kind == "ivf" and not self._direct_map(core):
            return self._index.search(vectors, k, params=faiss.SearchParametersIVF(sel=selector, nprobe=core.nlist,
                                                                                   max_codes=0))
        best_s = np.full((len(vectors), k), -np.inf, np.float32)
        best_i = np.full((len(vectors), k), -1, np.int64)
        for start in range(0, len(ids), SUBSET_BLOCK):
            block = ids[start:start + SUBSET_BLOCK]
            stored = self._index.reconstruct_batch(block)
            s = np.concatenate([best_s, vectors @ stored.T], axis=1)
            i = np.concatenate([best_i, np.broadcast_to(block, (len(vectors), len(block)))], axis=1)
            top = np.argpartition(-s, k - 1, axis=1)[:, :k]
            best_s, best_i = np.take_along_axis(s, top, 1), np.take_along_axis(i, top, 1)
        order = np.argsort(-best_s, axis=1, kind="stable")
        return np.take_along_axis(best_s, order, 1), np.take_along_axis(best_i, order, 1)

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

    def lookup_records(self, ids: Sequence[int], *, skip_missing: bool = False) -> list[dict[str, Any]]:
        """{"id", "path", "label", plus the user's metadata columns} for each id, in the given order; `KeyError`
        for an id the index does not hold (left out instead with `skip_missing`). User columns never shadow id,
        path or label."""
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
        if missing and not skip_missing:
            raise KeyError(f"ids not in index {self.folder}: {missing[:10]}")
        return [dict(found[i]) for i in wanted if i in found]

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
        with self._filter_lock:
            if self._filter_db is not None:
                self._filter_db.close()
                self._filter_db = None
        self._index = None

    def __enter__(self) -> "SearchIndex":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"SearchIndex({str(self.root)!r}, version={self.version!r}, factory={self.manifest.factory!r}, count={self.count}, "
                f"dim={self.dim}, teacher_id={self.teacher_id!r})")


def _index_kind(index: faiss.Index) -> tuple[str, faiss.Index]:
    """("exhaustive" | "ivf" | "hnsw" | "other", the index inside the IDMap2 and any pre-transforms). Exhaustive:
    a flat or scalar-quantizer index, which scores every code and takes an ID selector (IndexPQ does not)."""
    inner = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap2) else index
    while isinstance(inner, faiss.IndexPreTransform):
        inner = faiss.downcast_index(inner.index)
    if isinstance(inner, faiss.IndexIVF):
        return "ivf", inner
    if isinstance(inner, faiss.IndexHNSW):
        return "hnsw", inner
    if isinstance(inner, (faiss.IndexFlat, faiss.IndexScalarQuantizer)):
        return "exhaustive", inner
    return "other", inner
