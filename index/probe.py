"""The probe set of an index and the quality gate it makes possible.

`index build` keeps a small probe set inside the index, in its metadata database (`meta.sqlite`, table `probe`,
one row holding an .npz): up to `PROBE_SIZE` of the
database images, chosen across the classes, as small copies of their files (byte for byte up to `MAX_COPY_BYTES`,
else a JPEG of shorter side `STORED_SIDE`), with their labels and their teacher embeddings (the very vectors the
index holds for them). It does not depend on the original image paths, and costs a few MB whatever the size of the
index. It lives in `meta.sqlite` because every version of an index carries that file (a build writes it, `index
add` / `remove` copy it into the version they publish, a plain folder turned into a versioned root links it), so
the probe set follows the index through its versions with no extra file to copy. A Milvus index keeps the same
.npz bytes in a side collection beside each version collection (`asymsearch.index.milvus.write_probe`: rows of
base64 text, `COLLECTION__probe`), written before the alias names the version and dropped with it; `index add` /
`remove` change the version collection in place and leave it as it is.

The gate embeds the probe images with a candidate student (decoded and prepared exactly as the server prepares a
query for that student) and scores them leave-one-out against the probe's own teacher vectors: every probe image
queries the other probe images, its own entry removed from its ranking. The teacher's symmetric figures are the
same leave-one-out figures with the teacher vectors as the queries (computed at build time and again at every
check: they are a matrix product). So the gate costs the same for any index size and backend, and it does not
change when images are added to or removed from the index.

Ground truth: the labels (a hit is relevant when it shares the query's class) when at least two classes have two
probe images or more (always so for a labelled folder of several images a class); otherwise ("teacher_topk"
mode) the relevant items of a query are the teacher's own top-`TOPK_RELEVANT` neighbours among the probe images,
so the teacher scores 1 by definition and the student is measured by how well it reproduces the teacher's
neighbourhoods.

`check_student(embedder, probe)` gives a `GateResult`; `GateResult.require(min_ratio)` raises `GateRefused` (a
`PairingError`: on the wire FAILED_PRECONDITION) with both figures when the student's asymmetric Recall@1 is
below `min_ratio` times the teacher's. An index without a probe set asked to gate: `NoProbeSet`, one line naming
the missing folder.
"""
from __future__ import annotations

import dataclasses
import io
import json
import os
import sqlite3
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from asymsearch.core.errors import InvalidImage, PairingError, UserError
from asymsearch.core.manifest import space_of
from asymsearch.core.metrics import ranking_metrics
from asymsearch.core.preprocess import DEFAULT_MAX_PIXELS, decode_image, preprocess
from asymsearch.index.store import META_FILE

PROBE_TABLE = "probe"  # in meta.sqlite: probe(name TEXT PRIMARY KEY, data BLOB), one row PROBE_NAME
PROBE_NAME = "probe.npz"
PROBE_FORMAT = 1
PROBE_SIZE = 300  # probe images at most: a few MB, a gate of a few seconds for a mobile student on one core
MAX_COPY_BYTES = 256 * 1024  # image files up to this size are kept byte for byte, larger ones as a smaller JPEG
STORED_SIDE = 512  # shorter side of the smaller copy (above every student resize in the project)
TOPK_RELEVANT = 5  # teacher_topk mode: the teacher's own neighbours that count as relevant
DEFAULT_MIN_RATIO = 0.95  # of the teacher's Recall@1
EMBED_BATCH = 32


class NoProbeSet(UserError):
    """The index has no probe set, so no gate can be computed."""


class GateRefused(PairingError):
    """A student below the gate: its asymmetric Recall@1 is under `min_ratio` times the teacher's."""


