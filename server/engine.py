"""The query engine: the server's plain logic, with no gRPC in it.

A query (an encoded image, or a vector the student already computed elsewhere) is validated, embedded with the
student when it is an image, L2-normalised, and searched in the teacher's index. Anything wrong with a query
raises `InvalidQuery` with a message that names the problem; the gRPC layer turns that into a status.

The engine works on batches (`prepare_image` -> `embed_prepared` -> `search_batch`) so that the dynamic batcher
(`asymsearch.server.batching`) can run one model call and one faiss call for many concurrent queries; the
single-query `search_image` / `search_vector` are the same steps with a batch of one.

Hot swap: the served index is a `ServedIndex` (an opened version and a count of the batches using it).
`reload()` opens the new version beside the old one, checks that the student pairs with it, switches the
reference atomically, and closes the old one once the last batch using it has finished (drain). A new version
whose teacher differs from the student's is refused with `PairingError` and the old one keeps serving.

Scales: queries are always embedded once, at the student's own size, which keeps a query as cheap as the
student is meant to be. An index whose database was embedded multi-scale (`index build --multiscale`,
`build["scales"]` in its manifest) is served as it is (the multi-scale mean lives in the same space); the
engine logs the scales (and flip, `index build --flip`) when it opens or swaps in such an index, so the asymmetry
is visible in the log.

Tiers (`asymsearch.server.tiers`): the engine holds one or more students, each a named tier (the first is the
default) paired with the index and gated on its probe set at load. A query names its tier (empty: the default);
an unknown name is `InvalidQuery` listing the tiers. A vector query may carry the id of the student that made it:
one this engine has never loaded (so never paired with the index) is refused, naming both ids. `load_tier` adds or
replaces a tier beside the served ones (copy on write: a query admitted before the switch is embedded by the tier
it was admitted with, so a swap under load loses none); a tier that does not pair or fails the gate is refused and
the one it would replace keeps serving. `reload` checks every tier against the new index, and gates them again
when its probe set differs from the served one's.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from asymsearch.core.errors import InvalidImage, PairingError, UserError
from asymsearch.core.filters import Filter, FilterError, parse_filter
from asymsearch.core.manifest import check_pairing
from asymsearch.core.multiscale import SINGLE_SCALE, index_flip, index_scales
from asymsearch.core.ort import OnnxEmbedder
from asymsearch.core.preprocess import DEFAULT_MAX_PIXELS, decode_image, decoded_nbytes, preprocess
from asymsearch.index.probe import find_probe
from asymsearch.index.backend import StoreUnavailable, current_id, is_milvus, open_index
from asymsearch.index.store import SearchIndex
from asymsearch.index.versions import resolve_index_folder
from asymsearch.server.admission import Closed
from asymsearch.server.tiers import DEFAULT_TIER, GatePolicy, Tier, gate_tier, load_tier, tier_of

log = logging.getLogger(__name__)


class InvalidQuery(UserError):
    """A query the engine refuses: an empty or undecodable image, a malformed vector, or a k out of range."""


class IndexUnavailable(Closed):
    """The store behind the served index (a Milvus address) does not answer: UNAVAILABLE, naming the address."""


class UnknownTier(InvalidQuery):
    """A query names a tier the server does not have."""


class StudentMismatch(InvalidQuery):
    """A vector query says it was made by a student that this server has not paired with the index."""


@dataclasses.dataclass(frozen=True)
class Hit:
    id: int
    score: float  # inner product of the normalised query and the database embedding
    path: str
    label: str
    metadata: dict[str, str] = dataclasses.field(default_factory=dict, compare=False)


@dataclasses.dataclass(frozen=True)
class SearchResult:
    hits: list[Hit]
    embed_ms: float  # decoding and embedding the image; 0 for a vector query
    search_ms: float  # the index search and the lookup of paths and labels
    index_version: str = ""
    queue_ms: float = 0.0
    decode_ms: float = 0.0
    batch_size: int = 1


class ServedIndex:
    """One opened index version and the number of batches using it; closed once retired and unused."""

    def __init__(self, index: SearchIndex, version: str | None) -> None:
        self.index = index
        self.version = version or ""
        self._users = 0
        self._retired = False
        self._lock = threading.Lock()
        self.drained = threading.Event()

    def acquire(self) -> None:
        with self._lock:
            self._users += 1

    def release(self) -> None:
        with self._lock:
            self._users -= 1
            close = self._retired and self._users == 0
        if close:
            self._close()

    def retire(self) -> None:
        """No new users will come; close now if none is left, else when the last one releases."""
        with self._lock:
            self._retired = True
            close = self._users == 0
        if close:
            self._close()

    def _close(self) -> None:
        self.index.close()
        self.drained.set()
        log.info("closed index version %r", self.version, extra={"event": "index_closed", "version": self.version})


class QueryEngine:
    """Answers queries against `index` with `student` embedding the query images.

    `student` is one embedder (the tier "default") or a sequence of `Tier`s (the first is the default). Every
    student must belong to the teacher that embedded the index (same teacher id and dimension), else
    `PairingError`; each is gated on the index's probe set under `gate` (`GatePolicy`; the default measures the
    figures where a probe set exists and refuses nothing). A teacher model may serve as the query model too
    (symmetric search) on the same terms. `source` is where `reload()` looks for new versions (an index root with
    CURRENT, or a folder).
    """

    def __init__(self, index: SearchIndex, student: OnnxEmbedder | Sequence[Tier], *, default_k: int = 10,
                 max_k: int = 1000, max_pixels: int = DEFAULT_MAX_PIXELS, version: str | None = None,
                 source: str | os.PathLike | None = None, gate: GatePolicy = GatePolicy()) -> None:
        tiers = [tier_of(student)] if isinstance(student, OnnxEmbedder) else list(student)
        if not tiers:
            raise UserError("an engine needs at least one student tier")
        for tier in tiers:
            check_pairing(tier.student.manifest, index.manifest,
                          query_name=f"tier {tier.name!r} ({tier.student.path}, student {tier.student_id})")
        if len({t.name for t in tiers}) != len(tiers):
            raise UserError("tier names must be unique")
        if not 1 <= default_k <= max_k:
            raise UserError(f"need 1 <= default_k <= max_k, got default_k={default_k}, max_k={max_k}")
        if max_pixels < 1:
            raise UserError(f"max_pixels must be positive, got {max_pixels}")
        self.gate = gate
        probe = find_probe(index)
        tiers = [gate_tier(t, index, gate, probe) for t in tiers]
        self._tiers: dict[str, Tier] = {t.name: t for t in tiers}  # replaced whole (copy on write), never mutated
        self._known_students = {t.student_id for t in tiers}  # every student loaded (so paired) on this engine
        self._probe_digest = _probe_digest(probe)
        self.default_k = default_k
        self.max_k = max_k
        self.max_pixels = max_pixels
        self.source = _as_source(source if source is not None else index.folder)
        self._served = ServedIndex(index, version)
        self._swap_lock = threading.Lock()  # one reload at a time
        self._ref_lock = threading.Lock()  # guards the switch of `_served` against `using_index`
        _log_scales(index)

    @classmethod
    def open(cls, index_dir: str | os.PathLike,
             student_onnx: str | os.PathLike | Sequence[tuple[str, str | os.PathLike]], *,
             intra_op_threads: int = 0, **kw: Any) -> "QueryEngine":
        """Open the index (a folder, or a root whose CURRENT names the version) and the student ONNX (with its
        manifest), or several as [(tier, path), ...], and check that they pair and pass the gate (`gate=`).

        `intra_op_threads` goes to onnxruntime (0: its default, all cores); other keyword arguments go to the
        constructor. Raises `PairingError` naming both teacher ids on a mismatch.
        """
        specs = ([(DEFAULT_TIER, student_onnx)] if isinstance(student_onnx, (str, os.PathLike))
                 else list(student_onnx))
        tiers = [tier_of(OnnxEmbedder(path, intra_op_threads=intra_op_threads), name) for name, path in specs]
        index = open_index(index_dir)  # resolves CURRENT (or a Milvus alias), retrying as SearchIndex/MilvusIndex do
        try:
            return cls(index, tiers, version=index.version, source=index_dir, **kw)
        except BaseException:
            index.close()
            raise

    # -- what is served -------------------------------------------------------------------------------------

    @property
    def index(self) -> SearchIndex:
        return self._served.index

    @property
    def index_version(self) -> str:
        return self._served.version

    @property
    def dim(self) -> int:
        return self.student.dim

    # -- tiers ----------------------------------------------------------------------------------------------

    @property
    def tiers(self) -> list[Tier]:
        """The tiers, the default first."""
        return list(self._tiers.values())

    @property
    def student(self) -> OnnxEmbedder:
        """The default tier's student."""
        return next(iter(self._tiers.values())).student

    def tier(self, name: "str | Tier | None" = None) -> Tier:
        """The tier called `name` (empty or None: the default); `UnknownTier` listing the tiers otherwise."""
        if isinstance(name, Tier):
            return name
        tiers = self._tiers
        if not name:
            return next(iter(tiers.values()))
        try:
            return tiers[name]
        except KeyError:
            raise UnknownTier(f"unknown tier {name[:64]!r}; this server's tiers: {', '.join(tiers)} (see Info; "
                              f"empty: {next(iter(tiers))})") from None

    def load_tier(self, name: str, path: str | os.PathLike, *, intra_op_threads: int = 0) -> tuple[bool, Tier]:
        """Open the student `path` as tier `name` beside the served ones, check it pairs with the served index and
        passes the gate, then switch that tier to it (a new name adds a tier, at the end). (replaced, tier).

        On any failure (`PairingError`, `GateRefused`, `NoProbeSet`, a bad file) nothing changes. Queries already
        admitted keep the tier object they were admitted with, so none is lost."""
        with self._swap_lock:
            with self.using_index() as served:
                tier = load_tier(name, path, served.index, self.gate, intra_op_threads=intra_op_threads)
            with self._ref_lock:
                replaced = name in self._tiers
                self._tiers = {**self._tiers, name: tier}
                self._known_students = self._known_students | {tier.student_id}
        log.info("tier %r now served by %s (student %s)%s", name, path, tier.student_id,
                 " (replaced)" if replaced else " (added)",
                 extra={"event": "tier_loaded", "tier": name, "student_id": tier.student_id, "replaced": replaced})
        return replaced, tier

    @contextlib.contextmanager
    def using_index(self) -> Iterator[ServedIndex]:
        """The served index, kept open (not closed by a concurrent swap) until the block ends."""
        with self._ref_lock:
            served = self._served
            served.acquire()
        try:
            yield served
        finally:
            served.release()

    def reload(self, path: str | os.PathLike | None = None, *, drain_timeout: float | None = None,
               keep_source: bool = False) -> tuple[bool, str]:
        """Serve the version `path` (default: `source`) resolves to; return (changed, version). A `path` becomes
        the new `source` (what later reloads and updates act on) unless `keep_source`.

        The new index is opened and checked beside the served one; on any failure (a missing file, a student of
        another teacher) the old one keeps serving and the error propagates. `drain_timeout` > 0 waits that long
        for the batches still on the old version; it is closed when they finish either way.
        """
        with self._swap_lock:
            source = _as_source(path) if path is not None else self.source
            current = self._served
            if is_milvus(source):  # the collection behind the alias, told apart by manifest id (in-place adds)
                if current_id(source) == current.index.manifest_id:
                    return False, current.version
            else:
                folder, version = resolve_index_folder(source)
                if folder.resolve() == Path(current.index.folder).resolve() and (version or "") == current.version:
                    return False, current.version
            start = time.perf_counter()
            new_index = open_index(source)  # CURRENT again, retried if that version was pruned meanwhile
            folder, version = new_index.folder, new_index.version
            if keep_source and version is None:
                version = Path(folder).name  # a version folder of the source root, served by its name
            if (new_index.manifest_id == current.index.manifest_id if is_milvus(source) else
                    Path(folder).resolve() == Path(current.index.folder).resolve()
                    and (version or "") == current.version):
                new_index.close()  # CURRENT moved back between the two reads
                return False, current.version
            try:
                for tier in self.tiers:
                    check_pairing(tier.student.manifest, new_index.manifest,
                                  query_name=f"tier {tier.name!r} ({tier.student.path}, student {tier.student_id})")
                probe = find_probe(new_index)
                digest = _probe_digest(probe)
                regated = None
                if digest != self._probe_digest:  # a probe set of other images: every tier is gated again
                    regated = {t.name: gate_tier(t, new_index, self.gate, probe)
                               for t in self.tiers}
                if new_index.count:  # warm the new index before it takes traffic
                    new_index.search(np.zeros((1, new_index.dim), np.float32) + 1.0 / math.sqrt(new_index.dim), 1)
            except BaseException:
                new_index.close()
                raise
            _log_scales(new_index)
            new = ServedIndex(new_index, version)
            with self._ref_lock:
                old, self._served = self._served, new
                if regated is not None:
                    self._tiers = {name: regated.get(name, t) for name, t in self._tiers.items()}
                self._probe_digest = digest
            if path is not None and not keep_source:
                self.source = source
            log.info("now serving index version %r (%d items) from %s; loaded in %.0f ms, draining %r",
                     new.version, new_index.count, folder, (time.perf_counter() - start) * 1e3, old.version,
                     extra={"event": "index_swapped", "version": new.version, "previous": old.version,
                            "count": new_index.count})
            old.retire()
            if drain_timeout:
                old.drained.wait(drain_timeout)
            return True, new.version

    def info(self) -> dict[str, Any]:
        with self.using_index() as served:
            m = served.index.manifest
            return {"teacher_id": served.index.teacher_id, "student_id": self.student.manifest.model_id,
                    "tiers": [t.info() for t in self.tiers],
                    "dim": served.index.dim, "count": served.index.count, "factory": m.factory, "metric": m.metric,
                    "max_k": self.max_k, "default_k": self.default_k, "index_version": served.version,
                    "search_params": {str(k): str(v) for k, v in m.search_params.items()},
                    "student_architecture": json.dumps(self.student.manifest.architecture, sort_keys=True),
                    "max_pixels": self.max_pixels, "filter_fields": list(_filter_fields(served.index)),
                    "backend": str(getattr(served.index, "backend", "faiss"))}

    def parse_filter(self, text: str) -> Filter | None:
        """A query's filter text parsed against the served index's fields (None when empty); `InvalidQuery` naming
        the position, or listing the fields for an unknown one. The index checks the fields again at search time
        (a swap may change them)."""
        if not text or not text.strip():
            return None
        with self.using_index() as served:
            fields = _filter_fields(served.index)
        try:
            return parse_filter(text, fields)
        except FilterError as e:
            raise InvalidQuery(str(e)) from None

    def close(self) -> None:
        with self._ref_lock:
            self._served.retire()

    def __enter__(self) -> "QueryEngine":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the batch steps ------------------------------------------------------------------------------------

    def resolve_k(self, k: int) -> int:
        if k < 0:
            raise InvalidQuery(f"k must be positive (or 0 for the default of {self.default_k}), got {k}")
        if k > self.max_k:
            raise InvalidQuery(f"k={k} exceeds this server's max_k of {self.max_k}")
        return k or self.default_k

    def _read_image(self, read: Callable[..., Any], data: bytes, tier: "str | Tier | None" = None) -> Any:
        """`read(bytes, max_pixels, min_side=...)` (decode, or its size from the header) as every query is read:
        at no more than the tier's student's resize; `InvalidQuery` for an empty or unreadable image."""
        if not data:
            raise InvalidQuery("empty image: the query carries no image bytes")
        student = self.tier(tier).student
        try:
            return read(bytes(data), self.max_pixels, min_side=student.manifest.preprocessing.resize)
        except InvalidImage as e:
            raise InvalidQuery(str(e)) from None

    def prepare_image(self, data: bytes, tier: "str | Tier | None" = None) -> np.ndarray:
        """Encoded image -> the tier's student's input (3, crop, crop) float32; `InvalidQuery` when it is not an
        image or has more than `max_pixels` pixels (checked from the header, before decoding)."""
        return preprocess(self._read_image(decode_image, data, tier), self.tier(tier).student.manifest.preprocessing)

    def image_nbytes(self, data: bytes, tier: "str | Tier | None" = None) -> tuple[int, int]:
        """(decoded, prepared) bytes an image query will occupy: its 8-bit RGB image, computed from the header
        before any pixel is decoded, and the student's float32 input. `InvalidQuery` for an empty image or a header
        that is not an image's. The memory budget admits image queries on these figures."""
        crop = self.tier(tier).student.manifest.preprocessing.crop
        return self._read_image(decoded_nbytes, data, tier), 3 * crop * crop * 4

    def embed_prepared(self, pixels: np.ndarray, tier: "str | Tier | None" = None) -> np.ndarray:
        """(N, 3, H, W) -> (N, dim) raw embeddings by the tier's student (normalise each with `normalise`)."""
        return self.tier(tier).student.embed_arrays(pixels)

    def check_student_id(self, student_id: str) -> None:
        """`StudentMismatch` unless `student_id` (empty: not given) is a student this engine loaded, and so
        paired with the index."""
        if student_id and student_id not in self._known_students:
            with self.using_index() as served:
                teacher = served.index.teacher_id
            raise StudentMismatch(
                f"the vector was made by student {student_id[:128]!r}, which this server has not paired with its "
                f"index (embedded by teacher {teacher}; its tiers' students: "
                f"{', '.join(f'{t.name}={t.student_id}' for t in self.tiers)}): embed with one of them")

    def check_vector(self, vector: Sequence[float] | np.ndarray, student_id: str = "") -> np.ndarray:
        """A vector the student computed elsewhere -> normalised float32 (dim,); `InvalidQuery` when it has the
        wrong size, non-finite values or zero length, `StudentMismatch` when `student_id` names a student this
        server has not paired with the index. Scores are cosine similarities whatever its scale."""
        self.check_student_id(student_id)
        v = np.asarray(vector, dtype=np.float32)
        if v.ndim != 1:
            raise InvalidQuery(f"the vector must be one-dimensional, got shape {v.shape}")
        if v.shape[0] != self.dim:
            raise InvalidQuery(f"the vector has {v.shape[0]} values; expected dim {self.dim}")
        if not np.isfinite(v).all():
            raise InvalidQuery("the vector contains NaN or infinite values")
        return self.normalise(v)

    @staticmethod
    def normalise(v: np.ndarray) -> np.ndarray:
        norm = float(np.linalg.norm(v.astype(np.float64)))
        if norm == 0.0 or not math.isfinite(norm):
            raise InvalidQuery("the vector has zero length and cannot be normalised")
        return (v / norm).astype(np.float32)

    def search_batch(self, vectors: np.ndarray, ks: Sequence[int], filters: Sequence[Filter | None] | None = None
                     ) -> tuple[list[list[Hit] | InvalidQuery], str]:
        """Normalised vectors (Q, dim), a k and a filter (or None) per query -> the hits of each query and the
        version that answered. A query whose filter this index refuses (its fields changed in a swap) gets an
        `InvalidQuery` in place of its hits; the others are answered.

        One faiss call per distinct filter (queries with different filters cannot share one), with the largest k
        of its queries, then one metadata lookup for all the ids of the batch.
        """
        groups: dict[str, list[int]] = {}
        for row, f in enumerate(filters if filters is not None else [None] * len(ks)):
            groups.setdefault(f.canonical if f is not None else "", []).append(row)
        with self.using_index() as served:
            index = served.index
            if index.count == 0:
                return [[] for _ in ks], served.version
            wanted: list[Any] = [None] * len(ks)
            try:
                for rows in groups.values():
                    f = filters[rows[0]] if filters is not None else None
                    try:
                        scores, ids = (index.search(vectors[rows], max(ks[r] for r in rows), filter=f) if f is not None
                                       else index.search(vectors[rows], max(ks[r] for r in rows)))
                    except StoreUnavailable:
                        raise
                    except UserError as e:  # e.g. a field this version no longer has
                        for r in rows:
                            wanted[r] = e if isinstance(e, InvalidQuery) else InvalidQuery(str(e))
                        continue
                    for j, r in enumerate(rows):  # approximate indexes pad with -1 when they find fewer than k
                        keep = ids[j, :ks[r]] >= 0
                        wanted[r] = (r, ids[j, :ks[r]][keep], scores[j, :ks[r]][keep])
                unique = sorted({int(i) for w in wanted if isinstance(w, tuple) for i in w[1]})
                records = _lookup(index, unique)
            except StoreUnavailable as e:
                raise IndexUnavailable(str(e)) from None
        out: list[list[Hit] | InvalidQuery] = []
        for w in wanted:
            if isinstance(w, InvalidQuery):
                out.append(w)
                continue
            _, row_ids, row_scores = w
            hits = []
            for i, s in zip(row_ids.tolist(), row_scores.tolist()):
                if i not in records:  # removed in place (Milvus) between the search and the lookup
                    continue
                path, label, meta = records[i]
                hits.append(Hit(int(i), float(s), path, label, meta))
            out.append(hits)
        return out, served.version

    # -- one query at a time (no batching) ------------------------------------------------------------------

    def search_image(self, data: bytes, k: int, tier: str = "", *, filter: str = "") -> SearchResult:
        """Decode `data`, embed it with the tier's student and search (only the items matching `filter`, when
        given). `k == 0` means `default_k`."""
        k = self.resolve_k(k)
        t = self.tier(tier)
        parsed = self.parse_filter(filter)
        start = time.perf_counter()
        pixels = self.prepare_image(data, t)
        vector = self.normalise(self.embed_prepared(pixels[None], t)[0])
        embed_ms = (time.perf_counter() - start) * 1e3
        return self._search_one(vector, k, embed_ms, parsed)

    def search_vector(self, vector: Sequence[float] | np.ndarray, k: int, tier: str = "",
                      student_id: str = "", *, filter: str = "") -> SearchResult:
        """Search with a vector the student computed elsewhere (e.g. on the user's device).

        The vector must have the index's dimension and finite values; the engine L2-normalises it before the
        search, so scores are cosine similarities whatever scale the sender used.
        """
        k = self.resolve_k(k)
        self.tier(tier)
        parsed = self.parse_filter(filter)
        return self._search_one(self.check_vector(vector, student_id), k, 0.0, parsed)

    def _search_one(self, v: np.ndarray, k: int, embed_ms: float, filter: Filter | None = None) -> SearchResult:
        start = time.perf_counter()
        (hits,), version = self.search_batch(v[None, :], [k], [filter])
        if isinstance(hits, InvalidQuery):
            raise hits
        return SearchResult(hits, embed_ms, (time.perf_counter() - start) * 1e3, version)


