"""The query engine: the server's plain logic, with no gRPC in it.

A query (an encoded image, or a vector the student already computed elsewhere) is validated, embedded with the
student when it is an image, L2-normalised, and searched in the teacher's index. Anything wrong with a query
raises `InvalidQuery` with a message that names the problem; the gRPC layer turns that into a status.
"""
from __future__ import annotations

import dataclasses
import math
import os
import time
from typing import Any, Sequence

import numpy as np

from asymsearch.core.errors import InvalidImage, UserError
from asymsearch.core.manifest import check_pairing
from asymsearch.core.ort import OnnxEmbedder
from asymsearch.core.preprocess import DEFAULT_MAX_PIXELS, decode_image
from asymsearch.index.store import SearchIndex


class InvalidQuery(UserError):
    """A query the engine refuses: an empty or undecodable image, a malformed vector, or a k out of range."""


@dataclasses.dataclass(frozen=True)
class Hit:
    id: int
    score: float  # inner product of the normalised query and the database embedding
    path: str
    label: str


@dataclasses.dataclass(frozen=True)
class SearchResult:
    hits: list[Hit]
    embed_ms: float  # decoding and embedding the image; 0 for a vector query
    search_ms: float  # the index search and the lookup of paths and labels


class QueryEngine:
    """Answers queries against `index` with `student` embedding the query images.

    The student must belong to the teacher that embedded the index (same teacher id and dimension), else
    `PairingError`. A teacher model may serve as the query model too (symmetric search) on the same terms.
    """

    def __init__(self, index: SearchIndex, student: OnnxEmbedder, *, default_k: int = 10, max_k: int = 1000,
                 max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
        check_pairing(student.manifest, index.manifest)
        if not 1 <= default_k <= max_k:
            raise UserError(f"need 1 <= default_k <= max_k, got default_k={default_k}, max_k={max_k}")
        if max_pixels < 1:
            raise UserError(f"max_pixels must be positive, got {max_pixels}")
        self.index = index
        self.student = student
        self.default_k = default_k
        self.max_k = max_k
        self.max_pixels = max_pixels

    @classmethod
    def open(cls, index_dir: str | os.PathLike, student_onnx: str | os.PathLike, **kw: Any) -> "QueryEngine":
        """Open the index folder and the student ONNX (with its manifest) and check that they pair.

        Keyword arguments go to the constructor. Raises `PairingError` naming both teacher ids on a mismatch.
        """
        student = OnnxEmbedder(student_onnx)
        index = SearchIndex.open(index_dir)
        try:
            return cls(index, student, **kw)
        except BaseException:
            index.close()
            raise

    @property
    def dim(self) -> int:
        return self.index.dim

    def search_image(self, data: bytes, k: int) -> SearchResult:
        """Decode `data`, embed it with the student and search. `k == 0` means `default_k`."""
        k = self._resolve_k(k)
        if not data:
            raise InvalidQuery("empty image: the query carries no image bytes")
        start = time.perf_counter()
        try:
            image = decode_image(bytes(data), self.max_pixels)
        except InvalidImage as e:
            raise InvalidQuery(str(e)) from None
        vector = self.student.embed_images([image])[0]
        embed_ms = (time.perf_counter() - start) * 1e3
        return self._search(self._normalise(vector), k, embed_ms)

    def search_vector(self, vector: Sequence[float] | np.ndarray, k: int) -> SearchResult:
        """Search with a vector the student computed elsewhere (e.g. on the user's device).

        The vector must have the index's dimension and finite values; the engine L2-normalises it before the
        search, so scores are cosine similarities whatever scale the sender used.
        """
        k = self._resolve_k(k)
        v = np.asarray(vector, dtype=np.float32)
        if v.ndim != 1:
            raise InvalidQuery(f"the vector must be one-dimensional, got shape {v.shape}")
        if v.shape[0] != self.dim:
            raise InvalidQuery(f"the vector has {v.shape[0]} values; expected dim {self.dim}")
        if not np.isfinite(v).all():
            raise InvalidQuery("the vector contains NaN or infinite values")
        return self._search(self._normalise(v), k, 0.0)

    def info(self) -> dict[str, Any]:
        m = self.index.manifest
        return {"teacher_id": self.index.teacher_id, "student_id": self.student.manifest.model_id,
                "dim": self.dim, "count": self.index.count, "factory": m.factory, "metric": m.metric,
                "max_k": self.max_k, "default_k": self.default_k}

    def close(self) -> None:
        self.index.close()

    def __enter__(self) -> "QueryEngine":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _resolve_k(self, k: int) -> int:
        if k < 0:
            raise InvalidQuery(f"k must be positive (or 0 for the default of {self.default_k}), got {k}")
        if k > self.max_k:
            raise InvalidQuery(f"k={k} exceeds this server's max_k of {self.max_k}")
        return k or self.default_k

    @staticmethod
    def _normalise(v: np.ndarray) -> np.ndarray:
        norm = float(np.linalg.norm(v.astype(np.float64)))
        if norm == 0.0 or not math.isfinite(norm):
            raise InvalidQuery("the vector has zero length and cannot be normalised")
        return (v / norm).astype(np.float32)

    def _search(self, v: np.ndarray, k: int, embed_ms: float) -> SearchResult:
        start = time.perf_counter()
        scores, ids = self.index.search(v[None, :], k)
        keep = ids[0] >= 0  # approximate indexes pad with -1 when they find fewer than k
        ids_kept, scores_kept = ids[0][keep], scores[0][keep]
        entries = self.index.lookup(ids_kept) if len(ids_kept) else []
        hits = [Hit(int(i), float(s), path, label) for i, s, (path, label) in zip(ids_kept, scores_kept, entries)]
        return SearchResult(hits, embed_ms, (time.perf_counter() - start) * 1e3)