@dataclasses.dataclass(frozen=True)
class ProbeSet:
    """The probe set of one index: image files, labels and teacher vectors (row i: file i, label i)."""

    path: Path | str  # where it was read from: a meta.sqlite, or "LOCATION (COLLECTION)" for Milvus
    teacher_id: str
    dim: int
    images: tuple[bytes, ...]  # encoded image files
    labels: tuple[str, ...]
    teacher: np.ndarray  # (N, dim) float32, L2-normalised, the index's vectors of these images
    mode: str  # "labels" or "teacher_topk"
    ids: tuple[int, ...] = ()  # their ids in the index that wrote the probe set

    def __len__(self) -> int:
        return len(self.images)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ProbeSet | None":
        """The probe set in the metadata database `path`; None when it holds none."""
        path = Path(path)
        try:
            con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
            try:
                if not con.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name=?",
                                   (PROBE_TABLE,)).fetchone():
                    return None
                row = con.execute(f"SELECT data FROM {PROBE_TABLE} WHERE name=?", (PROBE_NAME,)).fetchone()
            finally:
                con.close()
        except sqlite3.Error as e:
            raise UserError(f"the metadata {path} cannot be read ({e}); rebuild the index") from None
        if row is None:
            return None
        return cls.from_bytes(row[0], path)

    @classmethod
    def from_bytes(cls, data: bytes, path: str | os.PathLike) -> "ProbeSet":
        """The probe set of an .npz as `probe_npz` wrote it; `path` names where it was read (for messages: a
        meta.sqlite, or a Milvus side collection)."""
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as z:
                meta = json.loads(str(z["meta"]))
                teacher, labels, ids = z["teacher"], z["labels"], z["ids"]
                blob, offsets = z["blob"].tobytes(), z["offsets"]
        except (OSError, ValueError, KeyError) as e:
            raise UserError(f"the probe set {path} cannot be read ({e.__class__.__name__}); rebuild the index") \
                from None
        n = len(labels)
        if teacher.shape != (n, int(meta["dim"])) or len(offsets) != n + 1 or len(ids) != n:
            raise UserError(f"the probe set {path} is inconsistent ({n} labels, {len(offsets) - 1} images, vectors "
                            f"{teacher.shape}); rebuild the index")
        images = tuple(blob[int(a):int(b)] for a, b in zip(offsets[:-1], offsets[1:]))
        return cls(path, str(meta["teacher_id"]), int(meta["dim"]), images, tuple(str(x) for x in labels),
                   np.asarray(teacher, np.float32), str(meta["mode"]), tuple(int(i) for i in ids))


@dataclasses.dataclass(frozen=True)
class GateResult:
    """A student's asymmetric figures on a probe set beside the teacher's symmetric ones."""

    recall_at_1: float
    map: float
    teacher_recall_at_1: float
    teacher_map: float
    count: int  # probe images scored (queries with at least one relevant item)
    mode: str

    @property
    def ratio(self) -> float:
        return self.recall_at_1 / self.teacher_recall_at_1 if self.teacher_recall_at_1 > 0 else 0.0

    def summary(self) -> str:
        return (f"asymmetric Recall@1 {self.recall_at_1:.4f} (mAP {self.map:.4f}) against the teacher's "
                f"{self.teacher_recall_at_1:.4f} (mAP {self.teacher_map:.4f}), ratio {self.ratio:.3f}, on "
                f"{self.count} probe images ({self.mode})")

    def require(self, min_ratio: float, what: str = "the student") -> None:
        """Raise `GateRefused` with both figures when the ratio is below `min_ratio`."""
        if self.ratio < min_ratio:
            raise GateRefused(
                f"{what} fails the quality gate: its asymmetric Recall@1 on the index's probe set is "
                f"{self.recall_at_1:.4f}, {self.ratio:.3f}x the teacher's {self.teacher_recall_at_1:.4f}; the "
                f"gate needs {min_ratio:g}x (--min-ratio); nothing loaded")

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "ratio": self.ratio}


# -- writing (index build) ---------------------------------------------------------------------------------------