def _probe_digest(probe: Any) -> str:
    """What tells two probe sets apart: their teacher vectors (the images they hold give those)."""
    if probe is None:
        return ""
    import hashlib
    return hashlib.sha256(np.ascontiguousarray(probe.teacher).tobytes()).hexdigest()


def _as_source(location: Any) -> Any:
    """A Milvus location stays text (a Path would fold its '//'); anything else is a path."""
    return location if is_milvus(location) else Path(location)


def _log_scales(index: SearchIndex) -> None:
    scales, flip = index_scales(index.manifest), index_flip(index.manifest)
    if scales != SINGLE_SCALE or flip:
        log.info("index %s was embedded at scales %s%s; queries are embedded once, at scale 1, by the student",
                 index.folder, ", ".join(f"{s:.3g}" for s in scales), ", with flip" if flip else "",
                 extra={"event": "index_multiscale", "scales": list(scales), "flip": flip})


def _filter_fields(index: Any) -> tuple[str, ...]:
    """What a filter may name on `index`: its `filter_fields` (label and the user metadata columns)."""
    return tuple(getattr(index, "filter_fields", ("label",)))


def _lookup(index: SearchIndex, ids: list[int]) -> dict[int, tuple[str, str, dict[str, str]]]:
    """id -> (path, label, the user's other metadata columns as text); an id no longer held is left out."""
    out = {}
    for rec in index.lookup_records(ids, skip_missing=True):
        i, path, label = int(rec.pop("id")), str(rec.pop("path")), str(rec.pop("label"))
        out[i] = (path, label, {str(k): "" if v is None else str(v) for k, v in rec.items()})
    return out


__all__ = ["Hit", "InvalidQuery", "PairingError", "QueryEngine", "SearchResult", "ServedIndex", "StudentMismatch",
           "Tier", "UnknownTier"]