def select_probe(labels: Sequence[str], size: int = PROBE_SIZE) -> tuple[list[int], str]:
    """(positions, mode): up to `size` positions of `labels` spread over the classes, at least 2 per class taken
    (so each query has a relevant item); "labels" mode when at least two such classes exist, else up to `size`
    positions evenly spaced and "teacher_topk" mode."""
    by_class: dict[str, list[int]] = {}
    for i, label in enumerate(labels):
        by_class.setdefault(str(label), []).append(i)
    eligible = [rows for _, rows in sorted(by_class.items()) if len(rows) >= 2]
    if len(eligible) >= 2 and size >= 4:
        if 2 * len(eligible) > size:
            eligible = [eligible[int(j)] for j in np.linspace(0, len(eligible) - 1, size // 2).round()]
        per_class = max(2, size // len(eligible))
        chosen = []
        for rows in eligible:
            take = min(per_class, len(rows))
            chosen += [rows[int(j)] for j in np.linspace(0, len(rows) - 1, take).round()]
        return sorted(set(chosen))[:size], "labels"
    n = min(size, len(labels))
    return sorted({int(j) for j in np.linspace(0, len(labels) - 1, n).round()}) if n else [], "teacher_topk"


def label_mode(labels: Sequence[str]) -> str:
    """"labels" when at least two classes have two images or more among `labels`, else "teacher_topk"."""
    counts: dict[str, int] = {}
    for label in labels:
        counts[str(label)] = counts.get(str(label), 0) + 1
    return "labels" if sum(c >= 2 for c in counts.values()) >= 2 else "teacher_topk"


def write_probe(index_folder: str | os.PathLike, paths: Sequence[str], labels: Sequence[str],
                vectors: np.ndarray, *, teacher_id: str, ids: Sequence[int] | None = None,
                size: int = PROBE_SIZE, chosen: bool = False) -> Path | None:
    """Write the probe set into `index_folder/meta.sqlite` (written before) from the database images `paths` (their `labels`, their index `vectors`,
    their index `ids`), choosing up to `size` of them (`select_probe`; all of them when `chosen`: the caller
    selected them with `select_probe`); None (nothing written) when fewer than 3 images are given. Images that
    cannot be read now are left out."""
    data = probe_npz(paths, labels, vectors, teacher_id=teacher_id, ids=ids, size=size, chosen=chosen)
    if data is None:
        return None
    path = Path(index_folder) / META_FILE
    con = sqlite3.connect(path)
    try:
        with con:
            con.execute(f"CREATE TABLE IF NOT EXISTS {PROBE_TABLE} (name TEXT PRIMARY KEY, data BLOB NOT NULL)")
            con.execute(f"INSERT OR REPLACE INTO {PROBE_TABLE}(name, data) VALUES (?, ?)", (PROBE_NAME, data))
    finally:
        con.close()
    return path


def probe_npz(paths: Sequence[str], labels: Sequence[str], vectors: np.ndarray, *, teacher_id: str,
              ids: Sequence[int] | None = None, size: int = PROBE_SIZE, chosen: bool = False) -> bytes | None:
    """The probe set as the .npz bytes every backend stores (`write_probe`'s row in meta.sqlite; a Milvus index's
    side collection, `asymsearch.index.milvus.write_probe`), chosen as `write_probe` says; None when fewer than 3
    readable images are given."""
    vectors = np.asarray(vectors, np.float32)
    if chosen:
        positions, mode = list(range(len(paths))), label_mode(labels)
    else:
        positions, mode = select_probe(labels, size)
    if len(positions) < 3:
        return None
    images, kept = [], []
    for pos in positions:
        data = _stored_image(Path(paths[pos]))
        if data is not None:
            images.append(data)
            kept.append(pos)
    if len(kept) < 3:
        return None
    teacher = _normalise(vectors[kept])
    kept_labels = [str(labels[p]) for p in kept]
    if mode == "labels":
        mode = label_mode(kept_labels)  # unreadable files may leave fewer than two classes with two images
    figures = teacher_figures(teacher, kept_labels, mode)
    meta = {"format": PROBE_FORMAT, "teacher_id": teacher_id, "dim": int(teacher.shape[1]), "mode": mode,
            "source": "database images (leave-one-out within the probe set)",
            "teacher": {"recall_at_1": figures[0], "map": figures[1]}}
    offsets = np.cumsum([0] + [len(b) for b in images]).astype(np.int64)
    buf = io.BytesIO()
    np.savez(buf, meta=np.array(json.dumps(meta, sort_keys=True)), teacher=teacher,
             labels=np.array(kept_labels, dtype=str),
             ids=np.array([int(ids[p]) if ids is not None else int(p) for p in kept], np.int64),
             blob=np.frombuffer(b"".join(images), np.uint8), offsets=offsets)
    return buf.getvalue()


def _stored_image(src: Path) -> bytes | None:
    """The bytes kept of `src`: the file itself when small, else a JPEG of shorter side STORED_SIDE; None when it
    cannot be read."""
    try:
        data = src.read_bytes()
        img = decode_image(data)
        if len(data) <= MAX_COPY_BYTES:
            return data
    except (OSError, InvalidImage):
        return None
    except (OSError, InvalidImage):
        return None
    w, h = img.size
    scale = STORED_SIDE / min(w, h)
    if scale < 1:
        img = img.resize((max(1, round(w * scale)), max(1, round(h * scale))), resample=3)  # bicubic
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=95)
    return buf.getvalue()


# -- finding (serve, student check) -------------------------------------------------------------------------------

def find_probe(index: Any) -> ProbeSet | None:
    """The probe set of an opened index, None when it has none or one of another teacher or dimension: a
    `SearchIndex` (or anything with `.folder` and `.manifest`) keeps it in its meta.sqlite; an index with a
    `read_probe()` (a `MilvusIndex`: a side collection beside its version collection) gives it itself."""
    reader = getattr(index, "read_probe", None)
    if reader is not None:
        probe = reader()
    else:
        meta = Path(index.folder) / META_FILE
        probe = ProbeSet.load(meta) if meta.is_file() else None
    if probe is None or probe.teacher_id != index.manifest.teacher_id or probe.dim != index.manifest.dim:
        return None
    return probe


def require_probe(index: Any) -> ProbeSet:
    probe = find_probe(index)
    if probe is None:
        where = (getattr(index, "probe_where", None)
                 or f"table {PROBE_TABLE!r} in {META_FILE}")
        raise NoProbeSet(f"the index {getattr(index, 'root', index.folder)} has no probe set ({where}), so no gate "
                         f"can be computed: rebuild it with `asymsearch index build` (which writes one), or load "
                         f"the student without --min-ratio")
    return probe


# -- scoring ------------------------------------------------------------------------------------------------------

def _normalise(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v, np.float32)
    norms = np.linalg.norm(v, axis=1, keepdims=True)
    return v / np.maximum(norms, 1e-12)


def _relevance(order: np.ndarray, labels: Sequence[str], teacher: np.ndarray, mode: str
               ) -> tuple[np.ndarray, np.ndarray]:
    """(relevant (N, N-1), num_relevant (N,)) of leave-one-out rankings `order` (each row without the query)."""
    n = len(order)
    if mode == "labels":
        lab = np.asarray(labels)
        return lab[order] == lab[:, None], (lab[None, :] == lab[:, None]).sum(axis=1) - 1
    sims = teacher @ teacher.T
    np.fill_diagonal(sims, -np.inf)
    k = min(TOPK_RELEVANT, n - 1)
    truth = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    mask = np.zeros((n, n), bool)
    mask[np.arange(n)[:, None], truth] = True
    return np.take_along_axis(mask, order, axis=1), np.full(n, k)


def _leave_one_out(queries: np.ndarray, gallery: np.ndarray, labels: Sequence[str], teacher: np.ndarray,
                   mode: str) -> tuple[float, float, int]:
    sims = queries @ gallery.T
    np.fill_diagonal(sims, -np.inf)
    order = np.argsort(-sims, axis=1, kind="stable")[:, :-1]  # the query itself, at -inf, is last
    relevant, num_relevant = _relevance(order, labels, teacher, mode)
    m = ranking_metrics(relevant, num_relevant, ks=(1,))
    return m["recall@1"], m["map"], int((num_relevant > 0).sum())


def teacher_figures(teacher: np.ndarray, labels: Sequence[str], mode: str) -> tuple[float, float]:
    """The teacher's symmetric (Recall@1, mAP) on the probe set, leave-one-out."""
    t = _normalise(teacher)
    r1, ap, _ = _leave_one_out(t, t, labels, t, mode)
    return r1, ap


def score(student_vectors: np.ndarray, probe: ProbeSet) -> GateResult:
    """The gate figures of student embeddings of the probe images (row i: probe image i)."""
    s = _normalise(student_vectors)
    if s.shape != probe.teacher.shape:
        raise UserError(f"{s.shape[0]} student vectors of {s.shape[1]} dimensions for a probe set of "
                        f"{len(probe)} x {probe.dim}")
    t = probe.teacher
    r1, ap, count = _leave_one_out(s, t, probe.labels, t, probe.mode)
    tr1, tap = teacher_figures(t, probe.labels, probe.mode)
    return GateResult(r1, ap, tr1, tap, count, probe.mode)


def embed_probe(embedder: Any, probe: ProbeSet, max_pixels: int = DEFAULT_MAX_PIXELS, *,
                progress: bool = False) -> np.ndarray:
    """The student embeddings of the probe images, each decoded and prepared as the server prepares a query for
    this student (`min_side` at its resize, then its preprocessing); `progress`: a bar with its ETA on stderr."""
    from tqdm import tqdm

    spec = embedder.manifest.preprocessing
    out = []
    with tqdm(total=len(probe), unit="img", desc="embedding the probe set", disable=not progress,
              leave=False) as bar:
        for start in range(0, len(probe), EMBED_BATCH):
            batch = [preprocess(decode_image(data, max_pixels, min_side=spec.resize), spec)
                     for data in probe.images[start:start + EMBED_BATCH]]
            out.append(embedder.embed_arrays(np.stack(batch)))
            bar.update(len(batch))
    return np.concatenate(out)


def check_student(embedder: Any, probe: ProbeSet, max_pixels: int = DEFAULT_MAX_PIXELS, *,
                  progress: bool = False) -> GateResult:
    """Pairing first (`PairingError` naming both teacher ids; a student whose teacher was trained compatible with
    the probe's teacher pairs, `core.manifest.check_pairing`), then the gate figures of `embedder` on `probe`."""
    m = embedder.manifest
    compatible = probe.teacher_id in space_of(m).compatible_with  # trained compatible with the probe's teacher
    if (m.teacher_id != probe.teacher_id and not compatible) or m.dim != probe.dim:
        raise PairingError(f"{getattr(embedder, 'path', 'the student')} belongs to teacher {m.teacher_id} ({m.dim} "
                           f"dimensions), but the index's probe set to teacher {probe.teacher_id} ({probe.dim}): "
                           f"their embeddings are not comparable")
    return score(embed_probe(embedder, probe, max_pixels, progress=progress), probe)


__all__ = ["DEFAULT_MIN_RATIO", "GateRefused", "GateResult", "NoProbeSet", "PROBE_TABLE", "PROBE_SIZE", "ProbeSet",
           "check_student", "embed_probe", "find_probe", "probe_npz", "require_probe", "score", "select_probe",
           "teacher_figures", "write_probe"]
